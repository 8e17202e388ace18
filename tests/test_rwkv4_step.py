"""Fused RWKV-4 decode steps (prosg.ops.rwkv4_time_mix_step / rwkv4_channel_mix_step)
against a float64 composition of the definitions: token-shift lerps, dense per-sample
weights W + scale U_b V_b^T, the reference recurrence for one step, the gates."""

from __future__ import annotations

import pytest
import torch

import prosg
from prosg.reference import channel_mix_step_ref, time_mix_step_ref, wkv4_ref
from tolerances import assert_close

B, H, C, F = 3, 37, 45, 70  # odd sizes; attention width C != hidden H
R = 5


def _delta(dout, din, dtype, device):
    return (torch.randn(B, dout, R, dtype=dtype, device=device) / R**0.5,
            torch.randn(B, din, R, dtype=dtype, device=device) / din**0.5)


def _time_mix_inputs(dtype, device, with_deltas):
    def t(*s, scale=1.0):
        return (torch.randn(*s, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    state = wkv4_ref(torch.randn(C) * 0.3, torch.randn(C) * 0.3, torch.randn(B, 4, C), torch.randn(B, 4, C))[1]
    state = state.to(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    args = [t(B, H), t(B, H), state, torch.rand(1, 1, H, dtype=dtype, device=device),
            torch.rand(1, 1, H, dtype=dtype, device=device), torch.rand(1, 1, H, dtype=dtype, device=device),
            (torch.randn(C) * 0.5).to(device), (torch.randn(C) * 0.5).to(device),
            t(C, H, scale=H**-0.5), t(C, H, scale=H**-0.5), t(C, H, scale=H**-0.5), t(H, C, scale=C**-0.5)]
    deltas = None
    if with_deltas == "all":
        deltas = [_delta(C, H, dtype, device), _delta(C, H, dtype, device), _delta(C, H, dtype, device),
                  _delta(H, C, dtype, device)]
    elif with_deltas == "some":
        deltas = [_delta(C, H, dtype, device), None, None, _delta(H, C, dtype, device)]
    return args, deltas


def _channel_mix_inputs(dtype, device, with_deltas):
    def t(*s, scale=1.0):
        return (torch.randn(*s, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    args = [t(B, H), t(B, H), torch.rand(1, 1, H, dtype=dtype, device=device),
            torch.rand(1, 1, H, dtype=dtype, device=device),
            t(F, H, scale=H**-0.5), t(H, H, scale=H**-0.5), t(H, F, scale=F**-0.5)]
    deltas = None
    if with_deltas == "all":
        deltas = [_delta(F, H, dtype, device), _delta(H, H, dtype, device), _delta(H, F, dtype, device)]
    elif with_deltas == "some":
        deltas = [None, _delta(H, H, dtype, device), None]
    return args, deltas


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("with_deltas", ["none", "some", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_time_mix_step_matches_reference(device, dtype, with_deltas):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    args, deltas = _time_mix_inputs(dtype, device, with_deltas)
    with torch.no_grad():
        out, state = prosg.ops.rwkv4_time_mix_step(*args, deltas=deltas, scale=0.7)
    ref_out, ref_state = time_mix_step_ref(*args, deltas, 0.7)
    assert out.dtype == dtype and out.shape == (B, H)
    assert state.dtype == args[2].dtype and state.shape == (B, 3, C)
    # The state is float32 whatever the input dtype; the projections feeding it are
    # rounded to the input dtype, so the tolerance is the input dtype's.
    assert_close(state, ref_state, dtype, what="wkv state")
    assert_close(out, ref_out, dtype, what="time-mix output")


@pytest.mark.parametrize("with_deltas", ["none", "some", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_mix_step_matches_reference(device, dtype, with_deltas):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only")
    args, deltas = _channel_mix_inputs(dtype, device, with_deltas)
    with torch.no_grad():
        out = prosg.ops.rwkv4_channel_mix_step(*args, deltas=deltas, scale=0.7)
    assert out.dtype == dtype and out.shape == (B, H)
    assert_close(out, channel_mix_step_ref(*args, deltas, 0.7), dtype, what="channel-mix output")


def test_time_mix_step_equals_sequence_path_of_the_model():
    """One decode step through the fused op equals the same token through the
    sequence path (wkv4 + lowrank_linear), deltas and state included."""
    from prosg.models.testing import random_delta, random_model

    model = random_model(seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    delta = random_delta(model, batch=2, rank=3)
    with torch.no_grad():
        _, state = model(ids[:, :5], delta=delta)
        fused_logits, fused_state = model(ids[:, 5:], state=state, delta=delta)
    # With grad enabled on parameters the fused op is bypassed: the sequence path runs.
    seq_logits, seq_state = model(ids[:, 5:], state=state, delta=delta)
    assert_close(fused_logits, seq_logits.detach(), torch.float32, what="logits")
    assert_close(fused_state.wkv, seq_state.wkv.detach(), torch.float32, what="wkv state")


def test_opcheck():
    args, deltas = _time_mix_inputs(torch.float32, "cpu", "all")
    flat = [t for uv in deltas for t in uv]
    torch.library.opcheck(torch.ops.prosg.rwkv4_time_mix_step.default, (*args, flat, 0.5))
    torch.library.opcheck(torch.ops.prosg.rwkv4_time_mix_step.default, (*args, [], 1.0))
    cargs, cdeltas = _channel_mix_inputs(torch.float32, "cpu", "some")
    cflat = [t for uv in cdeltas for t in (uv if uv is not None else (None, None))]
    torch.library.opcheck(torch.ops.prosg.rwkv4_channel_mix_step.default, (*cargs, cflat, 0.5))


def test_compile_fullgraph():
    args, deltas = _time_mix_inputs(torch.float32, "cpu", "all")
    cargs, cdeltas = _channel_mix_inputs(torch.float32, "cpu", "all")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(a, d, ca, cd):
        out, state = prosg.ops.rwkv4_time_mix_step(*a, deltas=d)
        return out + prosg.ops.rwkv4_channel_mix_step(*ca, deltas=cd), state

    with torch.no_grad():
        out, state = step(args, deltas, cargs, cdeltas)
        ref_out, ref_state = prosg.ops.rwkv4_time_mix_step(*args, deltas=deltas)
        ref_out = ref_out + prosg.ops.rwkv4_channel_mix_step(*cargs, deltas=cdeltas)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(state, ref_state)


def test_bad_inputs():
    args, deltas = _time_mix_inputs(torch.float32, "cpu", "all")
    step = prosg.ops.rwkv4_time_mix_step
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"x must have shape \[B, H\]"):
            step(args[0].unsqueeze(1), *args[1:])
        with pytest.raises(ValueError, match="shift must have shape"):
            step(args[0], args[1][:, :-1], *args[2:])
        with pytest.raises(ValueError, match="wkv_state must have dtype"):
            step(*args[:2], args[2].double(), *args[3:])
        with pytest.raises(ValueError, match="wkv_state must have shape"):
            step(*args[:2], args[2][:, :2], *args[3:])
        with pytest.raises(ValueError, match="time_mix_value must have H=37 elements"):
            step(*args[:4], args[4][..., :-1], *args[5:])
        with pytest.raises(ValueError, match="output_weight must have shape"):
            step(*args[:11], args[11].t())
        with pytest.raises(ValueError, match="time_first must have shape"):
            step(*args[:7], args[7][:-1], *args[8:])
        with pytest.raises(ValueError, match="deltas must list 4 entries"):
            step(*args, deltas=deltas[:3])
        with pytest.raises(ValueError, match="the value delta must be a pair"):
            step(*args, deltas=[None, deltas[1][0], None, None])
        with pytest.raises(ValueError, match="needs both U and V"):
            torch.ops.prosg.rwkv4_time_mix_step(*args, [deltas[0][0], None] + [None] * 6, 1.0)
        bad = list(deltas)
        bad[0] = (deltas[0][0][:, :, :2], deltas[0][1])
        with pytest.raises(ValueError, match="same rank"):
            step(*args, deltas=bad)
    with pytest.raises(RuntimeError, match="inference-only"):
        step(args[0].requires_grad_(), *args[1:])
    cargs, _ = _channel_mix_inputs(torch.float32, "cpu", "none")
    with torch.no_grad(), pytest.raises(ValueError, match="value_weight must have shape"):
        prosg.ops.rwkv4_channel_mix_step(*cargs[:6], cargs[6].t())


def test_empty_batch():
    args, _ = _time_mix_inputs(torch.float32, "cpu", "none")
    args = [a[:0] if i in (0, 1, 2) else a for i, a in enumerate(args)]
    with torch.no_grad():
        out, state = prosg.ops.rwkv4_time_mix_step(*args)
    assert out.shape == (0, H) and state.shape == (0, 3, C)
