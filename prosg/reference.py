"""Slow, obviously-correct float64 references of every prosg op.

They follow the definitions literally (dense per-sample weights, explicit loops over
time) and are what the tests compare the kernels against. Not for production use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prosg.numerics import EMPTY_MAX


def lowrank_linear_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, U: Tensor | None = None, V: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Materialises ``W_b = W + scale * U_b V_b^T`` for each sample, in float64.

    x: (B T Din) or (B Din); weight: (Dout Din); bias: (Dout); U: (B Dout r); V: (B Din r).
    Returns y: (B T Dout) or (B Dout), float64.
    """
    squeeze = x.dim() == 2
    x = (x.unsqueeze(1) if squeeze else x).double()
    batch = x.shape[0]
    W = weight.double().expand(batch, *weight.shape)
    if U is not None:
        W = W + scale * torch.bmm(U.double(), V.double().transpose(1, 2))
    y = torch.einsum("btd,bod->bto", x, W)
    if bias is not None:
        y = y + bias.double()
    return y.squeeze(1) if squeeze else y


def wkv4_ref(
    time_decay: Tensor, time_first: Tensor, key: Tensor, value: Tensor, state: Tensor | None = None,
    key_lowrank: tuple[Tensor, Tensor] | None = None, value_lowrank: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The RWKV-4 recurrence step by step in float64, exactly as transformers'
    ``rwkv_linear_attention_cpu`` writes it, with the effective key/value materialised.

    time_decay, time_first: (C); key, value: (B T C); state: (B 3 C), rows (a, b, p), or
    None for (0, 0, -1e38); key_lowrank, value_lowrank: (z (B T r), U (B C r)), adding
    z U^T to key / value. Returns (out (B T C), state_out (B 3 C)), both float64 and
    differentiable.
    """
    k = key.double()
    v = value.double()
    if key_lowrank is not None:
        k = k + torch.bmm(key_lowrank[0].double(), key_lowrank[1].double().transpose(1, 2))
    if value_lowrank is not None:
        v = v + torch.bmm(value_lowrank[0].double(), value_lowrank[1].double().transpose(1, 2))
    w = -torch.exp(time_decay.double())
    u = time_first.double()
    if state is None:
        a = k.new_zeros(k.shape[0], k.shape[2])
        b = k.new_zeros(k.shape[0], k.shape[2])
        p = k.new_full((k.shape[0], k.shape[2]), EMPTY_MAX)
    else:
        a, b, p = state.double().unbind(1)
    outs = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        outs.append((e1 * a + e2 * vt) / (e1 * b + e2))
        q = torch.maximum(p + w, kt)
        e1, e2 = torch.exp(p + w - q), torch.exp(kt - q)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
    out = torch.stack(outs, 1) if outs else torch.zeros_like(k)
    return out, torch.stack([a, b, p], 1)


def wkv7_ref(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The RWKV-7 recurrence step by step in float64, as its definition writes it:
    d = exp(-exp(w)); S <- S (diag(d) + a b^T) + v k^T; out = S r (after the update).

    r, w, k, v, a, b: (B T H N); state: (B H N N) indexed [value i, key j], or None for
    zeros. Returns (out (B T H N), state_out (B H N N)), both float64 and differentiable.
    """
    r, w, k, v, a, b = (x.double() for x in (r, w, k, v, a, b))
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N) if state is None else state.double()
    d = torch.exp(-torch.exp(w))
    outs = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = (S * d[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
             + sa[..., :, None] * b[:, t, :, None, :])
        outs.append(torch.einsum("bhij,bhj->bhi", S, r[:, t]))
    out = torch.stack(outs, 1) if outs else r.new_zeros(B, 0, H, N)
    return out, S


def _lerp(x: Tensor, shift: Tensor, mix: Tensor) -> Tensor:
    return shift + mix.reshape(-1) * (x - shift)


def _projection(scale: float):
    def project(inp: Tensor, weight: Tensor, uv: tuple[Tensor, Tensor] | None) -> Tensor:
        U, V = (None, None) if uv is None else uv
        return lowrank_linear_ref(inp, weight, None, U, V, scale)
    return project


def time_mix_step_ref(
    x: Tensor, shift: Tensor, state: Tensor, time_mix_key: Tensor, time_mix_value: Tensor,
    time_mix_receptance: Tensor, time_decay: Tensor, time_first: Tensor, key_weight: Tensor, value_weight: Tensor,
    receptance_weight: Tensor, output_weight: Tensor, deltas=None, scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One decode step of RWKV-4's time mixing (``rwkv4_time_mix_step``) in float64: the
    token-shift lerps, the projections with dense per-sample weights, one wkv4 step, the
    receptance gate, the output projection.

    x, shift: (B H); state: (B 3 C); time_mix_*: H elements; time_decay, time_first: (C);
    key/value/receptance_weight: (C H); output_weight: (H C); deltas: None or 4 entries
    (key, value, receptance, output), each None or (U (B Dout r), V (B Din r)).
    Returns (out (B H), state_out (B 3 C)).
    """
    d = [None] * 4 if deltas is None else deltas
    project = _projection(scale)
    x, shift = x.double(), shift.double()
    k = project(_lerp(x, shift, time_mix_key.double()), key_weight, d[0])
    v = project(_lerp(x, shift, time_mix_value.double()), value_weight, d[1])
    r = project(_lerp(x, shift, time_mix_receptance.double()), receptance_weight, d[2])
    y, state_out = wkv4_ref(time_decay, time_first, k.unsqueeze(1), v.unsqueeze(1), state)
    return project(torch.sigmoid(r) * y[:, 0], output_weight, d[3]), state_out


def channel_mix_step_ref(
    x: Tensor, shift: Tensor, time_mix_key: Tensor, time_mix_receptance: Tensor, key_weight: Tensor,
    receptance_weight: Tensor, value_weight: Tensor, deltas=None, scale: float = 1.0,
) -> Tensor:
    """One decode step of RWKV-4's channel mixing (``rwkv4_channel_mix_step``) in
    float64: sigmoid(W_r xr) * W_v relu(W_k xk)^2 with dense per-sample weights.

    x, shift: (B H); time_mix_*: H elements; key_weight: (F H); receptance_weight: (H H);
    value_weight: (H F); deltas: None or 3 entries (key, receptance, value), each None or
    (U (B Dout r), V (B Din r)). Returns out (B H).
    """
    d = [None] * 3 if deltas is None else deltas
    project = _projection(scale)
    x, shift = x.double(), shift.double()
    k = torch.relu(project(_lerp(x, shift, time_mix_key.double()), key_weight, d[0])) ** 2
    return torch.sigmoid(project(_lerp(x, shift, time_mix_receptance.double()), receptance_weight, d[1])) * project(
        k, value_weight, d[2])


def _stored_projection(scale: float, rounded):
    """_projection as a 16-bit lowrank_linear stores it: the shared product rounded to
    the storage dtype, then the low-rank term added and the sum rounded again."""
    def project(inp: Tensor, weight: Tensor, uv: tuple[Tensor, Tensor] | None) -> Tensor:
        base = lowrank_linear_ref(inp, weight, None, None, None, scale)
        if uv is None:
            return rounded(base)
        return rounded(rounded(base) + (lowrank_linear_ref(inp, weight, None, uv[0], uv[1], scale) - base))
    return project


def rwkv7_channel_mix_step_ref(
    x: Tensor, shift: Tensor, *, x_k: Tensor, key_weight: Tensor, value_weight: Tensor, deltas=None,
    scale: float = 1.0, stored: torch.dtype | None = None,
) -> Tensor:
    """One decode step of RWKV-7's channel mixing (``rwkv7_channel_mix_step``) in
    float64: ``value(relu(key(x + (shift - x) x_k))^2)`` with dense per-sample weights.

    x, shift: (B C); x_k: C elements; key_weight: (F C); value_weight: (C F); deltas:
    None or 2 entries (key, value), each None or (U (B Dout r), V (B Din r)).
    ``stored``: the dtype of the op's stored intermediates (the mix, the key
    projection, with a delta its shared part too, the squared ReLU), rounded to it here
    as in :func:`rwkv7_time_mix_step_ref`. Returns out (B C).
    """
    d = [None] * 2 if deltas is None else deltas

    def rounded(t):
        return t if stored is None else t.to(stored).double()

    project = _stored_projection(scale, rounded)
    x, shift = x.double(), shift.double()
    xk = rounded(x + (shift - x) * x_k.double().reshape(-1))
    k = rounded(torch.relu(project(xk, key_weight, d[0])) ** 2)
    return project(k, value_weight, d[1])


def rwkv7_time_mix_step_ref(
    x: Tensor, shift: Tensor, wkv_state: Tensor, v_first: Tensor | None, *, x_r, x_w, x_k, x_v, x_a, x_g, w0, w1, w2,
    a0, a1, a2, g1, g2, v0, v1, v2, k_k, k_a, r_k, receptance_weight, key_weight, value_weight, output_weight,
    ln_x_weight, ln_x_bias, ln_x_eps: float, deltas=None, scale: float = 1.0, stored: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step of RWKV-7's time mixing (``rwkv7_time_mix_step``) in float64,
    the x070 definition written out: token-shift mixes, projections with dense
    per-sample weights, the low-rank MLPs, the removal key and in-context rate, the
    value residual (when ``v_first`` is given), one :func:`wkv7_ref` step, the per-head
    GroupNorm, bonus and gate, the output projection.

    x, shift, v_first: (B C); wkv_state: (B H N N); r_k: (H N); the rest as
    ``prosg.ops.rwkv7_time_mix_step``. Returns (out (B C), wkv_state_out (B H N N),
    v (B C): the value projection before the residual).

    ``stored``: the dtype in which the op stores its intermediates (the mixes, the
    projections, the low-rank MLPs' hidden layers and outputs, the gated output before
    its projection; the decay MLP's in ``w1``'s dtype); each is rounded to it here, so a
    16-bit op is compared with float64 arithmetic on the same stored values.
    """
    d = [None] * 4 if deltas is None else deltas
    project = _projection(scale)
    x, shift = x.double(), shift.double()
    B, C = x.shape
    H, N = r_k.shape

    def rounded(t, dtype=stored):
        return t if dtype is None else t.to(dtype).double()

    def mix(m):
        return rounded(x + (shift - x) * m.double().reshape(C))

    def vec(t):
        return t.double().reshape(C)

    r = rounded(project(mix(x_r), receptance_weight, d[2]))
    k = rounded(project(mix(x_k), key_weight, d[0]))
    v_proj = rounded(project(mix(x_v), value_weight, d[1]))
    w_stored = None if stored is None else w1.dtype
    w_lin = rounded(rounded(torch.tanh(rounded(mix(x_w) @ w1.double(), w_stored)), w_stored) @ w2.double(), w_stored)
    w = -torch.nn.functional.softplus(-(vec(w0) + w_lin)) - 0.5
    a = torch.sigmoid(vec(a0) + rounded(rounded(mix(x_a) @ a1.double()) @ a2.double()))
    g = rounded(rounded(torch.sigmoid(rounded(mix(x_g) @ g1.double()))) @ g2.double())
    kk = torch.nn.functional.normalize((k * vec(k_k)).view(B, H, N), dim=-1, p=2.0).view(B, C)
    k = k * (1 + (a - 1) * vec(k_a))
    v = v_proj
    if v_first is not None:
        v_lin = rounded(rounded(mix(x_v) @ v1.double()) @ v2.double())
        v = v + (v_first.double() - v) * torch.sigmoid(vec(v0) + v_lin)
    heads = lambda t: t.view(B, 1, H, N)  # noqa: E731
    y, state_out = wkv7_ref(heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a), wkv_state)
    y = y.view(B, H, N)
    mean = y.mean(-1, keepdim=True)
    var = ((y - mean) ** 2).mean(-1, keepdim=True)
    gn = ((y - mean) / torch.sqrt(var + ln_x_eps)).view(B, C) * vec(ln_x_weight) + vec(ln_x_bias)
    bonus = (r * k * r_k.double().reshape(C)).view(B, H, N).sum(-1, keepdim=True) * v.view(B, H, N)
    out = project(rounded((gn + bonus.view(B, C)) * g), output_weight, d[3])
    return out, state_out, v_proj
