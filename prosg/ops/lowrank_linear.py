"""Fused rank-r perturbed projection: ``x @ (W + scale * U_b V_b^T)^T + bias`` per sample."""

from __future__ import annotations

import torch
from torch import Tensor

_OP = "prosg::lowrank_linear"
_BWD = "prosg::lowrank_linear_backward"


def lowrank_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    U: Tensor | None = None,
    V: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """``y[b, t] = x[b, t] @ weight.T + bias + scale * (x[b, t] @ V[b]) @ U[b].T``.

    Args:
        x: ``[B, T, Din]`` or ``[B, Din]``.
        weight: ``[Dout, Din]``, shared by the batch.
        bias: ``[Dout]`` or None.
        U, V: ``[B, Dout, r]`` and ``[B, Din, r]``: one rank-r delta ``U_b V_b^T`` per
            sample, both or neither. The per-sample weight is never materialised.
        scale: multiplies the delta.

    float32, float16 and bfloat16 (float32 accumulation) on CPU and CUDA; float64 on CPU.
    Differentiable in x, weight, bias, U and V.
    """
    return torch.ops.prosg.lowrank_linear.default(x, weight, bias, U, V, float(scale))


@torch.library.register_fake(_OP)
def _lowrank_linear_fake(x, weight, bias, U, V, scale):
    torch._check(x.dim() in (2, 3), lambda: f"prosg.lowrank_linear: x must be 2-D or 3-D, got {tuple(x.shape)}")
    torch._check(weight.dim() == 2, lambda: f"prosg.lowrank_linear: weight must be 2-D, got {tuple(weight.shape)}")
    torch._check((U is None) == (V is None), lambda: "prosg.lowrank_linear: U and V must be given together")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(_BWD)
def _lowrank_linear_backward_fake(grad_out, x, weight, U, V, scale, output_mask):
    # One fresh empty tensor per unrequested gradient: the kernel returns distinct
    # tensors, and the schema declares no aliasing between outputs.
    def nothing():
        return x.new_empty((0,))

    has_delta = U is not None and V is not None
    return (
        x.new_empty(x.shape) if output_mask[0] else nothing(),
        weight.new_empty(weight.shape) if output_mask[1] else nothing(),
        x.new_empty((weight.shape[0],)) if output_mask[2] else nothing(),
        U.new_empty(U.shape) if has_delta and output_mask[3] else nothing(),
        V.new_empty(V.shape) if has_delta and output_mask[4] else nothing(),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, U, V, scale = inputs
    ctx.save_for_backward(x, weight, U, V)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight, U, V = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and ctx.has_bias, need[3], need[4]]
    gx, gw, gb, gu, gv = torch.ops.prosg.lowrank_linear_backward.default(grad, x, weight, U, V, ctx.scale, mask)
    pick = [g if m else None for g, m in zip((gx, gw, gb, gu, gv), mask)]
    return (*pick, None)


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
