"""``prosg selftest``: every op once, float32 on the CPU (and CUDA when visible), against
its float64 reference in :mod:`prosg.reference`; prints the max errors.

A quick check that a build computes what it should on this machine (the test suite is
the thorough one). Sizes are odd so no kernel path relies on round numbers.
"""

from __future__ import annotations

import torch

from prosg.reference import (
    channel_mix_step_ref,
    lowrank_linear_ref,
    rwkv7_channel_mix_step_ref,
    rwkv7_time_mix_step_ref,
    time_mix_step_ref,
    wkv4_ref,
    wkv7_ref,
)

#: A float32 result further than this from the float64 reference fails the check (the
#: errors measured are ~1e-6 .. 1e-5 at these sizes; 1e-3 leaves room, a wrong kernel is
#: off by O(1)).
TOLERANCE = 1e-3


def _checks(device: str):
    import prosg

    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).float().to(device)

    B, T, H, C, F, R = 2, 7, 37, 45, 70, 4
    x, W, U, V = r(B, T, H), r(C, H, scale=H**-0.5), r(B, C, R), r(B, H, R, scale=H**-0.5)
    y = prosg.ops.lowrank_linear(x, W, None, U, V, 0.5)
    yield "lowrank_linear", y, lowrank_linear_ref(x, W, None, U, V, 0.5)

    td, tf, k, v, z, Uk = r(C, scale=0.5), r(C, scale=0.5), r(B, T, C), r(B, T, C), r(B, T, R), r(B, C, R)
    out, state = prosg.ops.wkv4(td, tf, k, v, key_lowrank=(z, Uk))
    ref_out, ref_state = wkv4_ref(td, tf, k, v, key_lowrank=(z, Uk))
    yield "wkv4 (low-rank key)", out, ref_out
    yield "wkv4 state", state, ref_state

    # wkv7 as RWKV-7 calls it: a = -kk, b = kk * iclr with kk unit-norm per head, so the
    # transition stays a contraction; 3 heads of 16, a real initial state.
    NH, N = 3, 16
    kk = torch.nn.functional.normalize(r(B, T, NH, N), dim=-1)
    iclr = torch.rand(B, T, NH, N, generator=g).to(device)
    r7, w7, k7, v7 = r(B, T, NH, N), r(B, T, NH, N, scale=0.5) - 0.6, r(B, T, NH, N, scale=0.3), r(B, T, NH, N)
    s7 = r(B, NH, N, N, scale=0.3)
    out, state7 = prosg.ops.wkv7(r7, w7, k7, v7, -kk, kk * iclr, s7)
    ref_out, ref_state7 = wkv7_ref(r7, w7, k7, v7, -kk, kk * iclr, s7)
    yield "wkv7", out, ref_out
    yield "wkv7 state", state7, ref_state7

    def mix():
        return torch.rand(1, 1, H, generator=g).to(device)

    state = ref_state.float()
    deltas = [(r(B, C, R), r(B, H, R, scale=H**-0.5)), None, (r(B, C, R), r(B, H, R, scale=H**-0.5)),
              (r(B, H, R), r(B, C, R, scale=C**-0.5))]
    args = [r(B, H), r(B, H), state, mix(), mix(), mix(), td, tf, r(C, H, scale=H**-0.5), r(C, H, scale=H**-0.5),
            r(C, H, scale=H**-0.5), r(H, C, scale=C**-0.5)]
    with torch.no_grad():
        out, _ = prosg.ops.rwkv4_time_mix_step(*args, deltas=deltas, scale=0.7)
    yield "rwkv4_time_mix_step", out, time_mix_step_ref(*args, deltas, 0.7)[0]
    deltas = [(r(B, F, R), r(B, H, R, scale=H**-0.5)), None, (r(B, H, R), r(B, F, R, scale=F**-0.5))]
    args = [r(B, H), r(B, H), mix(), mix(), r(F, H, scale=H**-0.5), r(H, H, scale=H**-0.5), r(H, F, scale=F**-0.5)]
    with torch.no_grad():
        out = prosg.ops.rwkv4_channel_mix_step(*args, deltas=deltas, scale=0.7)
    yield "rwkv4_channel_mix_step", out, channel_mix_step_ref(*args, deltas, 0.7)

    # The RWKV-7 decode step of a later layer (value residual), 3 heads of 16, the wkv7
    # state above, deltas on the key and output projections.
    C7 = NH * N

    def vec():
        return torch.rand(C7, generator=g).to(device)

    kw = dict(x_r=vec(), x_w=vec(), x_k=vec(), x_v=vec(), x_a=vec(), x_g=vec(), w0=r(C7, scale=0.5) - 1,
              w1=r(C7, 8, scale=C7**-0.5), w2=r(8, C7, scale=0.3), a0=r(C7, scale=0.5), a1=r(C7, 8, scale=C7**-0.5),
              a2=r(8, C7, scale=0.3), g1=r(C7, 8, scale=C7**-0.5), g2=r(8, C7, scale=0.3), v0=r(C7, scale=0.5),
              v1=r(C7, 4, scale=C7**-0.5), v2=r(4, C7, scale=0.3), k_k=vec(), k_a=vec(), r_k=r(NH, N, scale=0.3),
              receptance_weight=r(C7, C7, scale=C7**-0.5), key_weight=r(C7, C7, scale=C7**-0.5),
              value_weight=r(C7, C7, scale=C7**-0.5), output_weight=r(C7, C7, scale=C7**-0.5),
              ln_x_weight=vec() + 0.5, ln_x_bias=r(C7, scale=0.1), ln_x_eps=64e-5)
    deltas = [(r(B, C7, R), r(B, C7, R, scale=C7**-0.5)), None, None, (r(B, C7, R), r(B, C7, R, scale=C7**-0.5))]
    args = (r(B, C7), r(B, C7), state7, r(B, C7))
    with torch.no_grad():
        out, _, _ = prosg.ops.rwkv7_time_mix_step(*args, **kw, deltas=deltas, scale=0.7)
    yield "rwkv7_time_mix_step", out, rwkv7_time_mix_step_ref(*args, **kw, deltas=deltas, scale=0.7)[0]
    # One sample: the CPU's single-row kernel for the low-rank MLPs.
    one = [None if d is None else (d[0][:1], d[1][:1]) for d in deltas]
    args = tuple(a[:1] for a in args)
    with torch.no_grad():
        out, _, _ = prosg.ops.rwkv7_time_mix_step(*args, **kw, deltas=one, scale=0.7)
    yield "rwkv7_time_mix_step B=1", out, rwkv7_time_mix_step_ref(*args, **kw, deltas=one, scale=0.7)[0]
    deltas = [(r(B, F, R), r(B, C7, R, scale=C7**-0.5)), (r(B, C7, R), r(B, F, R, scale=F**-0.5))]
    kw = dict(x_k=vec(), key_weight=r(F, C7, scale=C7**-0.5), value_weight=r(C7, F, scale=F**-0.5))
    args = (r(B, C7), r(B, C7))
    with torch.no_grad():
        out = prosg.ops.rwkv7_channel_mix_step(*args, **kw, deltas=deltas, scale=0.7)
    yield "rwkv7_channel_mix_step", out, rwkv7_channel_mix_step_ref(*args, **kw, deltas=deltas, scale=0.7)


def selftest(print_fn=print) -> dict[str, float]:
    """``{"<device> <op>": max |error|}``; raises RuntimeError naming the ops over
    :data:`TOLERANCE` (after printing every line)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    errors, bad = {}, []
    for device in devices:
        for name, got, want in _checks(device):
            err = (got.double().cpu() - want.double().cpu()).abs().max().item()
            key = f"{device} {name}"
            errors[key] = err
            ok = err <= TOLERANCE
            if not ok:
                bad.append(key)
            print_fn(f"{key:34} max |error| vs float64 reference {err:.2e}  {'ok' if ok else 'FAIL'}")
    if bad:
        raise RuntimeError(f"selftest: {', '.join(bad)} differ from the float64 reference by more than "
                           f"{TOLERANCE:g}: this build computes wrong results here")
    return errors
