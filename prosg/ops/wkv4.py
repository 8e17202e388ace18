"""RWKV-4 time-mixing recurrence (WKV) with fused rank-r key/value perturbations."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from prosg.ops._checks import (
    accumulation_dtype,
    allows_double,
    check,
    check_dtype,
    check_floating,
    check_same_device,
    check_shape,
    shape_str,
)

_OP = "prosg::wkv4"
_BWD = "prosg::wkv4_backward"


def _factors(name: str, lowrank) -> tuple[Tensor | None, Tensor | None]:
    if lowrank is None:
        return None, None
    if not isinstance(lowrank, (tuple, list)) or len(lowrank) != 2:
        raise ValueError(f"prosg.wkv4: {name} must be a pair (z [B, T, r], U [B, C, r]) or None, got {type(lowrank)}")
    return lowrank[0], lowrank[1]


def wkv4(
    time_decay: Tensor,
    time_first: Tensor,
    key: Tensor,
    value: Tensor,
    state: Tensor | None = None,
    key_lowrank: tuple[Tensor, Tensor] | None = None,
    value_lowrank: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """RWKV-4 WKV recurrence, as transformers' ``rwkv_linear_attention_cpu`` computes it.

    Args:
        time_decay, time_first: ``[C]`` raw parameters (the decay is ``-exp(time_decay)``).
        key, value: ``[B, T, C]``.
        state: ``[B, 3, C]`` (numerator, denominator, running max) in float32 (float64
            for float64 inputs); None starts from (0, 0, -1e38).
        key_lowrank, value_lowrank: ``(z [B, T, r], U [B, C, r])``: the effective key is
            ``key + z @ U.transpose(1, 2)``; it is formed inside the kernel, never in memory.

    Returns:
        ``(out [B, T, C]`` in value's dtype, ``state_out [B, 3, C])``. Differentiable in
        every tensor argument, the initial state included; once only (``create_graph=True``
        raises).
    """
    kz, ku = _factors("key_lowrank", key_lowrank)
    vz, vu = _factors("value_lowrank", value_lowrank)
    return torch.ops.prosg.wkv4.default(time_decay, time_first, key, value, state, kz, ku, vz, vu)


class Dims(NamedTuple):
    """The sizes of a call (SymInts when traced with dynamic shapes)."""

    batch: int
    seqlen: int
    channels: int
    acc: torch.dtype  # the state's dtype


def _validate_lowrank(op: str, z_name: str, u_name: str, z: Tensor | None, U: Tensor | None, key: Tensor,
                      d: Dims) -> None:
    given = z_name if z is not None else u_name
    check((z is None) == (U is None),
          lambda: f"{op}: {z_name} and {u_name} must be given together (got {given} alone)")
    if z is None:
        return
    check(z.dim() == 3, lambda: f"{op}: {z_name} must have shape [B={d.batch}, T={d.seqlen}, r], got "
                                f"{shape_str(z.shape)}")
    check(U.dim() == 3, lambda: f"{op}: {u_name} must have shape [B={d.batch}, C={d.channels}, r], got "
                                f"{shape_str(U.shape)}")
    check(z.shape[2] == U.shape[2], lambda: f"{op}: {z_name} and {u_name} must have the same rank r, got "
                                            f"{shape_str(z.shape)} and {shape_str(U.shape)}")
    check_shape(op, z_name, z, (d.batch, d.seqlen, z.shape[2]))
    check_shape(op, u_name, U, (d.batch, d.channels, z.shape[2]))
    check_same_device(op, z_name, z, key, "key")
    check_same_device(op, u_name, U, key, "key")
    check_dtype(op, z_name, z, key.dtype)
    check_dtype(op, u_name, U, key.dtype)


def validate(op: str, time_decay: Tensor, time_first: Tensor, key: Tensor, value: Tensor, state: Tensor | None,
             key_z: Tensor | None, key_u: Tensor | None, value_z: Tensor | None, value_u: Tensor | None) -> Dims:
    """The checks of ``validate`` in csrc/wkv4/wkv4.cpp, in its order and words."""
    check(key.dim() == 3, lambda: f"{op}: key must have shape [B, T, C], got {shape_str(key.shape)}")
    double_ok = allows_double(key)
    check_floating(op, "key", key, allow_double=double_ok)
    d = Dims(*key.shape, accumulation_dtype(key.dtype))
    check_shape(op, "value", value, (d.batch, d.seqlen, d.channels))
    check_same_device(op, "value", value, key, "key")
    check_dtype(op, "value", value, key.dtype)
    check_shape(op, "time_decay", time_decay, (d.channels,))
    check_shape(op, "time_first", time_first, (d.channels,))
    check_same_device(op, "time_decay", time_decay, key, "key")
    check_same_device(op, "time_first", time_first, key, "key")
    check_floating(op, "time_decay", time_decay, allow_double=double_ok)
    check_floating(op, "time_first", time_first, allow_double=double_ok)
    if state is not None:
        check_shape(op, "state", state, (d.batch, 3, d.channels))
        check_same_device(op, "state", state, key, "key")
        check_dtype(op, "state", state, d.acc)
    _validate_lowrank(op, "key_z", "key_u", key_z, key_u, key, d)
    _validate_lowrank(op, "value_z", "value_u", value_z, value_u, key, d)
    return d


def validate_backward(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, grad_out,
                      grad_state_out) -> Dims:
    """The checks of ``backward`` in csrc/wkv4/wkv4.cpp."""
    op = "prosg.wkv4_backward"
    d = validate(op, time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u)
    check_shape(op, "grad_out", grad_out, (d.batch, d.seqlen, d.channels))
    check_same_device(op, "grad_out", grad_out, key, "key")
    check_dtype(op, "grad_out", grad_out, value.dtype)
    check_shape(op, "grad_state_out", grad_state_out, (d.batch, 3, d.channels))
    check_same_device(op, "grad_state_out", grad_state_out, key, "key")
    check_dtype(op, "grad_state_out", grad_state_out, d.acc)
    return d


@torch.library.register_fake(_OP)
def _wkv4_fake(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u):
    d = validate("prosg.wkv4", time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u)
    return value.new_empty((d.batch, d.seqlen, d.channels)), key.new_empty((d.batch, 3, d.channels), dtype=d.acc)


@torch.library.register_fake(_BWD)
def _wkv4_backward_fake(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, grad_out,
                        grad_state_out):
    d = validate_backward(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, grad_out,
                          grad_state_out)
    B, T, C = d.batch, d.seqlen, d.channels
    return (
        time_decay.new_empty((C,)),
        time_first.new_empty((C,)),
        key.new_empty((B, T, C)),
        value.new_empty((B, T, C)),
        key.new_empty((B, 3, C) if state is not None else (0,), dtype=d.acc),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _lowrank_grads(g_eff: Tensor, z: Tensor | None, U: Tensor | None, need_z: bool, need_u: bool):
    """dL/dz = g_eff @ U and dL/dU = g_eff^T @ z (batched GEMMs, float32 accumulation)."""
    if z is None:
        return None, None
    acc = torch.float64 if g_eff.dtype == torch.float64 else torch.float32
    g = g_eff.to(acc)
    gz = torch.bmm(g, U.to(acc)).to(z.dtype) if need_z else None
    gu = torch.bmm(g.transpose(1, 2), z.to(acc)).to(U.dtype) if need_u else None
    return gz, gu


def _backward(ctx, grad_out, grad_state):
    # Grad mode is on inside a backward exactly when it runs with create_graph=True. The
    # backward kernel has no derivative, so a graph of this backward would carry wrong
    # (zero) second derivatives: refuse rather than return them.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "prosg.wkv4: double backward is not supported (its backward kernel has no derivative), so "
            "torch.autograd.grad / backward through it cannot take create_graph=True; for higher derivatives "
            "use the float64 reference prosg.reference.wkv4_ref")
    time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u = ctx.saved_tensors
    B, T, C = key.shape
    if grad_out is None:
        grad_out = value.new_zeros((B, T, C))
    if grad_state is None:
        grad_state = key.new_zeros((B, 3, C), dtype=accumulation_dtype(key.dtype))
    g_td, g_tf, g_k, g_v, g_state = torch.ops.prosg.wkv4_backward.default(
        time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, grad_out, grad_state)
    need = ctx.needs_input_grad
    g_kz, g_ku = _lowrank_grads(g_k, key_z, key_u, need[5], need[6])
    g_vz, g_vu = _lowrank_grads(g_v, value_z, value_u, need[7], need[8])
    return (
        g_td if need[0] else None,
        g_tf if need[1] else None,
        g_k if need[2] else None,
        g_v if need[3] else None,
        g_state if (state is not None and need[4]) else None,
        g_kz, g_ku, g_vz, g_vu,
    )


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
# The backward op refuses inputs that require grad: an Autograd kernel in C++
# (bindings/torch_bindings.cpp).
