"""Small random RWKV-4 models and deltas for tests (of this package and of code built
on it). Nothing here downloads anything."""

from __future__ import annotations

import math

import torch

from prosg.models.config import RWKV4Config
from prosg.models.rwkv4 import RWKV4LM
from prosg.models.state import Delta


def tiny_config(**overrides) -> RWKV4Config:
    """A few-layer config with odd sizes (so no code path relies on round numbers)."""
    fields = dict(vocab_size=37, hidden_size=24, num_hidden_layers=3, intermediate_size=52, rescale_every=0)
    fields.update(overrides)
    return RWKV4Config(**fields)


@torch.no_grad()
def randomize_(model: RWKV4LM, seed: int = 0) -> RWKV4LM:
    """Fills every parameter with random values of the scales a trained model has
    (unit-variance activations, decays spread over ``exp(-exp(w))`` in (0, 1), mixes
    in (0, 1), LayerNorm affine near identity), so that a test exercises every term;
    the default initialisation leaves many of them trivial (zero embeddings, equal
    ``time_first``). Returns the model."""
    g = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=g, dtype=torch.float64)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "time_decay":
            value = randn(p) * 1.5 - 0.5
        elif leaf == "time_first":
            value = randn(p)
        elif leaf.startswith("time_mix"):
            value = torch.rand(p.shape, generator=g, dtype=torch.float64)
        elif p.dim() == 1:  # LayerNorm affine (the only other vectors)
            value = (1.0 if leaf == "weight" else 0.0) + 0.2 * randn(p)
        elif name == "embeddings.weight":
            value = randn(p)
        else:  # projection matrices: variance-preserving
            value = randn(p) / math.sqrt(p.shape[1])
        p.copy_(value)
    return model


def random_model(config: RWKV4Config | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 **overrides) -> RWKV4LM:
    """``randomize_(RWKV4LM(config))`` in eval mode; ``overrides`` patch :func:`tiny_config`."""
    config = config if config is not None else tiny_config(**overrides)
    model = RWKV4LM(config, init=False)
    randomize_(model, seed)
    return model.to(dtype).eval()


def random_delta(model: RWKV4LM, batch: int, rank: int | dict[str, int] = 2, names: list[str] | None = None,
                 *, strength: float = 0.3, scale: float = 1.0, seed: int = 0,
                 dtype: torch.dtype | None = None, requires_grad: bool = False) -> Delta:
    """A per-sample delta on ``names`` (default: every module of
    :meth:`RWKV4LM.delta_shapes`), with ``U_b V_b^T`` about ``strength`` times the size
    of the weight it modifies (for unit-variance weights). ``rank`` may differ by module."""
    g = torch.Generator().manual_seed(seed)
    shapes = model.delta_shapes()
    names = list(shapes) if names is None else names
    dtype = dtype or model.dtype
    factors = {}
    for name in names:
        d_out, d_in = shapes[name]
        r = rank[name] if isinstance(rank, dict) else rank
        U = torch.randn(batch, d_out, r, generator=g, dtype=torch.float64) * (strength / math.sqrt(max(r, 1)))
        V = torch.randn(batch, d_in, r, generator=g, dtype=torch.float64) / math.sqrt(d_in)
        U = U.to(model.device, dtype).requires_grad_(requires_grad)
        V = V.to(model.device, dtype).requires_grad_(requires_grad)
        factors[name] = (U, V)
    return Delta(factors, scale)


def merged_weights(model: RWKV4LM, delta: Delta, sample: int) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` with sample ``sample``'s delta merged into them
    (``W + scale * U_b V_b^T``), for ``torch.func.functional_call``: the dense
    reference of a delta run, differentiable in the factors."""
    params = dict(model.named_parameters())
    for name, (U, V) in delta.factors.items():
        key = name.removeprefix("rwkv.").removesuffix(".weight") + ".weight"
        W = params[key]
        params[key] = W + delta.scale * (U[sample].to(W.dtype) @ V[sample].to(W.dtype).T)
    return params


def to_blinkdl_state_dict(model: RWKV4LM) -> dict[str, torch.Tensor]:
    """Our weights under BlinkDL's names (the inverse of transformers' conversion)."""
    out = {}
    for key, value in model.state_dict().items():
        name = key.replace("embeddings.", "emb.").replace("blocks.0.pre_ln.", "blocks.0.ln0.")
        name = name.replace(".attention.", ".att.").replace(".feed_forward.", ".ffn.")
        for long, short in (("key", "k"), ("value", "v"), ("receptance", "r")):
            if name.endswith(f".time_mix_{long}"):
                name = name[: -len(long)] + short
        out[name] = value.clone()
    return out


# ---------------------------------------------------------------------- RWKV-7


def tiny_rwkv7_config(**overrides):
    """A few-layer RWKV-7 config with odd LoRA widths and vocabulary."""
    from prosg.models.config import RWKV7Config

    fields = dict(vocab_size=301, hidden_size=64, num_hidden_layers=3, head_size=32, intermediate_size=100,
                  decay_low_rank_dim=12, a_low_rank_dim=10, v_low_rank_dim=6, gate_low_rank_dim=14)
    fields.update(overrides)
    return RWKV7Config(**fields)


@torch.no_grad()
def randomize_rwkv7_(model, seed: int = 0):
    """Fills every parameter of an RWKV7LM with random values of the scales a trained
    model has: mixes in (0, 1), log-log decays spread so that ``exp(-exp(w))`` covers
    (0, 1), learning rates ``a`` and value-residual gates away from 0 and 1,
    variance-preserving projections, norms near identity. Returns the model."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64)

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if leaf.startswith("x_"):
            value = torch.rand(p.shape, generator=g, dtype=torch.float64)
        elif leaf == "w0":
            value = randn(p.shape) * 1.5
        elif leaf in ("a0", "v0"):
            value = randn(p.shape) * 0.7
        elif leaf in ("w1", "a1", "v1", "g1"):
            value = randn(p.shape) / math.sqrt(p.shape[0])
        elif leaf in ("w2", "a2", "v2", "g2"):
            value = randn(p.shape) * 0.7 / math.sqrt(p.shape[0])
        elif leaf == "k_k":
            value = 1 + 0.2 * randn(p.shape)
        elif leaf == "k_a":
            value = torch.rand(p.shape, generator=g, dtype=torch.float64)
        elif leaf == "r_k":
            value = 0.5 * randn(p.shape)
        elif p.dim() == 1:  # LayerNorm / GroupNorm affine
            value = (1.0 if leaf == "weight" else 0.0) + 0.2 * randn(p.shape)
        elif name == "embeddings.weight":
            value = randn(p.shape)
        else:  # projection matrices: variance-preserving
            value = randn(p.shape) / math.sqrt(p.shape[1])
        del parent
        p.copy_(value)
    return model


def random_rwkv7_model(config=None, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """``randomize_rwkv7_(RWKV7LM(config))`` in eval mode; ``overrides`` patch
    :func:`tiny_rwkv7_config`."""
    from prosg.models.rwkv7 import RWKV7LM

    config = config if config is not None else tiny_rwkv7_config(**overrides)
    model = RWKV7LM(config, init=False)
    randomize_rwkv7_(model, seed)
    return model.to(dtype).eval()


def write_blinkdl7(model, path) -> None:
    """Writes ``model`` as a BlinkDL x070 ``.pth`` (what the rwkv package loads)."""
    torch.save(model.to_blinkdl_state_dict(), path)


_RWKV_X070 = None


def rwkv_package_x070():
    """The ``rwkv`` package's ``RWKV_x070`` class (its CPU path, the oracle of the
    tests and benchmarks of RWKV7LM). rwkv/model.py defines it only when
    ``RWKV_V7_ON=1`` at import and scripts its functions unless ``RWKV_JIT_ON=0``;
    the package may already be imported otherwise, so its file is loaded as a module
    of its own under those settings. ImportError without the package."""
    global _RWKV_X070
    if _RWKV_X070 is None:
        import importlib.util
        import os

        spec = importlib.util.find_spec("rwkv.model")
        if spec is None or spec.origin is None:
            raise ImportError("the rwkv package is not installed (pip install rwkv)")
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
        _RWKV_X070 = module.RWKV_x070
    return _RWKV_X070
