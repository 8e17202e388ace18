"""Tests of ``prosg.ops.wkv7`` (``torch.ops.prosg.wkv7`` and its backward op) against
the float64 reference ``prosg.reference.wkv7_ref``, the ``rwkv`` package's x070
recurrence and flash-linear-attention's naive generalized-delta-rule recurrence.

Sizes are odd on purpose: B=5, H=3 and T=1 or T=257 at N=16 (257 steps span 17 of the
backward's 16-step checkpoint segments, the last one a single step), and every
supported head size N in {16, 32, 64, 128} (one template instantiation each; with
AVX2 a row is 2 to 16 vector registers).

Inputs are drawn in float64 and converted, so the reference sees exactly the values
the kernel sees. They follow RWKV-7's model: r, k ~ N(0, 1/N), v ~ N(0, 1), the
log-log decay w uniform in [-6, 1] (per-step decays from 0.9975 down to 0.066), and
the stable pair a = -kk, b = kk * sigma with kk unit-norm per head and sigma in [0, 1].
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch
from tolerances import assert_close, tol

import prosg  # noqa: F401  (loads torch.ops.prosg)
from prosg.numerics import accumulation_dtype
from prosg.ops import wkv7
from prosg.reference import wkv7_ref

OP = torch.ops.prosg.wkv7.default
BWD = torch.ops.prosg.wkv7_backward.default
NAMES = ("r", "w", "k", "v", "a", "b", "state")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, T, H, N, *, dtype=torch.float32, device="cpu", state=True, w_range=(-6.0, 1.0), kv_scale=1.0):
    """A dict of the op's arguments by NAMES (state None unless asked for)."""
    f64 = dict(dtype=torch.float64)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, **f64), dim=-1)
    t = dict(
        r=torch.randn(B, T, H, N, **f64) / N**0.5,
        w=torch.empty(B, T, H, N, **f64).uniform_(*w_range),
        k=kv_scale * torch.randn(B, T, H, N, **f64) / N**0.5,
        v=kv_scale * torch.randn(B, T, H, N, **f64),
        a=-kk,
        b=kk * torch.rand(B, T, H, N, **f64),
        state=0.5 * torch.randn(B, H, N, N, **f64) if state else None,
    )
    dtypes = dict(state=accumulation_dtype(dtype))
    return {k: None if v is None else v.to(device=device, dtype=dtypes.get(k, dtype)) for k, v in t.items()}


def call(fn, inp):
    return fn(*(inp[k] for k in NAMES))


def leaves(inp, dtype=None):
    return {k: None if v is None else v.detach().to(dtype or v.dtype).clone().requires_grad_(True)
            for k, v in inp.items()}


def present(inp):
    return [k for k in NAMES if inp[k] is not None]


def cotangents(out, state_out, seed=1):
    """Random dL/dout and dL/dstate_out (drawn on the CPU so every device gets the same)."""
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    g_state = torch.randn(state_out.shape, generator=gen, dtype=torch.float64).to(state_out.dtype).to(out.device)
    return g_out, g_state


@contextlib.contextmanager
def one_thread():
    """The step-by-step reference on one intra-op thread (its small per-step ops only
    pay OpenMP barriers on more)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run(fn, inp, g_out=None, g_state=None, dtype=None):
    """``(out, state_out, {name: grad})`` for the loss <out, g_out> + <state_out, g_state>."""
    ctx = one_thread() if fn is wkv7_ref else contextlib.nullcontext()
    with ctx:
        lv = leaves(inp, dtype)
        out, state_out = call(fn, lv)
        if g_out is None:
            g_out, g_state = cotangents(out, state_out)
        names = present(inp)
        pairs = [(y, g.to(y.dtype)) for y, g in ((out, g_out), (state_out, g_state)) if y.requires_grad]
        grads = torch.autograd.grad([y for y, _ in pairs], [lv[k] for k in names], [g for _, g in pairs],
                                    allow_unused=True, materialize_grads=True)
    return out, state_out, dict(zip(names, grads))


def check(actual, expected, what, dtype=None, scale=None):
    """``actual`` against the float64 ``expected`` with the tolerance of the precision
    ``actual`` was produced in (the state and its gradient: float32 for half inputs).
    As in test_wkv4.py, atol scales with the largest entry of the reference: the
    state and the gradients of r, k, a, b, w are sums over the N value rows (and the
    state's gradient over time) of O(1) terms, so their rounding error is relative to
    that scale; an indexing or recurrence bug is O(1) there and still fails."""
    dtype = dtype or actual.dtype
    if scale is None:
        scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    assert_close(actual, expected, dtype, what, atol=tol(dtype)["atol"] * scale)


def check_against_reference(inp, what=""):
    out, st, grads = run(wkv7, inp)
    r = inp["r"]
    B, T, H, N = r.shape
    assert out.dtype == r.dtype and out.device == r.device and out.shape == r.shape
    assert st.dtype == accumulation_dtype(r.dtype) and st.shape == (B, H, N, N)
    g_out, g_state = cotangents(out, st)
    ref_out, ref_st, ref_grads = run(wkv7_ref, inp, g_out.double(), g_state.double(), torch.float64)
    check(out, ref_out, f"{what}out")
    check(st, ref_st, f"{what}state_out")
    for k in present(inp):
        assert grads[k].dtype == inp[k].dtype and grads[k].shape == inp[k].shape, k
        check(grads[k], ref_grads[k], f"{what}grad {k}")
    return out, st, grads


def skip_unsupported(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only (the CUDA op rejects it, see test_float64_on_cuda_is_rejected)")


CASES = {
    # name: (B, T, H, N)
    "B2-T33-H3-N16": (2, 33, 3, 16),
    "B5-T1-H3-N16": (5, 1, 3, 16),
    "B1-T257-H3-N16": (1, 257, 3, 16),
    "B2-T20-H2-N32": (2, 20, 2, 32),
    "B1-T17-H2-N64": (1, 17, 2, 64),
    "B1-T9-H1-N128": (1, 9, 1, 128),
}
REFERENCE_PARAMS = [
    pytest.param(case, dtype, state, id=f"{case}-{str(dtype).removeprefix('torch.')}-{'state' if state else 'nostate'}")
    for case in CASES for dtype in DTYPES for state in (True, False)
    # Every case in float32; the other dtypes only change loads, stores and roundings.
    if dtype == torch.float32 or (case in ("B2-T33-H3-N16", "B1-T17-H2-N64") and state)
]


@pytest.mark.parametrize("case,dtype,state", REFERENCE_PARAMS)
def test_matches_reference(device, case, dtype, state, poison_cuda_cache):
    """out, state_out and every gradient (the loss uses state_out too) against the
    float64 reference's autograd."""
    skip_unsupported(device, dtype)
    if device == "cuda":
        poison_cuda_cache()  # a position the kernel leaves unwritten reads as NaN
    inp = make_inputs(*CASES[case], dtype=dtype, device=device, state=state)
    before = {k: v.clone() for k, v in inp.items() if v is not None}
    check_against_reference(inp)
    for k, v in before.items():  # the op never writes to its inputs
        assert torch.equal(inp[k], v), f"{k} was modified"


def test_non_contiguous_inputs(device):
    """Transposed, sliced and batch-broadcast (stride 0) inputs and cotangents give the
    contiguous result, forward and backward; an expanded input's gradient sums."""
    B, T, H, N = 3, 20, 2, 16
    dense = make_inputs(B, T, H, N, device=device)
    strided = {
        "r": dense["r"].transpose(1, 3).contiguous().transpose(1, 3),  # time innermost
        "w": torch.stack([dense["w"], -dense["w"]], 4)[..., 0],  # key stride 2
        "k": dense["k"].transpose(0, 2).contiguous().transpose(0, 2),
        "v": torch.cat([dense["v"], dense["v"]], 3)[..., N:],  # offset N, head stride 2N
        "a": dense["a"].transpose(2, 3).contiguous().transpose(2, 3),
        "b": dense["b"],  # contiguous: strided and contiguous arguments mix
        "state": dense["state"].transpose(2, 3).contiguous().transpose(2, 3),
    }
    for k in ("r", "w", "k", "v", "a", "state"):
        assert not strided[k].is_contiguous(), k
        assert torch.equal(strided[k], dense[k]), k
    g_out, g_state = cotangents(dense["r"], dense["state"])

    def everything(inp, go):
        lv = leaves(inp)
        out, st = call(wkv7, lv)
        return (out, st, *torch.autograd.grad((out, st), [lv[k] for k in NAMES], (go, g_state)))

    go_t = g_out.transpose(1, 3).contiguous().transpose(1, 3)
    for k, x, y in zip(("out", "state_out") + NAMES, everything(strided, go_t), everything(dense, g_out)):
        check(x, y, f"strided vs contiguous: {k}", dtype=torch.float32)
    check_against_reference(strided, what="strided: ")

    # One decay w and one a shared by the batch (expanded, batch stride 0), and a
    # plain-sum loss (expanded cotangents).
    w1 = dense["w"][:1].clone().requires_grad_(True)
    w1_ref = w1.detach().double().requires_grad_(True)
    lv = leaves(dense)
    out, st = call(wkv7, {**lv, "w": w1.expand(B, T, H, N)})
    (out.sum() + st.sum()).backward()
    with one_thread():
        lr = leaves(dense, torch.float64)
        out_r, st_r = call(wkv7_ref, {**lr, "w": w1_ref.expand(B, T, H, N)})
        (out_r.sum() + st_r.sum()).backward()
    check(out, out_r, "out with expanded w")
    check(w1.grad, w1_ref.grad, "grad of expanded w")
    for k in ("r", "k", "v", "a", "b", "state"):
        check(lv[k].grad, lr[k].grad, f"sum() loss: grad {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("initial_state", [True, False], ids=["state", "nostate"])
def test_chunked_continuation(device, dtype, initial_state, poison_cuda_cache):
    """T in pieces with the state carried gives one call's outputs, final state and
    gradients (the initial state's included). The loss uses every piece's outputs and
    only the final state, so the earlier pieces' gradients flow back through the
    carried state alone."""
    skip_unsupported(device, dtype)
    B, T, H, N = 2, 50, 3, 16
    pieces = [17, 1, 32]
    inp = make_inputs(B, T, H, N, dtype=dtype, device=device, state=initial_state)
    if device == "cuda":
        poison_cuda_cache()
    whole_out, whole_st, whole = run(wkv7, inp)
    g_out, g_state = cotangents(whole_out, whole_st)
    lv = leaves(inp)
    outs, st, t0 = [], lv["state"], 0
    for n in pieces:
        sl = slice(t0, t0 + n)
        o, st = wkv7(*(lv[k][:, sl] for k in NAMES[:6]), st)
        outs.append(o)
        t0 += n
    out = torch.cat(outs, 1)
    names = present(inp)
    grads = dict(zip(names, torch.autograd.grad((out, st), [lv[k] for k in names], (g_out, g_state))))
    # The carried state is the kernel's own float32 (float64) state, bit for bit.
    assert torch.equal(out, whole_out) and torch.equal(st, whole_st)
    for k in names:
        check(grads[k], whole[k], f"pieces: grad {k}")


def test_partial_outputs(device):
    """A loss on out alone (on state_out alone) gets the gradients of a zero cotangent
    for the other output; a subset of inputs requiring grad gets the full run's."""
    inp = make_inputs(2, 12, 2, 16, device=device)
    out, st = call(wkv7, inp)
    g_out, g_state = cotangents(out, st)
    _, _, full_out = run(wkv7, inp, g_out, torch.zeros_like(g_state))
    _, _, full_state = run(wkv7, inp, torch.zeros_like(g_out), g_state)
    for only, cot, full in (("out", g_out, full_out), ("state_out", g_state, full_state)):
        lv = leaves(inp)
        y = call(wkv7, lv)[0 if only == "out" else 1]
        for k, g in zip(NAMES, torch.autograd.grad(y, [lv[k] for k in NAMES], cot)):
            assert torch.equal(g, full[k]), f"grad {k} of a loss on {only} alone"
    _, _, full = run(wkv7, inp, g_out, g_state)
    for subset in (["w"], ["state"], ["a", "v"]):
        part = {k: v.detach().clone().requires_grad_(k in subset) for k, v in inp.items()}
        for k, g in zip(subset, torch.autograd.grad(call(wkv7, part), [part[k] for k in subset], (g_out, g_state))):
            assert torch.equal(g, full[k]), f"grad {k} with only {subset} requiring grad"


@pytest.mark.parametrize("B,T,H,state", [(1, 3, 1, True), (2, 2, 2, False)], ids=["state", "nostate"])
def test_gradcheck(B, T, H, state):
    """Every gradient, the initial state's included, against finite differences in float64."""
    inp = leaves(make_inputs(B, T, H, 16, dtype=torch.float64, state=state))
    names = present(inp)

    def f(*args):
        return call(wkv7, {**inp, **dict(zip(names, args))})

    assert torch.autograd.gradcheck(f, [inp[k] for k in names])


def test_decay_extremes_are_finite(device):
    """w = +-60 (d = 0, d = 1 in float32) and +-1e4: no inf or NaN anywhere, the
    gradient of w vanishes at both ends (d is flat there), and everything else is as
    the reference. (At w = 1e4 the reference's autograd itself gives NaN, exp(w) * d =
    inf * 0, which is what the kernel's exp(w - exp(w)) avoids: w there is checked
    by hand.)"""
    inp = make_inputs(1, 8, 2, 16, device=device)
    w = inp["w"].clone()
    w[..., :4] = 60.0
    w[..., 4:8] = -60.0
    w[..., 8] = 1e4
    w[..., 9] = -1e4
    inp["w"] = w
    out, st, grads = run(wkv7, inp)
    ref_out, ref_st, ref = run(wkv7_ref, inp, *(g.double() for g in cotangents(out, st)), dtype=torch.float64)
    check(out, ref_out, "out")
    check(st, ref_st, "state_out")
    for k, g in grads.items():
        assert torch.isfinite(g).all(), k
        if k != "w":
            check(g, ref[k], f"grad {k}")
    check(grads["w"][..., :8], ref["w"][..., :8], "grad w at +-60")
    check(grads["w"][..., 10:], ref["w"][..., 10:], "grad w")
    assert grads["w"][..., :10].abs().max() < 1e-20


def _op_args(inp):
    return tuple(inp[k] for k in NAMES)


def test_opcheck(device):
    samples = [make_inputs(2, 5, 3, 16, device=device),
               make_inputs(1, 3, 1, 32, dtype=torch.bfloat16, device=device, state=False)]
    for inp in samples:
        torch.library.opcheck(OP, _op_args(inp))
        lv = {k: v if v is None or k not in ("r", "w", "state") else v.clone().requires_grad_(True)
              for k, v in inp.items()}
        torch.library.opcheck(OP, _op_args(lv))
        out, st = OP(*_op_args(inp))
        torch.library.opcheck(BWD, (*_op_args(inp), *cotangents(out, st)))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.jit)])
def test_torch_compile_fullgraph(device, backend):
    """The op traces into one graph (fake kernels + registered autograd) and the
    compiled forward and backward match eager."""
    torch._dynamo.reset()

    def f(r, w, k, v, a, b, state):
        out, st = wkv7(r, w, k, v, a, b, state)
        return torch.tanh(out).sum() + (st * st).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    for T in (5, 9) if backend == "aot_eager" else (5,):
        inp = make_inputs(2, T, 2, 16, device=device)
        x, y = leaves(inp), leaves(inp)
        lx, ly = compiled(*_op_args(x)), f(*_op_args(y))
        check(lx, ly, f"compiled loss T={T}")
        for k, g1, g2 in zip(NAMES, torch.autograd.grad(lx, _op_args(x)), torch.autograd.grad(ly, _op_args(y))):
            check(g1, g2, f"compiled grad {k} T={T}")


def test_long_sequence_is_stable(device):
    """T = 100,000 with decays near 1 (w in [-12, -10]: d = 1 - 6e-6 .. 1 - 5e-5, a
    memory of ~10^5 steps) for the first half and near 0 (w in [2, 3]: d < 6e-4) for
    the second, |k|, |v| up to 10: out, state_out and every gradient stay finite and
    match the float64 kernel over the whole length (the float32 rounding does not
    grow with T; the float64 kernel is the one checked against the reference above),
    and the float64 reference itself over the first 3000 steps (the step-by-step
    Python reference takes 20 s for all 100k)."""
    B, T, H, N = 1, 100_000, 1, 16
    inp = make_inputs(B, T, H, N, device=device)
    gen = torch.Generator().manual_seed(5)
    kv = torch.rand(2, B, T, H, N, generator=gen, dtype=torch.float64) * 20 - 10
    inp["k"], inp["v"] = kv[0].float().to(device), kv[1].float().to(device)
    half = T // 2
    inp["w"][:, :half].uniform_(-12.0, -10.0)
    inp["w"][:, half:].uniform_(2.0, 3.0)
    started = time.perf_counter()
    out, st, grads = run(wkv7, inp)
    elapsed = time.perf_counter() - started
    assert torch.isfinite(out).all() and torch.isfinite(st).all()
    for k, g in grads.items():
        assert torch.isfinite(g).all(), f"grad {k} is not finite"
    g_out, g_state = cotangents(out, st)
    cpu64 = {k: v.double().cpu() for k, v in inp.items()}
    ref_out, ref_st, ref = run(wkv7, cpu64, g_out.double().cpu(), g_state.double().cpu())
    check(out, ref_out, "out over 100k steps vs the float64 kernel")
    check(st, ref_st, "state_out over 100k steps vs the float64 kernel")
    for k, g in grads.items():
        check(g, ref[k], f"grad {k} over 100k steps vs the float64 kernel")
    with torch.no_grad(), one_thread():
        head_out, _ = call(wkv7_ref, {k: v if k == "state" else v[:, :3000] for k, v in cpu64.items()})
    check(out[:, :3000], head_out, "out over the first 3000 steps vs the reference")
    assert elapsed < 30, f"forward + backward over T=100k took {elapsed:.1f} s"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_threads_agree(dtype, num_threads):
    """Tasks are whole (sample, head) pairs and nothing is reduced across them: the
    thread count does not change a bit."""
    inp = make_inputs(3, 64, 3, 32, dtype=dtype)
    out, st = OP(*_op_args(inp))
    cot = cotangents(out, st)
    results = []
    for n in (1, 2):
        with num_threads(n):
            results.append((*OP(*_op_args(inp)), *BWD(*_op_args(inp), *cot)))
    for i, (x, y) in enumerate(zip(*results)):
        assert torch.equal(x, y), f"result {i} differs between 1 and 2 threads"


@pytest.mark.parametrize("B,T,H,state", [(0, 3, 2, True), (2, 0, 2, True), (2, 0, 2, False), (2, 3, 0, True)],
                         ids=["B0", "T0-state", "T0-nostate", "H0"])
def test_empty(device, B, T, H, state):
    """Empty sizes give correctly shaped results; with T=0 the state passes through
    (its gradient is the cotangent of state_out), without one it is zeros."""
    inp = make_inputs(B, T, H, 16, device=device, state=state)
    out, st, grads = run(wkv7, inp)
    assert out.shape == (B, T, H, 16) and st.shape == (B, H, 16, 16)
    if T == 0:
        assert torch.equal(st, inp["state"] if state else torch.zeros_like(st))
        if state:
            g_out, g_state = cotangents(out, st)
            assert torch.equal(grads["state"], g_state)
    for k, g in grads.items():
        assert g.shape == inp[k].shape, k


# ------------------------------------------------------------------------------------
# Other implementations of the same recurrence


def _rwkv_x070_loop():
    """The rwkv package's CPU recurrence of RWKV_x070 (the loop of its
    RWKV_x070_TMix_seq), its own source lines: one sequence, r, w (the decay factor),
    k, v, kk, a as [T, H*N], state [H, N, N]."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None:
        pytest.skip("the rwkv package is not installed (pip install rwkv)")
    src = Path(spec.origin).with_name("model.py").read_text()
    m = re.search(r"\n( +)for t in range\(T\):\n((?:\1 +.*\n)+?)(?:\1 +xx\[t\] = .*\n)", src)
    if m is None or "state @ ab" not in m.group(2):
        pytest.skip("the rwkv package's x070 CPU loop has changed shape (model.py)")
    indent = len(m.group(1)) + 4
    body = "\n".join(line[indent:] for line in m.group(2).splitlines())
    out_line = re.search(r"\n +(xx\[t\] = .*)\n", src[m.start():]).group(1)
    code = ("def loop(H, N, T, r, w, k, v, kk, a, state, xx, x):\n"
            "    for t in range(T):\n" + "".join(f"        {line}\n" for line in (body + "\n" + out_line).splitlines())
            + "    return xx, state\n")
    ns = {"torch": torch}
    exec(compile(code, "rwkv/model.py (RWKV_x070_TMix_seq loop)", "exec"), ns)  # noqa: S102
    return ns["loop"], code


@pytest.mark.parametrize("N", [16, 64])
def test_matches_rwkv_package(N):
    """The rwkv package's x070 recurrence (``state = state * w + state @ ab + vk``, with
    ab = (-kk)(kk * a)^T and its decay factor w) on the same inputs: the op with
    w_op = log(-log w), a_op = -kk, b_op = kk * a gives its outputs and final state
    (its state is [H, value, key], ours per sample)."""
    loop, _ = _rwkv_x070_loop()
    B, T, H = 2, 24, 3
    gen = torch.Generator().manual_seed(3)
    r, k, v, kk_raw = (torch.randn(B, T, H, N, generator=gen) for _ in range(4))
    kk = torch.nn.functional.normalize(kk_raw, dim=-1)
    a = torch.rand(B, T, H, N, generator=gen)  # the model's in-context learning rate
    decay = torch.exp(-0.606531 * torch.sigmoid(torch.randn(B, T, H, N, generator=gen)))  # as RWKV_x070 forms it
    state = torch.randn(B, H, N, N, generator=gen)
    out, st = wkv7(r / N**0.5, torch.log(-torch.log(decay)), k / N**0.5, v, -kk, kk * a, state)
    for bb in range(B):
        flat = lambda x: x[bb].reshape(T, H * N)  # noqa: E731
        xx, s = loop(H, N, T, flat(r / N**0.5), flat(decay), flat(k / N**0.5), flat(v), flat(kk), flat(a),
                     state[bb].clone(), torch.empty(T, H * N), torch.empty(0))
        check(out[bb].reshape(T, H * N), xx, f"out vs rwkv, sample {bb}", dtype=torch.float32)
        check(st[bb], s, f"state_out vs rwkv, sample {bb}", dtype=torch.float32)


def _fla_dplr_recurrence():
    """flash-linear-attention's naive generalized-delta-rule recurrence, loaded from its
    file (fla's package import pulls in triton kernels and transformers models)."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("flash-linear-attention is not installed (pip install fla-core --no-deps, einops)")
    path = Path(spec.origin).parent / "ops" / "generalized_delta_rule" / "dplr" / "naive.py"
    if not path.exists():
        pytest.skip(f"fla has no {path.relative_to(path.parents[3])}")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("fla's naive recurrence imports einops, which is not installed")
    mod_spec = importlib.util.spec_from_file_location("fla_dplr_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.dplr_recurrence


def test_matches_fla_naive():
    """fla's dplr_recurrence(q, k, v, alpha, beta, gk) (S <- S * exp(gk) + k v^T +
    beta (alpha^T S), state [B, H, K, V], head-first, q scaled by K^-0.5) in float32:
    q = r * sqrt(N), alpha = a, beta = b, gk = -exp(w), state transposed."""
    dplr = _fla_dplr_recurrence()
    B, T, H, N = 2, 20, 3, 32
    inp = make_inputs(B, T, H, N)
    out, st = call(wkv7, inp)
    hf = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    o, s = dplr(hf(inp["r"] * N**0.5), hf(inp["k"]), hf(inp["v"]), hf(inp["a"]), hf(inp["b"]),
                hf(-torch.exp(inp["w"])), initial_state=inp["state"].transpose(-1, -2).contiguous())
    check(out, o.transpose(1, 2), "out vs fla", dtype=torch.float32)
    check(st, s.transpose(-1, -2), "state_out vs fla", dtype=torch.float32)


# ------------------------------------------------------------------------------------
# Bad inputs (the fake kernels' agreement, device mixes and the backward op's refusal
# of inputs requiring grad are in test_ops_adversarial.py)


def _bad(**changes):
    """Valid CPU float32 arguments (B=3, T=4, H=2, N=16, with state) with some replaced."""
    inp = make_inputs(3, 4, 2, 16)
    inp.update(changes)
    return inp


BAD_INPUTS = {
    "r 3-D": (lambda: _bad(r=torch.randn(3, 4, 32)), r"r must have shape \[B, T, H, N\], got \[3, 4, 32\]"),
    "r integer": (lambda: _bad(r=torch.ones(3, 4, 2, 16, dtype=torch.int32)),
                  r"r must be float32, float16 or bfloat16 \(or float64 on the CPU\), got Int"),
    "head size 48": (lambda: {k: None if v is None else torch.randn(*v.shape[:-1], 48) if k != "state"
                              else torch.randn(3, 2, 48, 48) for k, v in _bad().items()},
                     r"the head size N \(r's last dimension\) must be 16, 32, 64 or 128, got 48"),
    "w shape": (lambda: _bad(w=torch.randn(3, 4, 2, 32)), r"w must have shape \[3, 4, 2, 16\], got \[3, 4, 2, 32\]"),
    "k T": (lambda: _bad(k=torch.randn(3, 5, 2, 16)), r"k must have shape \[3, 4, 2, 16\], got \[3, 5, 2, 16\]"),
    "v batch": (lambda: _bad(v=torch.randn(1, 4, 2, 16)), r"v must have shape \[3, 4, 2, 16\], got \[1, 4, 2, 16\]"),
    "a heads": (lambda: _bad(a=torch.randn(3, 4, 3, 16)), r"a must have shape \[3, 4, 2, 16\], got \[3, 4, 3, 16\]"),
    "b dtype": (lambda: _bad(b=torch.randn(3, 4, 2, 16, dtype=torch.float16)), r"b must have dtype Float, got Half"),
    "state shape": (lambda: _bad(state=torch.randn(3, 2, 16)),
                    r"state must have shape \[3, 2, 16, 16\], got \[3, 2, 16\]"),
    "state float64": (lambda: _bad(state=torch.randn(3, 2, 16, 16, dtype=torch.float64)),
                      r"state must have dtype Float, got Double"),
    "state bfloat16 for bfloat16": (
        lambda: {**make_inputs(3, 4, 2, 16, dtype=torch.bfloat16), "state": torch.randn(3, 2, 16, 16).bfloat16()},
        r"state must have dtype Float, got BFloat16"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    make, match = BAD_INPUTS[case]
    inp = make()
    with pytest.raises(ValueError, match=r"prosg\.wkv7: " + match):
        call(wkv7, inp)
    with pytest.raises(ValueError, match=r"prosg\.wkv7: " + match):  # the fake kernel, word for word
        call(wkv7, {k: None if v is None else v.to("meta") for k, v in inp.items()})
    if inp["r"].dim() == 4:
        B, T, H, N = inp["r"].shape
        acc = accumulation_dtype(inp["r"].dtype) if inp["r"].is_floating_point() else torch.float32
        dt = inp["r"].dtype if inp["r"].is_floating_point() else torch.float32
        with pytest.raises(ValueError, match=r"prosg\.wkv7_backward: " + match):
            BWD(*_op_args(inp), torch.zeros(B, T, H, N, dtype=dt), torch.zeros(B, H, N, N, dtype=acc))


def test_bad_cotangents():
    inp = make_inputs(3, 4, 2, 16)
    g_out, g_state = torch.zeros(3, 4, 2, 16), torch.zeros(3, 2, 16, 16)
    cases = [
        (torch.zeros(3, 4, 2, 32), g_state, r"grad_out must have shape \[3, 4, 2, 16\], got \[3, 4, 2, 32\]"),
        (g_out.half(), g_state, r"grad_out must have dtype Float, got Half"),
        (g_out, torch.zeros(3, 2, 16), r"grad_state_out must have shape \[3, 2, 16, 16\], got \[3, 2, 16\]"),
        (g_out, g_state.double(), r"grad_state_out must have dtype Float, got Double"),
    ]
    for go, gs, match in cases:
        with pytest.raises(ValueError, match=r"prosg\.wkv7_backward: " + match):
            BWD(*_op_args(inp), go, gs)


@pytest.mark.cuda
def test_float64_on_cuda_is_rejected():
    inp = make_inputs(3, 4, 2, 16, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=r"prosg\.wkv7: r must be float32, float16 or bfloat16, got Double"):
        call(wkv7, inp)


@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["w", "k", "v", "a", "b", "state", "r"])
def test_device_mix_is_rejected(moved):
    """One argument on the CPU, the others on CUDA: the error names it (w, the first
    one checked against r, when r is the odd one out)."""
    inp = make_inputs(3, 4, 2, 16, device="cuda")
    inp[moved] = inp[moved].cpu()
    name = "w" if moved == "r" else moved
    with pytest.raises(ValueError, match=rf"prosg\.wkv7: {name} must be on the same device as r"):
        call(wkv7, inp)


@pytest.mark.cuda
def test_cuda_side_stream():
    """Work is queued on the current stream: a side stream gives the default stream's result."""
    inp = make_inputs(3, 40, 3, 64, device="cuda")
    expected = call(wkv7, inp)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = call(wkv7, inp)
    s.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
