"""Slow, obviously-correct float64 references of every prosg op.

They follow the definitions literally (dense per-sample weights, explicit loops over
time) and are what the tests compare the kernels against. Not for production use.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lowrank_linear_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, U: Tensor | None = None, V: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Materialises ``W_b = W + scale * U_b V_b^T`` for each sample, in float64."""
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

    Returns ``(out [B, T, C], state_out [B, 3, C])``, both float64 and differentiable.
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
        p = k.new_full((k.shape[0], k.shape[2]), -1e38)
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
