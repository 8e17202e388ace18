"""The fused RWKV-7 decode steps (prosg.ops.rwkv7_time_mix_step, rwkv7_channel_mix_step)
against the float64 definitions (prosg.reference.rwkv7_time_mix_step_ref: the x070
time mix written out, dense per-sample weights W + scale U_b V_b^T, the reference
recurrence; rwkv7_channel_mix_step_ref), and against RWKV7LM's own sequence path."""

from __future__ import annotations

import pytest
import torch

import prosg
from prosg.reference import rwkv7_channel_mix_step_ref, rwkv7_time_mix_step_ref, wkv7_ref
from tolerances import assert_close

B, H, N = 3, 3, 16  # C = 48; odd batch, odd low-rank widths below
C = H * N
DW, DA, DG, DV = 7, 5, 9, 3
R = 5


def _inputs(dtype, device, residual=True, with_deltas="none", w_dtype=None, batch=None):
    """(x, shift, wkv_state, v_first), the keyword parameters, the deltas; ``batch``
    samples (default B)."""
    B = batch or globals()["B"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def t(*s, scale=1.0, dt=dtype, shift=0.0):
        return (torch.randn(*s, dtype=torch.float64) * scale + shift).to(dtype=dt, device=device)

    def u(*s, dt=dtype):
        return torch.rand(*s, dtype=torch.float64).to(dtype=dt, device=device)

    r0 = torch.randn(B, 4, H, N, dtype=torch.float64)
    state = wkv7_ref(r0, torch.randn(B, 4, H, N) * 0.5 - 0.6, r0 * 0.3, torch.randn(B, 4, H, N),
                     -torch.nn.functional.normalize(torch.randn(B, 4, H, N), dim=-1),
                     torch.nn.functional.normalize(torch.randn(B, 4, H, N), dim=-1) * 0.5)[1]
    state = state.to(dtype=acc, device=device)
    wd = w_dtype or dtype
    kw = dict(x_r=u(C), x_w=u(C), x_k=u(C), x_v=u(C), x_a=u(C), x_g=u(C),
              w0=t(C, scale=0.5, dt=wd, shift=-1.0), w1=t(C, DW, scale=C**-0.5, dt=wd), w2=t(DW, C, scale=0.3, dt=wd),
              a0=t(C, scale=0.5), a1=t(C, DA, scale=C**-0.5), a2=t(DA, C, scale=0.3),
              g1=t(C, DG, scale=C**-0.5), g2=t(DG, C, scale=0.3),
              v0=t(C, scale=0.5) if residual else None, v1=t(C, DV, scale=C**-0.5) if residual else None,
              v2=t(DV, C, scale=0.3) if residual else None,
              k_k=u(C), k_a=u(C), r_k=t(H, N, scale=0.3),
              receptance_weight=t(C, C, scale=C**-0.5), key_weight=t(C, C, scale=C**-0.5),
              value_weight=t(C, C, scale=C**-0.5), output_weight=t(C, C, scale=C**-0.5),
              ln_x_weight=t(C, scale=0.2, shift=1.0), ln_x_bias=t(C, scale=0.1), ln_x_eps=64e-5)
    args = (t(B, C), t(B, C), state, t(B, C) if residual else None)

    def delta():
        return (t(B, C, R, scale=R**-0.5), t(B, C, R, scale=C**-0.5))

    deltas = {"none": None, "some": [delta(), None, None, delta()],
              "all": [delta(), delta(), delta(), delta()]}[with_deltas]
    return args, kw, deltas


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("batch", [B, 1], ids=["batch3", "batch1"])
@pytest.mark.parametrize("with_deltas", ["none", "some", "all"])
@pytest.mark.parametrize("residual", [False, True], ids=["layer0", "later_layer"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_time_mix_step_matches_reference(device, dtype, residual, with_deltas, batch):
    """batch1 in float32 on the CPU takes the single-row kernel of the low-rank MLPs;
    the other cases ATen's GEMMs."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    args, kw, deltas = _inputs(dtype, device, residual, with_deltas, batch=batch)
    B = batch
    with torch.no_grad():
        out, state, v = prosg.ops.rwkv7_time_mix_step(*args, **kw, deltas=deltas, scale=0.7)
    ref_out, ref_state, ref_v = rwkv7_time_mix_step_ref(*args, **kw, deltas=deltas, scale=0.7, stored=dtype)
    assert out.dtype == dtype and out.shape == (B, C) and v.dtype == dtype and v.shape == (B, C)
    assert state.dtype == args[2].dtype and state.shape == (B, H, N, N)
    # The state and every element kernel run in float32 (float64) whatever the input
    # dtype; the intermediates the op stores in the input dtype are rounded the same way
    # in the reference (stored=), so the tolerance is the input dtype's.
    assert_close(v, ref_v, dtype, what="value projection")
    assert_close(state, ref_state, dtype, what="wkv state")
    assert_close(out, ref_out, dtype, what="time-mix output")


def test_single_row_mlps_with_strided_weights_match_reference():
    """The single-row MLP kernel reads contiguous weights; transposed (strided) ones take
    the GEMM path: both give the reference's numbers."""
    args, kw, deltas = _inputs(torch.float32, "cpu", True, "some", batch=1)
    strided = {n: kw[n].t().contiguous().t() for n in ("w1", "a2", "g1", "v2")}
    assert not any(t.is_contiguous() for t in strided.values())
    ref_out, ref_state, _ = rwkv7_time_mix_step_ref(*args, **kw, deltas=deltas)
    for weights in (kw, {**kw, **strided}):
        out, state, _ = _no_grad(prosg.ops.rwkv7_time_mix_step, *args, **weights, deltas=deltas)
        assert_close(state, ref_state, torch.float32, what="wkv state")
        assert_close(out, ref_out, torch.float32, what="time-mix output")


def _no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return fn(*args, **kwargs)


def test_float32_decay_mlp_in_a_bfloat16_step():
    """A 16-bit model keeps w0, w1, w2 in float32 (prosg.models.rwkv7.FLOAT32_PARAMETERS)."""
    args, kw, _ = _inputs(torch.bfloat16, "cpu", True, w_dtype=torch.float32)
    with torch.no_grad():
        out, state, _ = prosg.ops.rwkv7_time_mix_step(*args, **kw)
    ref_out, ref_state, _ = rwkv7_time_mix_step_ref(*args, **kw, stored=torch.bfloat16)
    assert_close(state, ref_state, torch.bfloat16, what="wkv state")
    assert_close(out, ref_out, torch.bfloat16, what="time-mix output")


def test_head_sizes_and_zero_state():
    """Every head size the recurrence supports, from the zero state."""
    global H, N, C
    saved = H, N, C
    try:
        for H, N in ((1, 32), (2, 64), (1, 128)):
            C = H * N
            args, kw, deltas = _inputs(torch.float64, "cpu", True, "all")
            args = (args[0], args[1], torch.zeros_like(args[2]), args[3])
            with torch.no_grad():
                out, state, _ = prosg.ops.rwkv7_time_mix_step(*args, **kw, deltas=deltas)
            ref_out, ref_state, _ = rwkv7_time_mix_step_ref(*args, **kw, deltas=deltas)
            assert_close(state, ref_state, torch.float64, what=f"wkv state N={N}")
            assert_close(out, ref_out, torch.float64, what=f"time-mix output N={N}")
    finally:
        H, N, C = saved


def _step_calls(fn) -> dict[str, int]:
    """How often ``fn()`` calls each fused RWKV-7 step op (the model calls them through
    torch.ops, so the profiler counts them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return {op: counts.get(f"prosg::{op}", 0) for op in ("rwkv7_time_mix_step", "rwkv7_channel_mix_step")}


@pytest.mark.parametrize("batch", [2, 1])
def test_decode_steps_equal_sequence_path_of_the_model(batch):
    """Decoding through the fused ops equals the same tokens through RWKV7LM's sequence
    path (wkv7 + lowrank_linear), deltas and carried state included, over a few steps;
    batch 1 takes the single-row MLP kernel."""
    from prosg.models.testing import random_delta, random_rwkv7_model

    model = random_rwkv7_model(seed=5)
    L = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (batch, 9))
    delta = random_delta(model, batch=batch, rank=3)
    with torch.no_grad():
        _, state = model(ids[:, :5], delta=delta)
    fused, seq = [], []

    def decode(out, grad):
        s = state
        with torch.set_grad_enabled(grad):
            for t in range(5, 9):
                logits, s = model(ids[:, t:t + 1], state=s, delta=delta)
                out.append(logits.detach())
        return s

    states = {}
    assert _step_calls(lambda: states.update(fused=decode(fused, False))) == {
        "rwkv7_time_mix_step": 4 * L, "rwkv7_channel_mix_step": 4 * L}
    # With grad enabled on the parameters the fused ops are bypassed: the sequence path runs.
    assert _step_calls(lambda: states.update(seq=decode(seq, True))) == {
        "rwkv7_time_mix_step": 0, "rwkv7_channel_mix_step": 0}
    fused_state, seq_state = states["fused"], states["seq"]
    assert_close(torch.cat(fused, 1), torch.cat(seq, 1), torch.float32, what="logits")
    assert_close(fused_state.wkv, seq_state.wkv.detach(), torch.float32, what="wkv state")
    assert_close(fused_state.att_shift, seq_state.att_shift.detach(), torch.float32, what="token shift")
    assert_close(fused_state.ffn_shift, seq_state.ffn_shift.detach(), torch.float32, what="channel-mix shift")


def _flat(deltas):
    return [t for uv in deltas for t in (uv if uv is not None else (None, None))]


def _op_args(args, kw, deltas, scale):
    names = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2", "g1", "g2", "v0", "v1",
             "v2", "k_k", "k_a", "r_k", "receptance_weight", "key_weight", "value_weight", "output_weight",
             "ln_x_weight", "ln_x_bias", "ln_x_eps"]
    return (*args, *(kw[n] for n in names), _flat(deltas) if deltas else [], scale)


@pytest.mark.parametrize("residual", [False, True], ids=["layer0", "later_layer"])
def test_opcheck(residual):
    args, kw, deltas = _inputs(torch.float32, "cpu", residual, "some")
    torch.library.opcheck(torch.ops.prosg.rwkv7_time_mix_step.default, _op_args(args, kw, deltas, 0.5))
    torch.library.opcheck(torch.ops.prosg.rwkv7_time_mix_step.default, _op_args(args, kw, None, 1.0))


def test_compile_fullgraph():
    args, kw, deltas = _inputs(torch.float32, "cpu", True, "all")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, d):
        out, state, v = prosg.ops.rwkv7_time_mix_step(*a, **kw, deltas=d)
        return out * 2, state, v

    with torch.no_grad():
        out, state, v = step(args, deltas)
        ref_out, ref_state, ref_v = prosg.ops.rwkv7_time_mix_step(*args, **kw, deltas=deltas)
    torch.testing.assert_close(out, ref_out * 2)
    torch.testing.assert_close(state, ref_state)
    torch.testing.assert_close(v, ref_v)


BAD = [
    # (what is changed, the expected message)
    (lambda a, k: ((a[0].unsqueeze(1), *a[1:]), k), r"x must have shape \[B, C\] \(one token per sample\)"),
    (lambda a, k: ((a[0], a[1][:, :-1], *a[2:]), k), r"shift must have shape \[3, 48\], got \[3, 47\]"),
    (lambda a, k: ((*a[:2], a[2].double(), a[3]), k), "wkv_state must have dtype Float, got Double"),
    (lambda a, k: ((*a[:2], a[2][:, :2], a[3]), k), "wkv_state must have shape"),
    (lambda a, k: (a, {**k, "v1": None}), "v_first, v0, v1 and v2 come together"),
    (lambda a, k: ((*a[:3], a[3].half()), k), "v_first must have dtype Float, got Half"),
    (lambda a, k: (a, {**k, "x_a": k["x_a"][:-1]}), "x_a must have C=48 elements, got shape"),
    (lambda a, k: (a, {**k, "r_k": k["r_k"].reshape(-1)}), r"r_k must have shape \[H, N\] with H \* N = C=48"),
    (lambda a, k: (a, {**k, "r_k": k["r_k"].reshape(6, 8)}), "head size N .* must be 16, 32, 64 or 128, got 8"),
    (lambda a, k: (a, {**k, "w1": k["w1"].half()}), "w1 must have x's dtype"),
    (lambda a, k: (a, {**k, "a2": k["a2"][:-1]}), r"a2 must have shape \[5, 48\], got \[4, 48\]"),
    (lambda a, k: (a, {**k, "g1": k["g1"][0]}), r"g1 must have shape \[C=48, D\]"),
    (lambda a, k: (a, {**k, "output_weight": k["output_weight"][:, :-1]}), "output_weight must have shape"),
    (lambda a, k: (a, {**k, "key_weight": k["key_weight"].double()}), "key_weight must have dtype Float"),
    (lambda a, k: (a, {**k, "ln_x_eps": 0.0}), "ln_x_eps must be positive"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_bad_inputs(case, where):
    """The C++ kernel and the fake kernel reject the same calls with the same words."""
    change, message = BAD[case]
    args, kw, _ = _inputs(torch.float32, "cpu", True)
    if where == "meta":
        args = tuple(a.to("meta") if a is not None else None for a in args)
        kw = {n: (t.to("meta") if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    bad_args, bad_kw = change(args, kw)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        prosg.ops.rwkv7_time_mix_step(*bad_args, **bad_kw)


def test_bad_deltas_and_grad():
    args, kw, deltas = _inputs(torch.float32, "cpu", True, "all")
    step = prosg.ops.rwkv7_time_mix_step
    with torch.no_grad():
        with pytest.raises(ValueError, match="deltas must list 4 entries"):
            step(*args, **kw, deltas=deltas[:3])
        with pytest.raises(ValueError, match="needs both U and V"):
            torch.ops.prosg.rwkv7_time_mix_step(*_op_args(args, kw, None, 1.0)[:-2],
                                                [deltas[0][0], None] + [None] * 6, 1.0)
        bad = list(deltas)
        bad[3] = (deltas[3][0][:, :, :2], deltas[3][1])
        with pytest.raises(ValueError, match="same rank"):
            step(*args, **kw, deltas=bad)
    with pytest.raises(RuntimeError, match="inference-only"):
        step(args[0].clone().requires_grad_(), *args[1:], **kw)
    with pytest.raises(RuntimeError, match=r"deltas\[1\] \(the key delta's V\) requires grad"):
        step(*args, **kw, deltas=[(deltas[0][0], deltas[0][1].requires_grad_()), None, None, None])


def test_empty_batch(nan_empty):
    args, kw, _ = _inputs(torch.float32, "cpu", True)
    args = tuple(a[:0] for a in args)
    with torch.no_grad():
        out, state, v = prosg.ops.rwkv7_time_mix_step(*args, **kw)
    assert out.shape == (0, C) and state.shape == (0, H, N, N) and v.shape == (0, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_threads_agree(dtype, num_threads):
    """The CPU step's tasks are whole (sample, head) pairs and nothing is reduced across
    them: the thread count does not change a bit."""
    args, kw, deltas = _inputs(dtype, "cpu", True, "all")
    results = []
    for n in (1, 2):
        with num_threads(n), torch.no_grad():
            results.append(prosg.ops.rwkv7_time_mix_step(*args, **kw, deltas=deltas))
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"


# ------------------------------------------------------------------------------------
# The channel-mix step

F_ = 37  # the hidden width of the channel mix: odd, not a multiple of a vector


def _channel_inputs(dtype, device, with_deltas="none", batch=B):
    """(x, shift), the keyword parameters, the deltas."""
    def t(*s, scale=1.0):
        return (torch.randn(*s, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    kw = dict(x_k=torch.rand(C, dtype=torch.float64).to(dtype=dtype, device=device),
              key_weight=t(F_, C, scale=C**-0.5), value_weight=t(C, F_, scale=F_**-0.5))

    def delta(dout, din):
        return (t(batch, dout, R, scale=R**-0.5), t(batch, din, R, scale=din**-0.5))

    deltas = {"none": None, "key": [delta(F_, C), None], "both": [delta(F_, C), delta(C, F_)]}[with_deltas]
    return (t(batch, C), t(batch, C)), kw, deltas


@pytest.mark.parametrize("batch", [B, 1], ids=["batch3", "batch1"])
@pytest.mark.parametrize("with_deltas", ["none", "key", "both"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_mix_step_matches_reference(device, dtype, with_deltas, batch):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    args, kw, deltas = _channel_inputs(dtype, device, with_deltas, batch)
    out = _no_grad(prosg.ops.rwkv7_channel_mix_step, *args, **kw, deltas=deltas, scale=0.7)
    ref = rwkv7_channel_mix_step_ref(*args, **kw, deltas=deltas, scale=0.7, stored=dtype)
    assert out.dtype == dtype and out.shape == (batch, C)
    assert_close(out, ref, dtype, what="channel-mix output")


def test_channel_mix_step_equals_the_module():
    """The op is what RWKV7ChannelMix computes for one token through its sequence path."""
    from prosg.models.testing import random_delta, random_rwkv7_model

    model = random_rwkv7_model(seed=6)
    ffn = model.blocks[1].feed_forward
    x, prev = torch.randn(2, model.config.hidden_size), torch.randn(2, model.config.hidden_size)
    delta = random_delta(model, batch=2, rank=3)
    factors = {kind: delta.factors[f"blocks.1.feed_forward.{kind}"] for kind in ("key", "value")}
    seq, _ = ffn(x, prev, factors, 0.5)  # grad mode on: the sequence path
    with torch.no_grad():
        fused, shift = ffn(x, prev, factors, 0.5)
    assert shift is x
    assert_close(fused, seq.detach(), torch.float32, what="channel-mix output")


def _channel_op_args(args, kw, deltas, scale):
    return (*args, kw["x_k"], kw["key_weight"], kw["value_weight"], _flat(deltas) if deltas else [], scale)


def test_channel_mix_opcheck_and_compile():
    args, kw, deltas = _channel_inputs(torch.float32, "cpu", "both")
    op = torch.ops.prosg.rwkv7_channel_mix_step.default
    torch.library.opcheck(op, _channel_op_args(args, kw, deltas, 0.5))
    torch.library.opcheck(op, _channel_op_args(args, kw, None, 1.0))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, d):
        return prosg.ops.rwkv7_channel_mix_step(*a, **kw, deltas=d) * 2

    with torch.no_grad():
        torch.testing.assert_close(step(args, deltas), prosg.ops.rwkv7_channel_mix_step(*args, **kw, deltas=deltas) * 2)


CHANNEL_BAD = [
    (lambda a, k: ((a[0].unsqueeze(1), a[1]), k), r"x must have shape \[B, C\] \(one token per sample\)"),
    (lambda a, k: ((a[0].long(), a[1]), k), "x must be float32, float16 or bfloat16"),
    (lambda a, k: ((a[0], a[1][:, :-1]), k), r"shift must have shape \[3, 48\], got \[3, 47\]"),
    (lambda a, k: ((a[0], a[1].half()), k), "shift must have dtype Float, got Half"),
    (lambda a, k: (a, {**k, "x_k": k["x_k"][:-1]}), "x_k must have C=48 elements, got shape"),
    (lambda a, k: (a, {**k, "key_weight": k["key_weight"][0]}), r"key_weight must have shape \[F, C=48\]"),
    (lambda a, k: (a, {**k, "key_weight": k["key_weight"][:, :-1]}), r"key_weight must have shape \[37, 48\]"),
    (lambda a, k: (a, {**k, "value_weight": k["value_weight"][:, :-1]}), r"value_weight must have shape \[48, 37\]"),
    (lambda a, k: (a, {**k, "value_weight": k["value_weight"].double()}), "value_weight must have dtype Float"),
]


@pytest.mark.parametrize("case", range(len(CHANNEL_BAD)))
@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_channel_mix_bad_inputs(case, where):
    """The C++ kernel and the fake kernel reject the same calls with the same words."""
    change, message = CHANNEL_BAD[case]
    args, kw, _ = _channel_inputs(torch.float32, "cpu")
    if where == "meta":
        args = tuple(a.to("meta") for a in args)
        kw = {n: t.to("meta") for n, t in kw.items()}
    bad_args, bad_kw = change(args, kw)
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        prosg.ops.rwkv7_channel_mix_step(*bad_args, **bad_kw)


@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_channel_mix_bad_deltas_and_grad(where):
    args, kw, deltas = _channel_inputs(torch.float32, "cpu", "both")
    if where == "meta":
        args = tuple(a.to("meta") for a in args)
        kw = {n: t.to("meta") for n, t in kw.items()}
        deltas = [tuple(t.to("meta") for t in uv) for uv in deltas]
    step, op = prosg.ops.rwkv7_channel_mix_step, torch.ops.prosg.rwkv7_channel_mix_step
    with torch.no_grad():
        with pytest.raises(ValueError, match="deltas must list 2 entries"):
            step(*args, **kw, deltas=deltas[:1])
        with pytest.raises(ValueError, match="deltas must be empty or hold 4 entries"):
            op(*_channel_op_args(args, kw, None, 1.0)[:-2], [deltas[0][0], deltas[0][1]], 1.0)
        with pytest.raises(ValueError, match="the value delta needs both U and V"):
            op(*_channel_op_args(args, kw, None, 1.0)[:-2], [None, None, None, deltas[1][1]], 1.0)
        with pytest.raises(ValueError, match="same rank"):
            step(*args, **kw, deltas=[deltas[0], (deltas[1][0][:, :, :2], deltas[1][1])])
    if where == "cpu":
        with pytest.raises(RuntimeError, match=r"^prosg\.rwkv7_channel_mix_step: x requires grad, but .* inference-only"):
            step(args[0].clone().requires_grad_(), args[1], **kw)
        with pytest.raises(RuntimeError, match=r"deltas\[3\] \(the value delta's V\) requires grad"):
            step(*args, **kw, deltas=[None, (deltas[1][0], deltas[1][1].clone().requires_grad_())])


def test_channel_mix_empty_batch_and_threads(num_threads):
    args, kw, deltas = _channel_inputs(torch.float32, "cpu", "both", batch=0)
    out = _no_grad(prosg.ops.rwkv7_channel_mix_step, *args, **kw, deltas=deltas)
    assert out.shape == (0, C)
    args, kw, deltas = _channel_inputs(torch.float32, "cpu", "both")
    results = []
    for n in (1, 2):
        with num_threads(n):
            results.append(_no_grad(prosg.ops.rwkv7_channel_mix_step, *args, **kw, deltas=deltas))
    assert torch.equal(*results), "the channel-mix step differs between 1 and 2 threads"
