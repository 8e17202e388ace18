"""``prosg.ops.lowrank_linear`` against the two ways of writing it with stock torch ops.

* ``prosg``: the fused op (shared GEMM + per-sample shrink/expand kernels).
* ``eager``: ``x @ W.T + b + scale * (x @ V_b) @ U_b.T`` as ``F.linear`` + ``bmm`` +
  ``baddbmm`` (the strongest eager spelling: the low-rank term is added into the GEMM
  output in place of a separate add).
* ``materialized``: the per-sample weights ``W_b = W + scale U_b V_b^T`` formed with
  ``baddbmm``, then one ``baddbmm`` of x with them (what an implementation that patches
  the weight per sample does).

Each (mode, device, dtype, shape) is one pytest-benchmark group, so the table shows
the three implementations side by side with their ratios. ``fwd`` runs under
``torch.no_grad``; ``fwdbwd`` is forward plus the gradients of x, weight, bias, U and V.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prosg  # noqa: F401  (loads torch.ops.prosg)
from prosg.ops import lowrank_linear

SCALE = 0.5


def eager(x, weight, bias, U, V, scale):
    return torch.baddbmm(F.linear(x, weight, bias), torch.bmm(x, V), U.transpose(1, 2), alpha=scale)


def materialized(x, weight, bias, U, V, scale):
    w_b = torch.baddbmm(weight, U, V.transpose(1, 2), alpha=scale)  # [B, Dout, Din]
    y = torch.bmm(x, w_b.transpose(1, 2))
    return y if bias is None else y + bias


IMPLS = {"prosg": lowrank_linear, "eager": eager, "materialized": materialized}
NAMES = ("x", "weight", "bias", "U", "V")


def make_inputs(case, requires_grad):
    s = case.shape
    kw = dict(device=case.device, dtype=case.dtype)
    t = dict(
        x=torch.randn(s.batch, s.seqlen, s.dim, **kw),
        weight=torch.randn(s.d_out, s.dim, **kw) / math.sqrt(s.dim),
        bias=torch.randn(s.d_out, **kw),
        U=torch.randn(s.batch, s.d_out, s.rank, **kw) / math.sqrt(s.rank),
        V=torch.randn(s.batch, s.dim, s.rank, **kw) / math.sqrt(s.dim),
    )
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


def check(impl, inputs, dtype):
    """A benchmark of a wrong implementation is meaningless: compare once with prosg."""
    with torch.no_grad():
        y = IMPLS[impl](**inputs, scale=SCALE).float()
        ref = lowrank_linear(**inputs, scale=SCALE).float()
    # Loose: the impls round differently (bf16 GEMM outputs), a bug is O(1).
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-3
    err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert err < tol, f"{impl} disagrees with prosg: max rel error {err:.3g}"


def describe(benchmark, mode, case, impl):
    benchmark.group = f"lowrank_linear {mode} {case.device} {str(case.dtype).removeprefix('torch.')} {case.shape}"
    benchmark.extra_info.update(op="lowrank_linear", mode=mode, impl=impl, device=case.device,
                                dtype=str(case.dtype).removeprefix("torch."), shape=case.shape.name,
                                B=case.shape.batch, T=case.shape.seqlen, Din=case.shape.dim,
                                Dout=case.shape.d_out, r=case.shape.rank, threads=torch.get_num_threads(),
                                torch=torch.__version__)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, case, impl, timed):
    inputs = make_inputs(case, requires_grad=False)
    check(impl, inputs, case.dtype)
    fn = IMPLS[impl]
    describe(benchmark, "fwd", case, impl)
    with torch.no_grad():
        benchmark(timed(lambda: fn(**inputs, scale=SCALE)))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, case, impl, timed):
    inputs = make_inputs(case, requires_grad=True)
    check(impl, inputs, case.dtype)
    fn = IMPLS[impl]
    leaves = [inputs[k] for k in NAMES]
    s = case.shape
    grad_out = torch.randn(s.batch, s.seqlen, s.d_out, device=case.device, dtype=case.dtype)

    def step():
        # autograd.grad, not backward(): nothing accumulates into .grad between rounds.
        return torch.autograd.grad(fn(**inputs, scale=SCALE), leaves, grad_out)

    step()  # warm-up (lazy initialisation of BLAS handles / workspaces)
    describe(benchmark, "fwdbwd", case, impl)
    benchmark(timed(step))
