"""Tests of ``prosg.ops.lowrank_linear`` (``torch.ops.prosg.lowrank_linear`` and its
backward op) against the float64 reference ``prosg.reference.lowrank_linear_ref``.

Sizes are odd on purpose (Din=67 is no multiple of any SIMD width or CUDA tile; r=16
spans two CUDA rank tiles; Dout=129 spans two expand blocks of 256 threads only in the
large test, one partial block here), and the data are scaled so that every output is
O(1), which is what the tolerance table in ``tolerances.py`` assumes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close, tol

import prosg  # noqa: F401  (loads torch.ops.prosg)
from prosg.ops import lowrank_linear
from prosg.reference import lowrank_linear_ref

OP = torch.ops.prosg.lowrank_linear.default
BWD = torch.ops.prosg.lowrank_linear_backward.default
NAMES = ("x", "weight", "bias", "U", "V")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, T, Din, Dout, r, *, dtype=torch.float32, device="cpu", bias=True, delta=True):
    """Inputs with O(1) outputs: x ~ N(0, 1), W ~ N(0, 1/Din), U ~ N(0, 1/r),
    V ~ N(0, 1/Din). Drawn in float64 on the CPU, then converted, so every dtype and
    device sees the same values (up to rounding). ``T=None`` gives a 2-D x."""
    xs = (B, Din) if T is None else (B, T, Din)
    t = dict(x=torch.randn(xs, dtype=torch.float64),
             weight=torch.randn(Dout, Din, dtype=torch.float64) / math.sqrt(max(Din, 1)),
             bias=torch.randn(Dout, dtype=torch.float64) if bias else None,
             U=torch.randn(B, Dout, r, dtype=torch.float64) / math.sqrt(max(r, 1)) if delta else None,
             V=torch.randn(B, Din, r, dtype=torch.float64) / math.sqrt(max(Din, 1)) if delta else None)
    return {k: None if v is None else v.to(device=device, dtype=dtype) for k, v in t.items()}


def skip_unsupported(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only (the CUDA op rejects it, see test_float64_on_cuda_is_rejected)")


def leaves(inputs, dtype=None):
    """Fresh leaf copies requiring grad (optionally converted to ``dtype``)."""
    return {k: None if v is None else v.detach().to(dtype or v.dtype).clone().requires_grad_(True)
            for k, v in inputs.items()}


def check_against_reference(inputs, scale, dtype, grad_seed=1):
    """Forward and every gradient of the kernel versus the float64 reference's autograd."""
    kin = leaves(inputs)
    rin = leaves(inputs, torch.float64)  # the same (already rounded) values, in float64
    y = lowrank_linear(**kin, scale=scale)
    y_ref = lowrank_linear_ref(**rin, scale=scale)
    x = inputs["x"]
    assert y.dtype == x.dtype and y.device == x.device
    assert_close(y, y_ref, dtype, "y")

    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype).to(y.device)
    present = [k for k in NAMES if kin[k] is not None]
    grads = torch.autograd.grad(y, [kin[k] for k in present], g)
    grads_ref = torch.autograd.grad(y_ref, [rin[k] for k in present], g.double())
    for k, gk, gr in zip(present, grads, grads_ref):
        assert gk.dtype == inputs[k].dtype and gk.shape == inputs[k].shape, k
        assert_close(gk, gr, dtype, f"grad {k}")


CASES = {
    # name: (B, T, Din, Dout, r); T=None is a 2-D x [B, Din].
    "B3T33-67to45-r16": (3, 33, 67, 45, 16),
    "B3T1-67to129-r1": (3, 1, 67, 129, 1),
    "B3-2d-67to129-r16": (3, None, 67, 129, 16),
    # Up to 16 float32 rows run the CPU's own projection kernel (pairs of rows against
    # 6 columns of W, one row against 8; lowrank_linear_cpu.cpp): one row, 16 rows
    # (T=1 and 2-D), and 17 rows (ATen's GEMM again), with column and Din tails.
    "B1-2d-67to45-r4": (1, None, 67, 45, 4),
    "B16T1-35to29-r2": (16, 1, 35, 29, 2),
    "B2T8-64to13-r3": (2, 8, 64, 13, 3),
    "B17-2d-35to29-r2": (17, None, 35, 29, 2),
    # Under 4 rows per sample the CPU's shrink reads V unpacked, lanes over the rank in
    # passes of up to 32 (r=40: a full pass and a partial one); a rank that is a
    # multiple of 8 packs the factors by 8 x 8 transposes (tails of Din and Dout).
    "B2T3-37to70-r40": (2, 3, 37, 70, 40),
    "B3T5-37to70-r8": (3, 5, 37, 70, 8),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("delta", [True, False], ids=["UV", "noUV"])
def test_matches_reference(device, dtype, case, bias, delta, poison_cuda_cache):
    skip_unsupported(device, dtype)
    if device == "cuda":
        poison_cuda_cache()
    inputs = make_inputs(*CASES[case], dtype=dtype, device=device, bias=bias, delta=delta)
    before = {k: v.clone() for k, v in inputs.items() if v is not None}
    check_against_reference(inputs, scale=-0.7, dtype=dtype)
    for k, v in before.items():  # the op never writes to its inputs
        assert torch.equal(inputs[k], v), f"{k} was modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_delta_or_zero_scale_is_plain_linear(device, dtype):
    """No U/V, or scale=0, is exactly F.linear: the low-rank term adds +0 to the GEMM."""
    inp = make_inputs(3, 33, 67, 45, 16, dtype=dtype, device=device)
    expected = F.linear(inp["x"], inp["weight"], inp["bias"])
    assert torch.equal(lowrank_linear(inp["x"], inp["weight"], inp["bias"]), expected)
    assert torch.equal(lowrank_linear(**inp, scale=0.0), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("two_d", [False, True], ids=["3d", "2d"])
def test_non_contiguous_inputs(device, dtype, two_d):
    """Transposed, sliced and batch-broadcast (stride 0) inputs give the contiguous
    result, forward and backward."""
    B, T, Din, Dout, r = 3, 33, 67, 45, 16
    dev = dict(device=device, dtype=dtype)
    if two_d:
        x = torch.randn(Din, 2 * B, **dev).t()[::2]  # [B, Din], strides (2, 2B)
    else:
        x = torch.randn(B, Din, 2 * T, **dev).transpose(1, 2)[:, ::2]  # [B, T, Din], dim stride 2T
    weight = (torch.randn(Din, Dout, **dev) / math.sqrt(Din)).t()  # column-major
    bias = torch.randn(2 * Dout, **dev)[::2]
    U = (torch.randn(B, r, Dout, **dev) / math.sqrt(r)).transpose(1, 2)  # rank-major
    V = (torch.randn(2 * B, Din, 2 * r, **dev) / math.sqrt(Din))[::2, :, 1::2]  # every stride odd-ish
    for name, t in dict(x=x, weight=weight, bias=bias, U=U, V=V).items():
        assert not t.is_contiguous(), name
    strided = dict(x=x, weight=weight, bias=bias, U=U, V=V)
    dense = {k: v.contiguous() for k, v in strided.items()}

    def run(inp):
        lv = leaves(inp)
        y = lowrank_linear(**lv, scale=1.3)
        g = torch.linspace(-1, 1, y.numel(), device=device, dtype=torch.float32).reshape(y.shape).to(dtype)
        return (y, *torch.autograd.grad(y, [lv[k] for k in NAMES], g))

    for k, a, e in zip(("y",) + NAMES, run(strided), run(dense)):
        assert_close(a, e, dtype, f"strided vs contiguous: {k}")
    check_against_reference(strided, 1.3, dtype)

    # One U shared by the batch, broadcast with batch stride 0; its gradient sums.
    u = (torch.randn(1, Dout, r, **dev) / math.sqrt(r)).requires_grad_(True)
    y = lowrank_linear(x, weight, bias, u.expand(B, Dout, r), V, scale=1.3)
    g = torch.randn_like(y)
    (gu,) = torch.autograd.grad(y, [u], g)
    u_ref = u.detach().double().requires_grad_(True)
    y_ref = lowrank_linear_ref(x, weight, bias, u_ref.expand(B, Dout, r), V, scale=1.3)
    (gu_ref,) = torch.autograd.grad(y_ref, [u_ref], g.double())
    assert_close(y, y_ref, dtype, "y with broadcast U")
    # Autograd sums the per-sample gradients, each already rounded to dtype and O(sqrt(T))
    # large, in dtype: the error is relative to the summands, not to their sum.
    assert_close(gu, gu_ref, dtype, "grad of broadcast U", atol=tol(dtype)["atol"] * gu_ref.abs().max().item())


@pytest.mark.parametrize("layout", ["2d-row-stride", "3d-row-stride", "3d-two-strides"])
def test_small_batch_strided_rows(layout):
    """The CPU's small-batch kernel reads rows any stride apart (x sliced out of a wider
    buffer); rows that are not one stride apart ([B, T] of a transposed buffer) go to
    ATen's GEMM. Both against the reference, forward and backward."""
    Din, Dout = 37, 23
    if layout == "2d-row-stride":
        x = torch.randn(5, 2 * Din)[:, :Din]
    elif layout == "3d-row-stride":
        x = torch.randn(2, 3, 2 * Din)[..., :Din]
    else:
        x = torch.randn(3, 2, Din).transpose(0, 1)
    assert not x.is_contiguous() and x.stride(-1) == 1
    B = x.shape[0]
    inputs = dict(x=x, weight=torch.randn(Dout, Din) / math.sqrt(Din), bias=torch.randn(Dout),
                  U=torch.randn(B, Dout, 2) / 2**0.5, V=torch.randn(B, Din, 2) / math.sqrt(Din))
    check_against_reference(inputs, scale=0.9, dtype=torch.float32)
    check_against_reference({**inputs, "U": None, "V": None}, scale=1.0, dtype=torch.float32)


def test_broadcast_grad_out(device):
    """``y.sum().backward()`` hands the backward an expanded (all strides 0) grad_out."""
    inp = make_inputs(3, 33, 67, 45, 16, device=device)
    kin, rin = leaves(inp), leaves(inp, torch.float64)
    lowrank_linear(**kin, scale=0.6).sum().backward()
    lowrank_linear_ref(**rin, scale=0.6).sum().backward()
    for k in NAMES:
        ref = rin[k].grad
        # Sums of up to 99 rows: scale atol with the largest value (see test_large).
        assert_close(kin[k].grad, ref, torch.float32, f"grad {k}", atol=tol(torch.float32)["atol"] * ref.abs().max().item())


def test_backward_output_mask(device):
    """Each gradient alone equals the same gradient computed with all the others;
    unrequested gradients, and those of absent U/V, are empty [0] tensors."""
    inp = make_inputs(3, 5, 7, 6, 2, device=device)
    x, w, U, V = inp["x"], inp["weight"], inp["U"], inp["V"]
    g = torch.randn(3, 5, 6, device=device)
    full = BWD(g, x, w, U, V, 0.5, [True] * 5)
    assert [tuple(t.shape) for t in full] == [(3, 5, 7), (6, 7), (6,), (3, 6, 2), (3, 7, 2)]
    for i in range(5):
        mask = [j == i for j in range(5)]
        out = BWD(g, x, w, U, V, 0.5, mask)
        for j in range(5):
            if j == i:
                assert_close(out[j], full[j], torch.float32, f"{NAMES[j]} alone")
            else:
                assert out[j].shape == (0,), f"{NAMES[j]} not requested but has shape {tuple(out[j].shape)}"
    out = BWD(g, x, w, None, None, 0.5, [True] * 5)
    assert out[3].shape == (0,) and out[4].shape == (0,)


def test_partial_requires_grad(device):
    """Any subset of inputs requiring grad gets the gradients of the full run."""
    inp = make_inputs(2, 9, 11, 13, 3, device=device)
    full = leaves(inp)
    y = lowrank_linear(**full, scale=2.0)
    g = torch.randn_like(y)
    ref = dict(zip(NAMES, torch.autograd.grad(y, [full[k] for k in NAMES], g)))
    for subset in (["x"], ["weight"], ["bias"], ["U"], ["V"], ["x", "V"], ["U", "V"]):
        part = {k: v.detach().clone().requires_grad_(k in subset) for k, v in inp.items()}
        y = lowrank_linear(**part, scale=2.0)
        for k, gk in zip(subset, torch.autograd.grad(y, [part[k] for k in subset], g)):
            assert torch.equal(gk, ref[k]), f"grad {k} with only {subset} requiring grad"


@pytest.mark.parametrize(
    "B,T,Din,Dout,r,bias,delta",
    [(2, 3, 5, 4, 2, True, True), (3, None, 4, 5, 3, True, True), (2, 3, 5, 4, 0, True, False),
     (1, 2, 3, 4, 1, False, True)],
    ids=["3d", "2d", "noUV", "nobias"],
)
def test_gradcheck(B, T, Din, Dout, r, bias, delta):
    inp = leaves(make_inputs(B, T, Din, Dout, r, dtype=torch.float64, bias=bias, delta=delta))
    present = [k for k in NAMES if inp[k] is not None]

    def f(*args):
        kw = dict(inp)
        kw.update(zip(present, args))
        return lowrank_linear(**kw, scale=-0.7)

    assert torch.autograd.gradcheck(f, [inp[k] for k in present])


def _opcheck_forward_samples(device):
    out = []
    for shape, bias, delta, dtype in [((2, 3, 5, 4, 2), True, True, torch.float32),
                                      ((3, None, 4, 5, 3), False, True, torch.float32),
                                      ((2, 3, 5, 4, 2), True, False, torch.float32),
                                      ((2, 3, 5, 4, 2), True, True, torch.bfloat16)]:
        inp = make_inputs(*shape, dtype=dtype, device=device, bias=bias, delta=delta)
        # Autograd registration is only exercised when something requires grad.
        out.append(tuple(leaves(inp)[k] if k in ("x", "U") and inp[k] is not None else inp[k] for k in NAMES))
    return out


def test_opcheck(device):
    for args in _opcheck_forward_samples(device):
        torch.library.opcheck(OP, (*args, 0.5))
    for mask in ([True] * 5, [True, False, True, False, True], [False, True, False, True, False]):
        for shape, delta in [((2, 3, 5, 4, 2), True), ((3, None, 4, 5, 3), True), ((2, 3, 5, 4, 2), False)]:
            inp = make_inputs(*shape, device=device, delta=delta)
            g = torch.randn((*inp["x"].shape[:-1], shape[3]), device=device)
            torch.library.opcheck(BWD, (g, inp["x"], inp["weight"], inp["U"], inp["V"], 0.5, mask))


# inductor compiles kernels at run time (Triton on CUDA): marked jit, which the GPU
# check deselects to keep its minutes for prosg's own kernels.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.jit)])
def test_torch_compile_fullgraph(device, backend):
    """The op traces into one graph (fake kernel + registered autograd) and the compiled
    forward and backward match eager."""
    torch._dynamo.reset()

    def f(x, weight, bias, U, V):
        y = lowrank_linear(x, weight, bias, U, V, scale=0.5)
        return torch.tanh(y).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    # The recompile for a new T (dynamic shapes through the fake kernel) is checked with
    # aot_eager only: a second inductor compilation costs ~7 s on 2 cores.
    for T in (7, 12) if backend == "aot_eager" else (7,):
        inp = make_inputs(2, T, 9, 10, 3, device=device)
        a, e = leaves(inp), leaves(inp)
        la, le = compiled(**a), f(**e)
        assert_close(la, le, torch.float32, f"compiled loss T={T}")
        ga = torch.autograd.grad(la, [a[k] for k in NAMES])
        ge = torch.autograd.grad(le, [e[k] for k in NAMES])
        for k, x1, x2 in zip(NAMES, ga, ge):
            assert_close(x1, x2, torch.float32, f"compiled grad {k} T={T}")


def _bad(**changes):
    """Valid CPU float32 arguments (B=3, T=4, Din=5, Dout=6, r=2) with some replaced."""
    inp = make_inputs(3, 4, 5, 6, 2)
    inp.update(changes)
    return inp


BAD_INPUTS = {
    "x 4-D": (lambda: _bad(x=torch.randn(3, 4, 5, 1)), r"x must have shape \[B, T, Din\] or \[B, Din\], got \[3, 4, 5, 1\]"),
    "x 1-D": (lambda: _bad(x=torch.randn(5)), r"x must have shape .*got \[5\]"),
    "x integer": (lambda: _bad(x=torch.ones(3, 4, 5, dtype=torch.int32)), r"x must be float32, float16 or bfloat16.*Int"),
    "weight Din": (lambda: _bad(weight=torch.randn(6, 4)), r"weight must have shape \[\*, 5\], got \[6, 4\]"),
    "weight 1-D": (lambda: _bad(weight=torch.randn(6)), r"weight must have shape \[Dout, 5\], got \[6\]"),
    "weight dtype": (lambda: _bad(weight=torch.randn(6, 5, dtype=torch.float16)), r"weight must have dtype Float, got Half"),
    "bias shape": (lambda: _bad(bias=torch.randn(5)), r"bias must have shape \[6\], got \[5\]"),
    "bias dtype": (lambda: _bad(bias=torch.randn(6, dtype=torch.float64)), r"bias must have dtype Float, got Double"),
    "U without V": (lambda: _bad(V=None), r"U and V must be given together \(got U without V\)"),
    "V without U": (lambda: _bad(U=None), r"U and V must be given together \(got V without U\)"),
    "U/V rank": (lambda: _bad(V=torch.randn(3, 5, 3)), r"U and V must have the same rank r, got U \[3, 6, 2\] \(r=2\) and V \[3, 5, 3\] \(r=3\)"),
    "U batch": (lambda: _bad(U=torch.randn(2, 6, 2)), r"U must have shape \[3, 6, 2\], got \[2, 6, 2\]"),
    "V batch": (lambda: _bad(V=torch.randn(4, 5, 2)), r"V must have shape \[3, 5, 2\], got \[4, 5, 2\]"),
    "U Dout": (lambda: _bad(U=torch.randn(3, 7, 2)), r"U must have shape \[3, 6, 2\], got \[3, 7, 2\]"),
    "V Din": (lambda: _bad(V=torch.randn(3, 4, 2)), r"V must have shape \[3, 5, 2\], got \[3, 4, 2\]"),
    "U 2-D": (lambda: _bad(U=torch.randn(6, 2)), r"U must have shape \[B=3, Dout=6, r\], got \[6, 2\]"),
    "V dtype": (lambda: _bad(V=torch.randn(3, 5, 2, dtype=torch.bfloat16)), r"V must have dtype Float, got BFloat16"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    make, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=r"prosg\.lowrank_linear: " + match):
        lowrank_linear(**make(), scale=0.5)


def test_bad_grad_out():
    inp = make_inputs(3, 4, 5, 6, 2)
    with pytest.raises(ValueError, match=r"prosg\.lowrank_linear_backward: grad_out must have shape \[3, 4, 6\], got \[3, 4, 5\]"):
        BWD(torch.randn(3, 4, 5), inp["x"], inp["weight"], inp["U"], inp["V"], 1.0, [True] * 5)
    with pytest.raises(ValueError, match=r"prosg\.lowrank_linear_backward: grad_out must have dtype Float, got Half"):
        BWD(torch.randn(3, 4, 6).half(), inp["x"], inp["weight"], inp["U"], inp["V"], 1.0, [True] * 5)


@pytest.mark.cuda
def test_float64_on_cuda_is_rejected():
    inp = make_inputs(3, 4, 5, 6, 2, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=r"x must be float32, float16 or bfloat16, got Double"):
        lowrank_linear(**inp)


@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["x", "weight", "bias", "U", "V"])
def test_device_mix_is_rejected(moved):
    """One argument on the CPU, the others on CUDA: the error names it (or, when x is
    the odd one out, names weight, the first argument checked against x)."""
    inp = make_inputs(3, 4, 5, 6, 2, device="cuda")
    inp[moved] = inp[moved].cpu()
    name = "weight" if moved == "x" else moved
    with pytest.raises(ValueError, match=rf"prosg\.lowrank_linear: {name} must be on the same device as x"):
        lowrank_linear(**inp)


@pytest.mark.cuda
def test_cuda_side_stream():
    """Work is queued on the current stream: a side stream gives the default stream's result."""
    inp = make_inputs(3, 33, 67, 45, 16, device="cuda")
    expected = lowrank_linear(**inp, scale=0.3)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = lowrank_linear(**inp, scale=0.3)
    s.synchronize()
    assert torch.equal(y, expected)


@pytest.mark.parametrize(
    "B,T,Din,Dout,r,two_d",
    [(0, 5, 7, 6, 2, False), (0, None, 7, 6, 2, True), (3, 0, 7, 6, 2, False), (3, 5, 0, 6, 2, False),
     (3, 5, 7, 0, 2, False), (3, 5, 7, 6, 0, False)],
    ids=["B0", "B0-2d", "T0", "Din0", "Dout0", "r0"],
)
def test_empty(device, B, T, Din, Dout, r, two_d):
    """Empty dimensions give correctly shaped (zero or bias-only) outputs and gradients."""
    inputs = make_inputs(B, T, Din, Dout, r, device=device)
    check_against_reference(inputs, 0.5, torch.float32)


def test_large(device):
    """Rows spread over many parallel chunks / CUDA blocks, r over several rank tiles,
    Dout over several expand blocks."""
    B, T, Din, Dout, r = 2, 300, 1024, 1031, 40
    inp = make_inputs(B, T, Din, Dout, r, device=device)
    y = lowrank_linear(**inp, scale=0.9)
    y_ref = lowrank_linear_ref(**{k: v.double() for k, v in inp.items()}, scale=0.9)
    assert_close(y, y_ref, torch.float32, "large y")
    g = torch.randn_like(y)
    gx, gw, gb, gu, gv = BWD(g, inp["x"], inp["weight"], inp["U"], inp["V"], 0.9, [True] * 5)
    gd = g.double()
    xd, Ud, Vd = inp["x"].double(), inp["U"].double(), inp["V"].double()
    expected = {
        # The float64 formulas: dx = g W + scale (g U_b) V_b^T, dU_b = scale g_b^T (x_b V_b),
        # dV_b = scale x_b^T (g_b U_b).
        "x": (gx, gd @ inp["weight"].double() + 0.9 * (gd @ Ud) @ Vd.transpose(1, 2)),
        "U": (gu, 0.9 * gd.transpose(1, 2) @ (xd @ Vd)),
        "V": (gv, 0.9 * xd.transpose(1, 2) @ (gd @ Ud)),
    }
    for k, (a, e) in expected.items():
        # Sums over T=300 rows of O(sqrt(Dout)) terms are O(100), not O(1): the
        # accumulation error scales with the largest value, so atol does too.
        assert_close(a, e, torch.float32, f"large grad {k}", atol=tol(torch.float32)["atol"] * e.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_threads_agree(dtype, num_threads):
    """The CPU kernels split rows between threads and never split a reduction, so the
    result does not depend on the thread count."""
    inp = make_inputs(4, 65, 67, 129, 16, dtype=dtype)
    g = torch.randn(4, 65, 129, dtype=torch.float64).to(dtype)
    results = []
    for n in (1, 2):
        with num_threads(n):
            y = OP(inp["x"], inp["weight"], inp["bias"], inp["U"], inp["V"], 0.7)
            grads = BWD(g, inp["x"], inp["weight"], inp["U"], inp["V"], 0.7, [True] * 5)
        results.append((y, *grads))
    for k, a, b in zip(("y",) + NAMES, *results):
        assert torch.equal(a, b), f"{k} differs between 1 and 2 threads: max |diff| {(a - b).abs().max().item()}"
