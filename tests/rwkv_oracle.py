"""The rwkv package's RWKV-7 (x070) CPU path as a test oracle
(:func:`prosg.models.testing.rwkv_package_x070`); tests skip without the package."""

from __future__ import annotations

import pytest
import torch

from prosg.models.testing import rwkv_package_x070


def rwkv_x070():
    try:
        return rwkv_package_x070()
    except ImportError as e:
        pytest.skip(str(e))


def rwkv_logits(path_pth: str, tokens: list[int]) -> torch.Tensor:
    """``[T, V]`` float32 logits of the rwkv package on one sequence from the empty state."""
    model = rwkv_x070()(path_pth.removesuffix(".pth"), "cpu fp32")
    out, _ = model.forward(tokens, None, full_output=True)
    return out.float()
