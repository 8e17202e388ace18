"""``prosg.ops.wkv4`` (the RWKV-4 recurrence) against transformers and against the
ways of writing its low-rank form with stock torch ops.

Groups (each one (mode, device, dtype, shape); pytest-benchmark prints every
implementation's ratio to the fastest in its group):

* ``fwd``: forward under ``torch.no_grad``, returning the output and the state.
  ``prosg`` the op; ``hf`` transformers' ``rwkv_linear_attention_cpu`` (the recurrence
  as a Python loop of torch ops over T; CPU only: on CUDA transformers uses its own
  kernel, compiled at run time, which this harness does not build).
* ``fwdbwd``: forward plus the gradients of time_decay, time_first, key and value for a
  random cotangent of the output: ``prosg`` vs autograd through ``hf`` (CPU only; about
  14 s a call at the ``medium`` shape, so it runs one round of one call).
* ``lowrank-fwd``: rank-r perturbed keys and values (r = the shape's rank):
  ``fused`` passes (z, U) to the op, which forms k + z U^T inside the recurrence;
  ``materialized`` forms k + z U^T and v + z U^T with ``baddbmm``, then runs the plain
  op; ``plain`` is the unperturbed op, the floor both are measured against.
* ``copy`` (CUDA only, in the ``fwd`` group): a device-to-device copy moving as many
  bytes as the forward must (key and value read once, out written once, the state
  written), the bandwidth reference. Every CUDA forward stores its achieved bandwidth
  in ``extra_info["GB/s"]`` (bytes moved / median time) next to ``extra_info["bytes"]``.

Run (CPU, one intra-op thread on a loaded machine; see README.md)::

    pytest benchmarks/bench_wkv4.py --bench-shapes=small,medium --bench-threads=1
"""

from __future__ import annotations

import math

import pytest
import torch

import prosg  # noqa: F401  (loads torch.ops.prosg)
from prosg.ops import wkv4

modeling_rwkv = pytest.importorskip("transformers.models.rwkv.modeling_rwkv")


def hf(time_decay, time_first, key, value):
    out, state = modeling_rwkv.rwkv_linear_attention_cpu(time_decay, time_first, key, value, return_state=True)
    return out, state


def prosg_op(time_decay, time_first, key, value):
    return wkv4(time_decay, time_first, key, value)


def make_inputs(case, requires_grad=False):
    """time_decay in RWKV-4's trained range, time_first ~ N(0, 1/4), key, value ~ N(0, 1);
    z ~ N(0, 1) and U ~ N(0, 1/(4r)) for the low-rank perturbations."""
    s, kw = case.shape, dict(device=case.device, dtype=case.dtype)
    B, T, C, r = s.batch, s.seqlen, s.dim, s.rank
    t = dict(
        time_decay=torch.empty(C, **kw).uniform_(-4.0, 1.5),
        time_first=0.5 * torch.randn(C, **kw),
        key=torch.randn(B, T, C, **kw),
        value=torch.randn(B, T, C, **kw),
    )
    lowrank = dict(key_z=torch.randn(B, T, r, **kw), key_u=torch.randn(B, C, r, **kw) / math.sqrt(4 * r),
                   value_z=torch.randn(B, T, r, **kw), value_u=torch.randn(B, C, r, **kw) / math.sqrt(4 * r))
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}, lowrank


def relative_error(a, b):
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def check(got, expected, what, dtype):
    """A benchmark of a wrong computation is meaningless: compare once. Loose: a bug is
    O(1), while bfloat16 outputs round at 2^-8."""
    tol = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    for name, a, b in zip(("out", "state"), got, expected):
        err = relative_error(a, b)
        assert err < tol, f"{what}: {name} disagrees with prosg: max relative error {err:.3g}"


def describe(benchmark, mode, case, impl, **extra):
    s = case.shape
    benchmark.group = f"wkv4 {mode} {case.device} {str(case.dtype).removeprefix('torch.')} {s}"
    benchmark.extra_info.update(op="wkv4", mode=mode, impl=impl, device=case.device,
                                dtype=str(case.dtype).removeprefix("torch."), shape=s.name, B=s.batch, T=s.seqlen,
                                C=s.dim, r=s.rank, threads=torch.get_num_threads(), torch=torch.__version__, **extra)


def needs_cpu(case, impl):
    if impl == "hf" and case.device != "cpu":
        pytest.skip("transformers' recurrence is measured on the CPU only (its CUDA kernel is built at run time)")


def forward_bytes(case) -> int:
    """Bytes the forward must move: key and value read once, out written once (the
    dtype's size each), the float32 state [B, 3, C] written."""
    s = case.shape
    return 3 * s.batch * s.seqlen * s.dim * case.dtype.itemsize + 3 * s.batch * s.dim * 4


def record_bandwidth(benchmark, nbytes):
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 1)


@pytest.mark.parametrize("impl", ["prosg", "hf", "copy"])
def test_forward(benchmark, case, impl, timed):
    needs_cpu(case, impl)
    if impl == "copy" and case.device != "cuda":
        pytest.skip("the copy is the bandwidth reference of the CUDA forward")
    inp, _ = make_inputs(case)
    describe(benchmark, "fwd", case, impl)
    if impl == "copy":
        # A copy of n bytes reads n and writes n: copy half the forward's traffic.
        n = forward_bytes(case)
        src = torch.empty(n // 2, dtype=torch.uint8, device=case.device)
        dst = torch.empty_like(src)
        benchmark(timed(lambda: dst.copy_(src)))
        record_bandwidth(benchmark, 2 * (n // 2))
        return
    fn = prosg_op if impl == "prosg" else hf
    with torch.no_grad():
        if impl != "prosg":
            out, state = fn(**inp)
            check(prosg_op(**inp), (out, torch.stack(state, 1)), impl, case.dtype)
        benchmark(timed(lambda: fn(**inp)))
    if case.device == "cuda":
        record_bandwidth(benchmark, forward_bytes(case))


@pytest.mark.parametrize("impl", ["prosg", "hf"])
def test_forward_backward(benchmark, case, impl, timed):
    needs_cpu(case, impl)
    inp, _ = make_inputs(case, requires_grad=True)
    fn = prosg_op if impl == "prosg" else hf
    leaves = list(inp.values())
    s = case.shape
    grad_out = torch.randn(s.batch, s.seqlen, s.dim, device=case.device, dtype=case.dtype)

    def step():
        # autograd.grad, not backward(): nothing accumulates into .grad between rounds.
        return torch.autograd.grad(fn(**inp)[0], leaves, grad_out)

    describe(benchmark, "fwdbwd", case, impl)
    if impl == "hf":
        # One call is seconds (a Python loop of T steps forward and its autograd graph
        # backward); a second round adds nothing but minutes. Compare its gradients
        # with prosg's from the same call.
        got = benchmark.pedantic(timed(step), rounds=1, iterations=1)
        expected = torch.autograd.grad(prosg_op(**inp)[0], leaves, grad_out)
        for name, a, b in zip(inp, got, expected):
            err = relative_error(a, b)
            assert err < 1e-3, f"hf grad {name} disagrees with prosg: max relative error {err:.3g}"
    else:
        step()  # warm-up (thread pool, allocator)
        benchmark(timed(step))


@pytest.mark.parametrize("impl", ["fused", "materialized", "plain"])
def test_lowrank_forward(benchmark, case, impl, timed):
    inp, lr = make_inputs(case)
    td, tf, key, value = inp["time_decay"], inp["time_first"], inp["key"], inp["value"]

    def fused():
        return wkv4(td, tf, key, value, key_lowrank=(lr["key_z"], lr["key_u"]),
                    value_lowrank=(lr["value_z"], lr["value_u"]))

    def materialized():
        k = torch.baddbmm(key, lr["key_z"], lr["key_u"].transpose(1, 2))
        v = torch.baddbmm(value, lr["value_z"], lr["value_u"].transpose(1, 2))
        return wkv4(td, tf, k, v)

    def plain():
        return wkv4(td, tf, key, value)

    fn = dict(fused=fused, materialized=materialized, plain=plain)[impl]
    with torch.no_grad():
        if impl == "materialized":
            check(fused(), materialized(), impl, case.dtype)
        describe(benchmark, "lowrank-fwd", case, impl)
        benchmark(timed(fn))
    if case.device == "cuda":
        record_bandwidth(benchmark, forward_bytes(case))
