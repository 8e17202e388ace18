"""Fused rank-r perturbed projection: ``x @ (W + scale * U_b V_b^T)^T + bias`` per sample."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from prosg.ops._checks import (
    ANY,
    accumulation_dtype,
    allows_double,
    check,
    check_dtype,
    check_floating,
    check_same_device,
    check_shape,
    shape_str,
)

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
    Differentiable in x, weight, bias, U and V, to any order (``create_graph=True``).
    """
    return torch.ops.prosg.lowrank_linear.default(x, weight, bias, U, V, float(scale))


class Dims(NamedTuple):
    """The sizes of a call (SymInts when traced with dynamic shapes)."""

    batch: int
    seqlen: int
    din: int
    dout: int
    rank: int
    has_delta: bool


def validate(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor | None, V: Tensor | None) -> Dims:
    """The checks of ``validate`` in csrc/lowrank_linear/lowrank_linear.cpp, in its order
    and words. ``op`` names the caller in the messages (the decode-step ops validate
    their projections here as ``prosg.lowrank_linear``, as their C++ does)."""
    check(x.dim() in (2, 3), lambda: f"{op}: x must have shape [B, T, Din] or [B, Din], got {shape_str(x.shape)}")
    check_floating(op, "x", x, allow_double=allows_double(x))
    batch, seqlen, din = x.shape[0], x.shape[1] if x.dim() == 3 else 1, x.shape[-1]
    check(weight.dim() == 2, lambda: f"{op}: weight must have shape [Dout, {din}], got {shape_str(weight.shape)}")
    check_shape(op, "weight", weight, (ANY, din))
    check_same_device(op, "weight", weight, x, "x")
    check_dtype(op, "weight", weight, x.dtype)
    dout = weight.shape[0]
    if bias is not None:
        check_shape(op, "bias", bias, (dout,))
        check_same_device(op, "bias", bias, x, "x")
        check_dtype(op, "bias", bias, x.dtype)
    given, missing = ("U", "V") if U is not None else ("V", "U")
    check((U is None) == (V is None), lambda: f"{op}: U and V must be given together (got {given} without {missing})")
    if U is None:
        return Dims(batch, seqlen, din, dout, 0, False)
    check(U.dim() == 3, lambda: f"{op}: U must have shape [B={batch}, Dout={dout}, r], got {shape_str(U.shape)}")
    check(V.dim() == 3, lambda: f"{op}: V must have shape [B={batch}, Din={din}, r], got {shape_str(V.shape)}")
    check(U.shape[2] == V.shape[2], lambda: f"{op}: U and V must have the same rank r, got U {shape_str(U.shape)} "
                                            f"(r={U.shape[2]}) and V {shape_str(V.shape)} (r={V.shape[2]})")
    rank = U.shape[2]
    check_shape(op, "U", U, (batch, dout, rank))
    check_shape(op, "V", V, (batch, din, rank))
    check_same_device(op, "U", U, x, "x")
    check_same_device(op, "V", V, x, "x")
    check_dtype(op, "U", U, x.dtype)
    check_dtype(op, "V", V, x.dtype)
    return Dims(batch, seqlen, din, dout, rank, True)


def validate_backward(grad_out: Tensor, x: Tensor, weight: Tensor, U: Tensor | None, V: Tensor | None) -> Dims:
    """The checks of ``backward`` in csrc/lowrank_linear/lowrank_linear.cpp."""
    op = "prosg.lowrank_linear_backward"
    d = validate(op, x, weight, None, U, V)
    check_shape(op, "grad_out", grad_out, (d.batch, d.seqlen, d.dout) if x.dim() == 3 else (d.batch, d.dout))
    check_same_device(op, "grad_out", grad_out, x, "x")
    check_dtype(op, "grad_out", grad_out, x.dtype)
    return d


@torch.library.register_fake(_OP)
def _lowrank_linear_fake(x, weight, bias, U, V, scale):
    d = validate("prosg.lowrank_linear", x, weight, bias, U, V)
    return x.new_empty((*x.shape[:-1], d.dout))


@torch.library.register_fake(_BWD)
def _lowrank_linear_backward_fake(grad_out, x, weight, U, V, scale, output_mask):
    d = validate_backward(grad_out, x, weight, U, V)

    # One fresh empty tensor per unrequested gradient: the kernel returns distinct
    # tensors, and the schema declares no aliasing between outputs.
    def nothing():
        return x.new_empty((0,))

    return (
        x.new_empty(x.shape) if output_mask[0] else nothing(),
        weight.new_empty(weight.shape) if output_mask[1] else nothing(),
        x.new_empty((d.dout,)) if output_mask[2] else nothing(),
        U.new_empty(U.shape) if d.has_delta and output_mask[3] else nothing(),
        V.new_empty(V.shape) if d.has_delta and output_mask[4] else nothing(),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, U, V, scale = inputs
    ctx.save_for_backward(x, weight, U, V)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _differentiable_grads(grad: Tensor, x: Tensor, weight: Tensor, U: Tensor | None, V: Tensor | None,
                          scale: float, mask: list[bool]) -> list[Tensor | None]:
    """The backward kernel's formulas in differentiable ops, for ``create_graph=True``.

    dL/dx = g (W + scale U_b V_b^T) is lowrank_linear itself (weight W^T, the roles of U
    and V swapped), so it keeps the fused kernel and is differentiable to any order; the
    others are GEMMs accumulated as the kernel does (float32 for half inputs)."""
    x3, g3 = (x, grad) if x.dim() == 3 else (x.unsqueeze(1), grad.unsqueeze(1))
    gx = gw = gb = gu = gv = None
    if mask[0]:
        gx = lowrank_linear(grad, weight.t(), None, V, U, scale)
    if mask[1] or mask[2]:
        # Explicit row count: reshape(-1, 0) is ambiguous when Dout or Din is 0.
        rows = x3.shape[0] * x3.shape[1]
        g2 = g3.reshape(rows, weight.shape[0])
        if mask[1]:
            gw = g2.t().mm(x3.reshape(rows, weight.shape[1]))
        if mask[2]:
            gb = g2.sum(0)
    if U is not None and (mask[3] or mask[4]):
        acc = accumulation_dtype(x.dtype)
        if mask[3]:  # dL/dU_b = scale g_b^T (x_b V_b)
            gu = (torch.bmm(g3.transpose(1, 2).to(acc), torch.bmm(x3.to(acc), V.to(acc))) * scale).to(U.dtype)
        if mask[4]:  # dL/dV_b = scale x_b^T (g_b U_b)
            gv = (torch.bmm(x3.transpose(1, 2).to(acc), torch.bmm(g3.to(acc), U.to(acc))) * scale).to(V.dtype)
    return [gx, gw, gb, gu, gv]


def _backward(ctx, grad):
    x, weight, U, V = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and ctx.has_bias, need[3], need[4]]
    # Grad mode is on inside a backward exactly when it runs with create_graph=True.
    # The fused backward kernel has no derivative of its own, so that case takes the
    # same formulas in differentiable ops.
    if torch.is_grad_enabled():
        grads = _differentiable_grads(grad, x, weight, U, V, ctx.scale, mask)
    else:
        grads = torch.ops.prosg.lowrank_linear_backward.default(grad, x, weight, U, V, ctx.scale, mask)
    return (*[g if m else None for g, m in zip(grads, mask)], None)


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
# lowrank_linear_backward refuses inputs that require grad: an Autograd kernel in C++
# (bindings/torch_bindings.cpp).
