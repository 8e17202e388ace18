"""The rwkv package's RWKV-7 (x070) CPU path as a test oracle.

rwkv/model.py defines RWKV_x070 only when RWKV_V7_ON=1 at import and scripts its
functions unless RWKV_JIT_ON=0; another test may already have imported it otherwise,
so the file is loaded here as a module of its own under those settings."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

_MODULE = None


def rwkv_x070():
    """The ``RWKV_x070`` class of the rwkv package (skips the test without it)."""
    global _MODULE
    if _MODULE is None:
        spec = importlib.util.find_spec("rwkv.model")
        if spec is None or spec.origin is None:
            pytest.skip("the rwkv package is not installed")
        saved = {k: os.environ.get(k) for k in ("RWKV_V7_ON", "RWKV_JIT_ON", "RWKV_CUDA_ON")}
        os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
        try:
            own = importlib.util.spec_from_file_location("_rwkv_x070_oracle", spec.origin)
            module = importlib.util.module_from_spec(own)
            own.loader.exec_module(module)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        _MODULE = module
    return _MODULE.RWKV_x070


def rwkv_logits(path_pth: str, tokens: list[int]) -> torch.Tensor:
    """``[T, V]`` float32 logits of the rwkv package on one sequence from the empty state."""
    model = rwkv_x070()(path_pth.removesuffix(".pth"), "cpu fp32")
    out, _ = model.forward(tokens, None, full_output=True)
    return out.float()
