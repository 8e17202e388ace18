"""Tests of ``prosg.ops.wkv4`` (``torch.ops.prosg.wkv4`` and its backward op) against
the float64 reference ``prosg.reference.wkv4_ref`` and transformers'
``rwkv_linear_attention_cpu``.

Sizes are odd on purpose. The CPU kernel splits each sample's channels into
vector-aligned ranges and walks each range a vector register at a time (8 floats with
AVX2, 4 doubles), then the last ``C mod 8`` channels one at a time: C=67 is two ranges
(40 + 27 channels) with a 3-channel scalar tail, C=43 one range of 5 vectors + 3
scalars, C=5 scalars only. T=257 spans 17 of the backward's 16-step checkpoint
segments (the last one a single step) and, on CUDA, 8 chunks of the forward's chunked
scan; T=1 is one step; r=1 and r=16 are the extremes of the fused low-rank term. The CPU
forms the low-rank terms 16 steps at a time, 8 ranks and 4 steps at once: T=37 ends on
a short block with a 1-step tail, r=11 is a full rank tile and a partial one.

Inputs are drawn in float64 and converted, so the reference sees exactly the values
(already rounded to the kernel's dtype) the kernel sees. ``time_decay`` spans RWKV-4's
trained range (decays e^w from 1 - 0.018 per step, a memory of ~55 steps, down to
e^-4.5), and the initial state is a real one: the reference run over a random prefix.
"""

from __future__ import annotations

import math

import pytest
import torch
from threads import num_threads
from tolerances import assert_close, tol

import prosg  # noqa: F401  (loads torch.ops.prosg)
from prosg.ops import wkv4
from prosg.numerics import EMPTY_MAX, accumulation_dtype
from prosg.reference import wkv4_ref

OP = torch.ops.prosg.wkv4.default
BWD = torch.ops.prosg.wkv4_backward.default
# Every differentiable argument, in the op's order.
NAMES = ("time_decay", "time_first", "key", "value", "state", "key_z", "key_u", "value_z", "value_u")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
state_dtype = accumulation_dtype


def make_inputs(B, T, C, r=2, *, dtype=torch.float32, device="cpu", state=True, key_lr=True, value_lr=True,
                key_scale=1.0, param_dtype=None):
    """A dict of the op's arguments by NAMES (absent ones None).

    key, value ~ N(0, 1) (key times ``key_scale``); the low-rank terms z ~ N(0, 1),
    U ~ N(0, 1/(4r)), so z @ U^T ~ N(0, 1/4); time_first ~ N(0, 1/4). time_decay,
    time_first (in ``param_dtype``, default ``dtype``) and the state (float32, float64
    for float64) are the other dtypes the op accepts."""
    f64 = dict(dtype=torch.float64)
    t = dict(
        time_decay=torch.empty(C, **f64).uniform_(-4.0, 1.5),
        time_first=0.5 * torch.randn(C, **f64),
        key=key_scale * torch.randn(B, T, C, **f64),
        value=torch.randn(B, T, C, **f64),
        state=None,
        key_z=torch.randn(B, T, r, **f64) if key_lr else None,
        key_u=torch.randn(B, C, r, **f64) / math.sqrt(4 * max(r, 1)) if key_lr else None,
        value_z=torch.randn(B, T, r, **f64) if value_lr else None,
        value_u=torch.randn(B, C, r, **f64) / math.sqrt(4 * max(r, 1)) if value_lr else None,
    )
    if state:
        # A state the recurrence can reach: the reference run over 6 random steps.
        _, t["state"] = wkv4_ref(t["time_decay"], t["time_first"], 2 * torch.randn(B, 6, C, **f64),
                                 torch.randn(B, 6, C, **f64))
    dtypes = dict(time_decay=param_dtype or dtype, time_first=param_dtype or dtype, state=state_dtype(dtype))
    return {k: None if v is None else v.to(device=device, dtype=dtypes.get(k, dtype)) for k, v in t.items()}


def call(fn, inp):
    """``fn`` (wkv4 or wkv4_ref) on a NAMES dict."""
    kl = None if inp["key_z"] is None else (inp["key_z"], inp["key_u"])
    vl = None if inp["value_z"] is None else (inp["value_z"], inp["value_u"])
    return fn(inp["time_decay"], inp["time_first"], inp["key"], inp["value"], inp["state"], kl, vl)


def leaves(inp, dtype=None):
    """Fresh leaf copies requiring grad (floating ones optionally converted to ``dtype``)."""
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


#: The step-by-step references (wkv4_ref, transformers) run on one intra-op thread.
#: Their backward writes a whole [B, T, C] zero gradient per time step (the backward of
#: ``key[:, t]``); on two loaded cores the OpenMP barriers of those fills made a 0.4 s
#: reference take 11 s. The kernels under test keep the default thread count.
REFERENCE_THREADS = 1


def run(fn, inp, g_out=None, g_state=None, dtype=None):
    """``(out, state_out, {name: grad})`` of ``fn`` with the loss <out, g_out> +
    <state_out, g_state>, every gradient taken at once. Cotangents default to
    :func:`cotangents`; ``dtype`` converts the inputs first (the reference: float64)."""
    if fn is wkv4_ref:
        with num_threads(REFERENCE_THREADS):
            return _run(fn, inp, g_out, g_state, dtype)
    return _run(fn, inp, g_out, g_state, dtype)


def _run(fn, inp, g_out, g_state, dtype):
    lv = leaves(inp, dtype)
    out, state_out = call(fn, lv)
    if g_out is None:
        g_out, g_state = cotangents(out, state_out)
    names = present(inp)
    # With T=0 the reference's out (and, without a state, its state_out) is a constant.
    pairs = [(y, g.to(y.dtype)) for y, g in ((out, g_out), (state_out, g_state)) if y.requires_grad]
    if pairs:
        grads = torch.autograd.grad([y for y, _ in pairs], [lv[k] for k in names], [g for _, g in pairs],
                                    allow_unused=True, materialize_grads=True)
    else:
        grads = [torch.zeros_like(lv[k]) for k in names]
    return out, state_out, dict(zip(names, grads))


def check(actual, expected, what, dtype=None, scale=None):
    """``actual`` against the float64 ``expected`` with the tolerance of the precision
    ``actual`` was produced in: its own dtype (out, key/value gradients, gradients of
    float16/bfloat16 parameters end in one rounding to it), float32 for float32
    results of half-precision inputs (the state and its gradient, which the kernel
    keeps and returns in float32).

    The table's atol is "at unit scale". wkv4's results are not O(1): the state holds
    sums of up to 1/(1 - e^w) terms and the gradients of time_decay, time_first, the
    initial state and U are sums over the time steps (and the batch) of O(1) terms. The
    accumulation error is relative to those terms, so atol scales with the largest
    entry of the reference (a max-norm relative bound; an indexing or recurrence bug
    is an O(1) error at that scale and still fails), and rtol stays the table's."""
    dtype = dtype or actual.dtype
    if scale is None:
        scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    assert_close(actual, expected, dtype, what, atol=tol(dtype)["atol"] * scale)


def check_against_reference(inp, device=None, what=""):
    """Forward (out, state_out) and every gradient of the kernel versus the float64
    reference's autograd, same inputs and cotangents."""
    out, st, grads = run(wkv4, inp)
    key = inp["key"]
    assert out.dtype == inp["value"].dtype and out.device == key.device and out.shape == key.shape
    assert st.dtype == state_dtype(key.dtype) and st.shape == (key.shape[0], 3, key.shape[2])
    g_out, g_state = cotangents(out, st)
    ref_out, ref_st, ref_grads = run(wkv4_ref, inp, g_out.double(), g_state.double(), torch.float64)
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
    # name: (B, T, C, r)
    "B3-T33-C67-r16": (3, 33, 67, 16),
    "B1-T257-C43-r1": (1, 257, 43, 1),
    "B3-T1-C5-r16": (3, 1, 5, 16),
    "B2-T37-C19-r11": (2, 37, 19, 11),
}
# (state, key low-rank, value low-rank): every combination in float32, the two
# extremes in the other dtypes (the dtype only changes loads, stores and roundings).
VARIANTS = {
    "plain": (False, False, False), "state": (True, False, False), "klr": (False, True, False),
    "vlr": (False, False, True), "state-klr": (True, True, False), "state-vlr": (True, False, True),
    "klr-vlr": (False, True, True), "all": (True, True, True),
}
REFERENCE_PARAMS = [
    pytest.param(dtype, variant, id=f"{str(dtype).removeprefix('torch.')}-{variant}")
    for dtype in DTYPES
    for variant in (VARIANTS if dtype == torch.float32 else ("plain", "all"))
]


@pytest.mark.parametrize("dtype,variant", REFERENCE_PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(device, dtype, variant, case, poison_cuda_cache):
    skip_unsupported(device, dtype)
    if device == "cuda":
        poison_cuda_cache()  # a position the kernel leaves unwritten reads as NaN
    s, klr, vlr = VARIANTS[variant]
    inp = make_inputs(*CASES[case], dtype=dtype, device=device, state=s, key_lr=klr, value_lr=vlr)
    before = {k: v.clone() for k, v in inp.items() if v is not None}
    check_against_reference(inp)
    for k, v in before.items():  # the op never writes to its inputs
        assert torch.equal(inp[k], v), f"{k} was modified"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_activations_float32_parameters(device, dtype):
    """Mixed precision as in a model that keeps its parameters in float32: the
    gradients of time_decay/time_first come back in float32 at float32 accuracy."""
    inp = make_inputs(2, 40, 67, 4, dtype=dtype, device=device, param_dtype=torch.float32)
    _, _, grads = check_against_reference(inp)
    assert grads["time_decay"].dtype == torch.float32 and grads["time_first"].dtype == torch.float32


def test_large(device, poison_cuda_cache):
    """Several channel ranges per sample on the CPU (C=771, B=1 on two threads: ranges
    of 200, 200, 200 and 171 = 21 vectors + 3, run in parallel), 7 CUDA blocks of
    channels, 19 checkpoint segments."""
    if device == "cuda":
        poison_cuda_cache()
    check_against_reference(make_inputs(1, 300, 771, 8, device=device))


@pytest.mark.parametrize("T", [2111, 2143, 4999, 5000])
def test_state_out_when_the_last_chunk_is_short(device, T, poison_cuda_cache):
    """Regression (found by the CPU execution of the CUDA kernels): on a 132-SM GPU,
    B=1, C=3 at T=2111 was scanned in 65 chunks of 33 steps, the last one empty, and
    the chunk scan advanced the state by a negative length: state_out came back wrong
    (its running max shifted) while out was right. The CUDA chunk chooser now never
    leaves a chunk empty. Forward and final state only; the CPU runs it too."""
    if device == "cuda":
        poison_cuda_cache()
    inp = make_inputs(1, T, 3, 2, device=device, state=T % 2 == 0, value_lr=False)
    out, st = call(wkv4, inp)
    with num_threads(REFERENCE_THREADS):
        ref_out, ref_st = call(wkv4_ref, {k: None if v is None else v.double().cpu() for k, v in inp.items()})
    check(out, ref_out, "out")
    check(st, ref_st, "state_out")


def test_batch_past_cuda_grid_limit(device):
    """B = 65537 > 65535, CUDA's gridDim.y limit: tiled by a grid-stride loop over the
    batch (the CUDA op used to refuse it)."""
    check_against_reference(make_inputs(65537, 2, 1, 1, device=device, value_lr=False))


def test_empty_state_equals_no_state(device):
    """state = (0, 0, -1e38), transformers' start, is what state=None means."""
    inp = make_inputs(3, 33, 67, 4, device=device, state=False)
    out, st = call(wkv4, inp)
    empty = torch.zeros(3, 3, 67, device=device)
    empty[:, 2] = EMPTY_MAX
    out2, st2 = call(wkv4, {**inp, "state": empty})
    assert torch.equal(out, out2) and torch.equal(st, st2)
    # ... and its gradient is finite (a = b = 0 there: nothing flows into p).
    _, _, grads = run(wkv4, {**inp, "state": empty})
    assert torch.isfinite(grads["state"]).all()


# ------------------------------------------------------------------------------------
# Non-contiguous inputs, fused low-rank, continuation, transformers


def test_non_contiguous_inputs(device):
    """Transposed, sliced and batch-broadcast (stride 0) inputs and cotangents give the
    contiguous result, forward and backward."""
    B, T, C, r = 3, 33, 67, 5
    dense = make_inputs(B, T, C, r, device=device)
    strided = {
        "time_decay": torch.stack([dense["time_decay"], dense["time_decay"]], 1)[:, 1],  # stride 2
        "time_first": dense["time_first"],  # contiguous: strided and contiguous arguments mix
        "key": dense["key"].transpose(1, 2).contiguous().transpose(1, 2),  # channel stride T
        "value": torch.stack([dense["value"], -dense["value"]], 3)[..., 0],  # channel stride 2
        "state": dense["state"].transpose(1, 2).contiguous().transpose(1, 2),
        "key_z": dense["key_z"].transpose(1, 2).contiguous().transpose(1, 2),  # rank-major
        "key_u": dense["key_u"].transpose(1, 2).contiguous().transpose(1, 2),
        "value_z": torch.cat([dense["value_z"], dense["value_z"]], 2)[:, :, r:],  # offset r, row stride 2r
        "value_u": torch.stack([dense["value_u"], dense["value_u"]], 2)[:, :, 0],  # channel stride 2r
    }
    for k in ("time_decay", "key", "value", "state", "key_z", "key_u", "value_z", "value_u"):
        assert not strided[k].is_contiguous(), k
    for k in NAMES:
        assert torch.equal(strided[k], dense[k]), k

    def grads_with(inp, g_out, g_state):
        lv = leaves(inp)
        out, st = call(wkv4, {k: lv[k] for k in NAMES})
        return (out, st, *torch.autograd.grad((out, st), [lv[k] for k in NAMES], (g_out, g_state)))

    g_out, g_state = cotangents(dense["key"], dense["state"])
    g_out_t = g_out.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous cotangent
    for k, a, e in zip(("out", "state_out") + NAMES, grads_with(strided, g_out_t, g_state),
                       grads_with(dense, g_out, g_state)):
        check(a, e, f"strided vs contiguous: {k}", dtype=torch.float32)
    check_against_reference(strided, what="strided: ")

    # A loss that is a plain sum hands the backward expanded (all strides 0) cotangents.
    lv, lr = leaves(dense), leaves(dense, torch.float64)
    out, st = call(wkv4, lv)
    (out.sum() + st.sum()).backward()
    with num_threads(REFERENCE_THREADS):
        out, st = call(wkv4_ref, lr)
        (out.sum() + st.sum()).backward()
    for k in NAMES:
        check(lv[k].grad, lr[k].grad, f"sum() loss: grad {k}")

    # One U shared by the batch, broadcast with batch stride 0: its gradient sums.
    u = dense["key_u"][:1].clone().requires_grad_(True)
    u_ref = u.detach().double().requires_grad_(True)
    out, st = call(wkv4, {**dense, "key_u": u.expand(B, C, r)})
    (gu,) = torch.autograd.grad((out, st), [u], cotangents(out, st))
    with num_threads(REFERENCE_THREADS):
        out_r, st_r = call(wkv4_ref, {**{k: v.double() for k, v in dense.items()}, "key_u": u_ref.expand(B, C, r)})
        (gu_r,) = torch.autograd.grad((out_r, st_r), [u_ref], tuple(g.double() for g in cotangents(out, st)))
    check(out, out_r, "out with broadcast key_u")
    check(gu, gu_r, "grad of broadcast key_u")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("which", ["key", "value", "both"])
def test_fused_lowrank_equals_materialised(device, dtype, which):
    """Passing (z, U) equals calling the op without low-rank terms on the effective
    key/value key + z @ U^T (formed by autograd-tracked torch ops), outputs and every
    gradient. (In float32: the kernel adds the r products in its own order, so the
    effective keys differ in the last bit, which is all this tolerance allows.)"""
    skip_unsupported(device, dtype)
    B, T, C, r = 3, 33, 67, 8
    inp = make_inputs(B, T, C, r, dtype=dtype, device=device, key_lr=which != "value", value_lr=which != "key")
    fused_out, fused_st, fused = run(wkv4, inp)

    lv = leaves(inp)
    key, value = lv["key"], lv["value"]
    if lv["key_z"] is not None:
        key = key + torch.bmm(lv["key_z"], lv["key_u"].transpose(1, 2))
    if lv["value_z"] is not None:
        value = value + torch.bmm(lv["value_z"], lv["value_u"].transpose(1, 2))
    out, st = wkv4(lv["time_decay"], lv["time_first"], key, value, lv["state"])
    names = present(inp)
    grads = torch.autograd.grad((out, st), [lv[k] for k in names], cotangents(out, st))
    check(fused_out, out, "out", dtype=dtype)
    check(fused_st, st, "state_out", dtype=dtype)
    for k, g in zip(names, grads):
        check(fused[k], g, f"grad {k}", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("initial_state", [True, False], ids=["state", "nostate"])
def test_chunked_continuation(device, dtype, initial_state, poison_cuda_cache):
    """Running T in pieces with the state carried gives one call's outputs, final state
    and gradients (of every input, the initial state included). The loss uses every
    piece's outputs and only the final state, so the gradient reaches the earlier
    pieces through the carried state alone."""
    skip_unsupported(device, dtype)
    B, T, C, r = 2, 100, 67, 3
    pieces = [37, 1, 62]
    inp = make_inputs(B, T, C, r, dtype=dtype, device=device, state=initial_state)
    if device == "cuda":
        poison_cuda_cache()
    whole_out, whole_st, whole = run(wkv4, inp)
    g_out, g_state = cotangents(whole_out, whole_st)

    lv = leaves(inp)
    outs, st, t0 = [], lv["state"], 0
    for n in pieces:
        sl = slice(t0, t0 + n)
        o, st = wkv4(lv["time_decay"], lv["time_first"], lv["key"][:, sl], lv["value"][:, sl], st,
                     (lv["key_z"][:, sl], lv["key_u"]), (lv["value_z"][:, sl], lv["value_u"]))
        outs.append(o)
        t0 += n
    out = torch.cat(outs, 1)
    names = present(inp)
    grads = dict(zip(names, torch.autograd.grad((out, st), [lv[k] for k in names], (g_out, g_state))))
    if device == "cpu":
        # The carried state is the kernel's own float32 (float64) state, bit for bit.
        assert torch.equal(out, whole_out) and torch.equal(st, whole_st)
    else:
        # CUDA splits a long call into chunks of its own, combined in log-max form.
        check(out, whole_out, "pieces: out")
        check(st, whole_st, "pieces: state_out")
    for k in names:
        check(grads[k], whole[k], f"pieces: grad {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
def test_matches_transformers(dtype, with_state):
    """transformers' ``rwkv_linear_attention_cpu`` on the same inputs and state: the
    outputs and state agree, and (float32) so do the gradients through its autograd.
    Its state is a list [num, den, max] of [B, C] float32 tensors. bfloat16 keys and
    values come with float32 time_decay/time_first (it rounds -exp(time_decay) to the
    parameter dtype, which is not the op's semantics)."""
    modeling_rwkv = pytest.importorskip("transformers.models.rwkv.modeling_rwkv")
    hf = modeling_rwkv.rwkv_linear_attention_cpu
    inp = make_inputs(3, 40, 67, dtype=dtype, state=with_state, key_lr=False, value_lr=False,
                      param_dtype=torch.float32)
    ours = leaves(inp)
    theirs = leaves(inp)
    out, st = call(wkv4, ours)
    hf_state = list(theirs["state"].unbind(1)) if with_state else None
    with num_threads(REFERENCE_THREADS):
        out_hf, st_hf = hf(theirs["time_decay"], theirs["time_first"], theirs["key"], theirs["value"],
                           state=hf_state, return_state=True)
    st_hf = torch.stack(st_hf, 1)
    assert out_hf.dtype == out.dtype and st_hf.dtype == st.dtype
    check(out, out_hf, "out vs transformers")
    check(st, st_hf, "state_out vs transformers")
    if dtype == torch.float32:
        names = present(inp)
        cot = cotangents(out, st)
        g = torch.autograd.grad((out, st), [ours[k] for k in names], cot)
        with num_threads(REFERENCE_THREADS):
            g_hf = torch.autograd.grad((out_hf, st_hf), [theirs[k] for k in names], cot)
        for k, a, e in zip(names, g, g_hf):
            check(a, e, f"grad {k} vs transformers")


def test_partial_outputs_and_inputs(device):
    """A loss on out alone (on state_out alone) gets the gradients of a zero cotangent
    for the other output; any subset of inputs requiring grad gets the full run's
    gradients of that subset."""
    inp = make_inputs(2, 20, 13, 3, device=device)
    out, st = call(wkv4, inp)
    g_out, g_state = cotangents(out, st)
    names = present(inp)
    _, _, full_out = run(wkv4, inp, g_out, torch.zeros_like(g_state))
    _, _, full_state = run(wkv4, inp, torch.zeros_like(g_out), g_state)
    for only, cot, full in (("out", g_out, full_out), ("state_out", g_state, full_state)):
        lv = leaves(inp)
        y = call(wkv4, lv)[0 if only == "out" else 1]
        for k, g in zip(names, torch.autograd.grad(y, [lv[k] for k in names], cot)):
            assert torch.equal(g, full[k]), f"grad {k} of a loss on {only} alone"
    _, _, full = run(wkv4, inp, g_out, g_state)
    for subset in (["key"], ["state"], ["time_decay", "value_u"], ["key_z", "value"]):
        part = {k: None if v is None else v.detach().clone().requires_grad_(k in subset) for k, v in inp.items()}
        grads = torch.autograd.grad(call(wkv4, part), [part[k] for k in subset], (g_out, g_state))
        for k, g in zip(subset, grads):
            assert torch.equal(g, full[k]), f"grad {k} with only {subset} requiring grad"


# ------------------------------------------------------------------------------------
# torch integration: gradcheck, opcheck, torch.compile


@pytest.mark.parametrize(
    "B,T,C,r,state,klr,vlr",
    [(2, 6, 5, 2, True, True, True), (1, 4, 9, 1, False, True, False), (2, 3, 3, 3, True, False, True)],
    ids=["all", "nostate-klr", "state-vlr"],
)
def test_gradcheck(B, T, C, r, state, klr, vlr):
    """Every gradient, the initial state and U/z included, against finite differences in
    float64 (C=5, 9: float64 vectors of 4 lanes plus scalar channels)."""
    inp = leaves(make_inputs(B, T, C, r, dtype=torch.float64, state=state, key_lr=klr, value_lr=vlr))
    names = present(inp)

    def f(*args):
        return call(wkv4, {**inp, **dict(zip(names, args))})

    assert torch.autograd.gradcheck(f, [inp[k] for k in names])


def _op_args(inp):
    return tuple(inp[k] for k in NAMES)


def _opcheck_samples(device):
    samples = []
    for shape, dtype, s, klr, vlr in [((2, 5, 7, 2), torch.float32, True, True, True),
                                      ((1, 3, 9, 1), torch.float32, False, False, False),
                                      ((2, 4, 11, 3), torch.bfloat16, True, True, False),
                                      ((2, 4, 5, 2), torch.float64, True, False, True)]:
        if device == "cuda" and dtype == torch.float64:
            continue
        samples.append(make_inputs(*shape, dtype=dtype, device=device, state=s, key_lr=klr, value_lr=vlr))
    return samples


def test_opcheck(device):
    for inp in _opcheck_samples(device):
        torch.library.opcheck(OP, _op_args(inp))
        # Autograd registration is only exercised when something requires grad.
        lv = {k: v if v is None or k not in ("key", "state", "key_u") else v.clone().requires_grad_(True)
              for k, v in inp.items()}
        torch.library.opcheck(OP, _op_args(lv))
        out, st = OP(*_op_args(inp))
        g_out, g_state = cotangents(out, st)
        torch.library.opcheck(BWD, (*_op_args(inp), g_out, g_state))


# inductor compiles kernels at run time (Triton on CUDA): marked jit, which the GPU
# check deselects to keep its minutes for prosg's own kernels.
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.jit)])
def test_torch_compile_fullgraph(device, backend):
    """The op traces into one graph (fake kernels + registered autograd) and the
    compiled forward and backward match eager."""
    torch._dynamo.reset()

    def f(td, tf, key, value, state, kz, ku, vz, vu):
        out, st = wkv4(td, tf, key, value, state, (kz, ku), (vz, vu))
        return torch.tanh(out).sum() + (st[:, 0] * st[:, 1]).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    # The recompile for a new T (dynamic shapes through the fake kernel) is checked with
    # aot_eager only: an inductor compilation costs seconds on 2 cores.
    for T in (7, 12) if backend == "aot_eager" else (7,):
        inp = make_inputs(2, T, 9, 3, device=device)
        a, e = leaves(inp), leaves(inp)
        la, le = compiled(*_op_args(a)), f(*_op_args(e))
        check(la, le, f"compiled loss T={T}")
        ga = torch.autograd.grad(la, _op_args(a))
        ge = torch.autograd.grad(le, _op_args(e))
        for k, x1, x2 in zip(NAMES, ga, ge):
            check(x1, x2, f"compiled grad {k} T={T}")


# ------------------------------------------------------------------------------------
# Bad inputs


def _bad(**changes):
    """Valid CPU float32 arguments (B=3, T=4, C=5, r=2, with state) with some replaced."""
    inp = make_inputs(3, 4, 5, 2)
    inp.update(changes)
    return inp


BAD_INPUTS = {
    "key 2-D": (lambda: _bad(key=torch.randn(4, 5)), r"key must have shape \[B, T, C\], got \[4, 5\]"),
    "key integer": (lambda: _bad(key=torch.ones(3, 4, 5, dtype=torch.int32)),
                    r"key must be float32, float16 or bfloat16 \(or float64 on the CPU\), got Int"),
    "time_decay C": (lambda: _bad(time_decay=torch.randn(6)), r"time_decay must have shape \[5\], got \[6\]"),
    "time_first C": (lambda: _bad(time_first=torch.randn(1, 5)), r"time_first must have shape \[5\], got \[1, 5\]"),
    "time_decay integer": (lambda: _bad(time_decay=torch.ones(5, dtype=torch.int64)),
                           r"time_decay must be float32, float16 or bfloat16 .*got Long"),
    "value C": (lambda: _bad(value=torch.randn(3, 4, 6)), r"value must have shape \[3, 4, 5\], got \[3, 4, 6\]"),
    "value T": (lambda: _bad(value=torch.randn(3, 5, 5)), r"value must have shape \[3, 4, 5\], got \[3, 5, 5\]"),
    "value dtype": (lambda: _bad(value=torch.randn(3, 4, 5, dtype=torch.float16)),
                    r"value must have dtype Float, got Half"),
    "state shape": (lambda: _bad(state=torch.randn(3, 2, 5)), r"state must have shape \[3, 3, 5\], got \[3, 2, 5\]"),
    "state batch": (lambda: _bad(state=torch.randn(1, 3, 5)), r"state must have shape \[3, 3, 5\], got \[1, 3, 5\]"),
    "state float64 for float32": (lambda: _bad(state=torch.randn(3, 3, 5, dtype=torch.float64)),
                                  r"state must have dtype Float, got Double"),
    "state bfloat16 for bfloat16": (
        lambda: {**make_inputs(3, 4, 5, 2, dtype=torch.bfloat16), "state": torch.randn(3, 3, 5, dtype=torch.bfloat16)},
        r"state must have dtype Float, got BFloat16"),
    "state float32 for float64": (
        lambda: {**make_inputs(3, 4, 5, 2, dtype=torch.float64), "state": torch.randn(3, 3, 5)},
        r"state must have dtype Double, got Float"),
    "key_z/key_u rank": (lambda: _bad(key_u=torch.randn(3, 5, 3)),
                         r"key_z and key_u must have the same rank r, got \[3, 4, 2\] and \[3, 5, 3\]"),
    "value_z/value_u rank": (lambda: _bad(value_z=torch.randn(3, 4, 1)),
                             r"value_z and value_u must have the same rank r, got \[3, 4, 1\] and \[3, 5, 2\]"),
    "key_z batch": (lambda: _bad(key_z=torch.randn(2, 4, 2)), r"key_z must have shape \[3, 4, 2\], got \[2, 4, 2\]"),
    "key_z T": (lambda: _bad(key_z=torch.randn(3, 5, 2)), r"key_z must have shape \[3, 4, 2\], got \[3, 5, 2\]"),
    "key_u batch": (lambda: _bad(key_u=torch.randn(1, 5, 2)), r"key_u must have shape \[3, 5, 2\], got \[1, 5, 2\]"),
    "value_u C": (lambda: _bad(value_u=torch.randn(3, 6, 2)), r"value_u must have shape \[3, 5, 2\], got \[3, 6, 2\]"),
    "key_u 2-D": (lambda: _bad(key_u=torch.randn(5, 2)), r"key_u must have shape \[B=3, C=5, r\], got \[5, 2\]"),
    "key_z without key_u": (lambda: _bad(key_u=None), r"key_z and key_u must be given together \(got key_z alone\)"),
    "value_u without value_z": (lambda: _bad(value_z=None),
                                r"value_z and value_u must be given together \(got value_u alone\)"),
    "key_z dtype": (lambda: _bad(key_z=torch.randn(3, 4, 2, dtype=torch.bfloat16)),
                    r"key_z must have dtype Float, got BFloat16"),
    "value_u dtype": (lambda: _bad(value_u=torch.randn(3, 5, 2, dtype=torch.float64)),
                      r"value_u must have dtype Float, got Double"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    make, match = BAD_INPUTS[case]
    inp = make()
    with pytest.raises(ValueError, match=r"prosg\.wkv4: " + match):
        OP(*_op_args(inp))
    if inp["key_z"] is not None and inp["value_z"] is not None:  # (call() drops a U without its z)
        with pytest.raises(ValueError, match=r"prosg\.wkv4: " + match):  # the Python wrapper, too
            call(wkv4, inp)
    # The backward op validates the same way (with valid cotangents for the valid sizes).
    if case not in ("key 2-D",):
        key = inp["key"]
        B, T, C = key.shape
        g_out = torch.zeros(B, T, C, dtype=inp["value"].dtype)
        g_state = torch.zeros(B, 3, C, dtype=state_dtype(key.dtype) if key.is_floating_point() else torch.float32)
        with pytest.raises(ValueError, match=r"prosg\.wkv4_backward: " + match):
            BWD(*_op_args(inp), g_out, g_state)


def test_bad_lowrank_argument():
    inp = make_inputs(3, 4, 5, 2)
    args = (inp["time_decay"], inp["time_first"], inp["key"], inp["value"], inp["state"])
    for bad in (inp["key_z"], (inp["key_z"],), (inp["key_z"], inp["key_u"], inp["key_u"])):
        with pytest.raises(ValueError, match=r"prosg\.wkv4: key_lowrank must be a pair \(z \[B, T, r\], U \[B, C, r\]\)"):
            wkv4(*args, key_lowrank=bad)
    with pytest.raises(ValueError, match=r"prosg\.wkv4: value_lowrank must be a pair"):
        wkv4(*args, value_lowrank=inp["value_z"])
    with pytest.raises(ValueError, match=r"prosg\.wkv4: key_z and key_u must be given together \(got key_z alone\)"):
        wkv4(*args, key_lowrank=(inp["key_z"], None))


def test_bad_cotangents():
    inp = make_inputs(3, 4, 5, 2)
    g_out, g_state = torch.zeros(3, 4, 5), torch.zeros(3, 3, 5)
    cases = [
        (torch.zeros(3, 4, 6), g_state, r"grad_out must have shape \[3, 4, 5\], got \[3, 4, 6\]"),
        (g_out.half(), g_state, r"grad_out must have dtype Float, got Half"),
        (g_out, torch.zeros(3, 5), r"grad_state_out must have shape \[3, 3, 5\], got \[3, 5\]"),
        (g_out, g_state.double(), r"grad_state_out must have dtype Float, got Double"),
    ]
    for go, gs, match in cases:
        with pytest.raises(ValueError, match=r"prosg\.wkv4_backward: " + match):
            BWD(*_op_args(inp), go, gs)


@pytest.mark.cuda
def test_float64_on_cuda_is_rejected():
    inp = make_inputs(3, 4, 5, 2, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=r"prosg\.wkv4: key must be float32, float16 or bfloat16, got Double"):
        call(wkv4, inp)


@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["value", "time_decay", "time_first", "state", "key_z", "key_u", "value_z",
                                   "value_u", "key"])
def test_device_mix_is_rejected(moved):
    """One argument on the CPU, the others on CUDA: the error names it (when key is the
    odd one out, value, the first argument checked against key)."""
    inp = make_inputs(3, 4, 5, 2, device="cuda")
    inp[moved] = inp[moved].cpu()
    name = "value" if moved == "key" else moved
    with pytest.raises(ValueError, match=rf"prosg\.wkv4: {name} must be on the same device as key"):
        call(wkv4, inp)


@pytest.mark.cuda
def test_cuda_side_stream():
    """Work is queued on the current stream: a side stream gives the default stream's result."""
    inp = make_inputs(3, 257, 67, 4, device="cuda")
    expected = call(wkv4, inp)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = call(wkv4, inp)
    s.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ------------------------------------------------------------------------------------
# Edge cases: empty sizes, stability, threads


@pytest.mark.parametrize("B,T,C,r", [(0, 5, 7, 2), (3, 0, 7, 2), (3, 5, 0, 2), (3, 5, 7, 0)],
                         ids=["B0", "T0", "C0", "r0"])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
def test_empty(device, B, T, C, r, with_state):
    """Empty sizes give correctly shaped results; with T=0 the state passes through
    (and its gradient is the cotangent of state_out), without one it is the empty state."""
    inp = make_inputs(B, T, C, r, device=device, state=with_state)
    if T > 0 or with_state:
        check_against_reference(inp)
        return
    # (wkv4_ref cannot build its empty state from a [B, 0, C] key: checked by hand.)
    out, st, grads = run(wkv4, inp)
    assert out.shape == (B, 0, C)
    expected = torch.zeros(B, 3, C)
    expected[:, 2] = EMPTY_MAX
    assert torch.equal(st.cpu(), expected)
    for k, g in grads.items():
        assert g.shape == inp[k].shape and not g.any(), f"grad {k}"


def test_long_sequence_is_stable(device):
    """T = 100,000 with keys of |k| up to 60 (e^60 ~ 1e26; e^(2*60) overflows float32
    without the running max): finite outputs, state and gradients."""
    B, T, C = 1, 100_000, 16
    inp = make_inputs(B, T, C, dtype=torch.float32, device=device, key_lr=False, value_lr=False)
    key = torch.empty(B, T, C).uniform_(-60, 60)
    key[..., :8] = 60.0 * (1 - 2 * (torch.arange(T) % 2)).view(1, T, 1)  # +60, -60, +60, ...
    inp["key"] = key.to(device)
    out, st, grads = run(wkv4, inp)
    assert torch.isfinite(out).all() and torch.isfinite(st).all()
    for k, g in grads.items():
        assert torch.isfinite(g).all(), f"grad {k} is not finite"
    # Outputs are weighted means of the values, whatever the keys.
    assert out.abs().max() <= inp["value"].abs().max() * (1 + 1e-5)


def test_extreme_keys_match_reference(device):
    """|k| <= 60 over T=2000, against the reference: the running-max bookkeeping stays
    accurate (not just finite) when the weights span e^-120 .. 1."""
    inp = make_inputs(1, 2000, 11, 2, device=device, key_scale=1.0)
    key = torch.empty(1, 2000, 11, dtype=torch.float64).uniform_(-60, 60)
    key[..., :4] = 60.0 * (1 - 2 * (torch.arange(2000) % 2)).view(1, 2000, 1)
    inp["key"] = key.to(device=device, dtype=torch.float32)
    check_against_reference(inp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("B,C", [(1, 203), (3, 67)], ids=["B1-C203", "B3-C67"])
def test_cpu_threads_agree(dtype, B, C, num_threads):
    """The CPU kernels split (sample, channel range) tasks between threads; ranges are
    whole vectors, so each channel takes the same (vector or scalar) path whatever
    the split, and nothing is reduced across tasks: the thread count does not change
    a bit. (B=1, C=203: 2 ranges on one thread, 4 on two. T=300 is enough work per
    task, over 2^15 channel-steps per thread, for the two threads to run at once.)"""
    inp = make_inputs(B, 300, C, 4, dtype=dtype)
    out, st = OP(*_op_args(inp))
    g_out, g_state = cotangents(out, st)
    results = []
    for n in (1, 2):
        with num_threads(n):
            results.append((*OP(*_op_args(inp)), *BWD(*_op_args(inp), g_out, g_state)))
    names = ("out", "state_out", "grad time_decay", "grad time_first", "grad key", "grad value", "grad state")
    for k, a, b in zip(names, *results):
        assert torch.equal(a, b), f"{k} differs between 1 and 2 threads: max |diff| {(a - b).abs().max().item()}"
