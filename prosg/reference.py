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
