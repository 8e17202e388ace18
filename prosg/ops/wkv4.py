"""RWKV-4 time-mixing recurrence (WKV) with fused rank-r key/value perturbations."""

from __future__ import annotations

import torch
from torch import Tensor

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
        every tensor argument, the initial state included.
    """
    kz, ku = _factors("key_lowrank", key_lowrank)
    vz, vu = _factors("value_lowrank", value_lowrank)
    return torch.ops.prosg.wkv4.default(time_decay, time_first, key, value, state, kz, ku, vz, vu)


def _state_dtype(key: Tensor) -> torch.dtype:
    return torch.float64 if key.dtype == torch.float64 else torch.float32


@torch.library.register_fake(_OP)
def _wkv4_fake(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u):
    torch._check(key.dim() == 3, lambda: f"prosg.wkv4: key must be [B, T, C], got {tuple(key.shape)}")
    B, T, C = key.shape
    return value.new_empty((B, T, C)), key.new_empty((B, 3, C), dtype=_state_dtype(key))


@torch.library.register_fake(_BWD)
def _wkv4_backward_fake(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, grad_out,
                        grad_state_out):
    B, T, C = key.shape
    return (
        time_decay.new_empty((C,)),
        time_first.new_empty((C,)),
        key.new_empty((B, T, C)),
        value.new_empty((B, T, C)),
        state.new_empty((B, 3, C)) if state is not None else key.new_empty((0,), dtype=_state_dtype(key)),
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
    time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u = ctx.saved_tensors
    B, T, C = key.shape
    if grad_out is None:
        grad_out = value.new_zeros((B, T, C))
    if grad_state is None:
        grad_state = key.new_zeros((B, 3, C), dtype=_state_dtype(key))
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
