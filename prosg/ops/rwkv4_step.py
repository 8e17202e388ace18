"""Fused RWKV-4 decode steps: one time-mix and one channel-mix step for a batch of
single tokens, each a few fused kernels plus the (per-sample perturbed) projections.

Inference only: they carry no autograd formula (training runs the sequence path,
``prosg.ops.wkv4`` and ``prosg.ops.lowrank_linear``, which do). Calling them with
inputs that require grad while grad mode is on is an error.
"""

from __future__ import annotations

import torch
from torch import Tensor

LowRank = tuple[Tensor, Tensor]


def _flatten(name: str, deltas: list[LowRank | None] | None, kinds: tuple[str, ...]) -> list[Tensor | None]:
    if deltas is None:
        return []
    if len(deltas) != len(kinds):
        raise ValueError(f"prosg.{name}: deltas must list {len(kinds)} entries ({', '.join(kinds)}), "
                         f"each (U, V) or None; got {len(deltas)}")
    flat: list[Tensor | None] = []
    for kind, uv in zip(kinds, deltas):
        if uv is None:
            flat += [None, None]
        elif isinstance(uv, (tuple, list)) and len(uv) == 2:
            flat += [uv[0], uv[1]]
        else:
            raise ValueError(f"prosg.{name}: the {kind} delta must be a pair (U, V) or None, got {type(uv)}")
    return flat if any(t is not None for t in flat) else []


def _no_grad(name: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(f"prosg.{name} is inference-only (no backward): call it under torch.no_grad() "
                           "or use the sequence path (prosg.ops.wkv4 / lowrank_linear) for training")


TIME_MIX_KINDS = ("key", "value", "receptance", "output")
CHANNEL_MIX_KINDS = ("key", "receptance", "value")


def rwkv4_time_mix_step(
    x: Tensor, shift: Tensor, wkv_state: Tensor, time_mix_key: Tensor, time_mix_value: Tensor,
    time_mix_receptance: Tensor, time_decay: Tensor, time_first: Tensor, key_weight: Tensor, value_weight: Tensor,
    receptance_weight: Tensor, output_weight: Tensor, deltas: list[LowRank | None] | None = None, scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One RWKV-4 time-mix step: ``x, shift [B, H]`` (this and the previous token's
    ``ln1`` outputs), ``wkv_state [B, 3, C]``; ``deltas``: ``(U, V)`` or None for the
    key, value, receptance and output projections. Returns ``(out [B, H], wkv_state)``."""
    flat = _flatten("rwkv4_time_mix_step", deltas, TIME_MIX_KINDS)
    _no_grad("rwkv4_time_mix_step", x, shift, wkv_state, key_weight, value_weight, receptance_weight,
             output_weight, *flat)
    return torch.ops.prosg.rwkv4_time_mix_step.default(
        x, shift, wkv_state, time_mix_key, time_mix_value, time_mix_receptance, time_decay, time_first,
        key_weight, value_weight, receptance_weight, output_weight, flat, float(scale))


def rwkv4_channel_mix_step(
    x: Tensor, shift: Tensor, time_mix_key: Tensor, time_mix_receptance: Tensor, key_weight: Tensor,
    receptance_weight: Tensor, value_weight: Tensor, deltas: list[LowRank | None] | None = None, scale: float = 1.0,
) -> Tensor:
    """One RWKV-4 channel-mix step: ``x, shift [B, H]`` (``ln2`` outputs); ``deltas``:
    ``(U, V)`` or None for the key, receptance and value projections. Returns ``[B, H]``."""
    flat = _flatten("rwkv4_channel_mix_step", deltas, CHANNEL_MIX_KINDS)
    _no_grad("rwkv4_channel_mix_step", x, shift, key_weight, receptance_weight, value_weight, *flat)
    return torch.ops.prosg.rwkv4_channel_mix_step.default(
        x, shift, time_mix_key, time_mix_receptance, key_weight, receptance_weight, value_weight, flat, float(scale))


@torch.library.register_fake("prosg::rwkv4_time_mix_step")
def _time_mix_step_fake(x, shift, wkv_state, mk, mv, mr, td, tf, wk, wv, wr, wo, deltas, scale):
    torch._check(x.dim() == 2, lambda: f"prosg.rwkv4_time_mix_step: x must be [B, H], got {tuple(x.shape)}")
    return x.new_empty(x.shape), wkv_state.new_empty(wkv_state.shape)


@torch.library.register_fake("prosg::rwkv4_channel_mix_step")
def _channel_mix_step_fake(x, shift, mk, mr, wk, wr, wv, deltas, scale):
    torch._check(x.dim() == 2, lambda: f"prosg.rwkv4_channel_mix_step: x must be [B, H], got {tuple(x.shape)}")
    return x.new_empty(x.shape)
