"""Fused RWKV-4 decode steps: one time-mix and one channel-mix step for a batch of
single tokens, each a few fused kernels plus the (per-sample perturbed) projections.

Inference only: they carry no autograd formula (training runs the sequence path,
``prosg.ops.wkv4`` and ``prosg.ops.lowrank_linear``, which do). Calling them with any
input that requires grad while grad mode is on is an error; under torch.no_grad() and
torch.inference_mode() they run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prosg.ops._checks import (
    flatten_deltas,
    accumulation_dtype,
    allows_double,
    check,
    check_dtype,
    check_floating,
    check_same_device,
    check_shape,
    shape_str,
)
from prosg.ops.lowrank_linear import validate as validate_lowrank_linear

LowRank = tuple[Tensor, Tensor]


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
    flat = flatten_deltas("rwkv4_time_mix_step", deltas, TIME_MIX_KINDS)
    return torch.ops.prosg.rwkv4_time_mix_step.default(
        x, shift, wkv_state, time_mix_key, time_mix_value, time_mix_receptance, time_decay, time_first,
        key_weight, value_weight, receptance_weight, output_weight, flat, float(scale))


def rwkv4_channel_mix_step(
    x: Tensor, shift: Tensor, time_mix_key: Tensor, time_mix_receptance: Tensor, key_weight: Tensor,
    receptance_weight: Tensor, value_weight: Tensor, deltas: list[LowRank | None] | None = None, scale: float = 1.0,
) -> Tensor:
    """One RWKV-4 channel-mix step: ``x, shift [B, H]`` (``ln2`` outputs); ``deltas``:
    ``(U, V)`` or None for the key, receptance and value projections. Returns ``[B, H]``."""
    flat = flatten_deltas("rwkv4_channel_mix_step", deltas, CHANNEL_MIX_KINDS)
    return torch.ops.prosg.rwkv4_channel_mix_step.default(
        x, shift, time_mix_key, time_mix_receptance, key_weight, receptance_weight, value_weight, flat, float(scale))


# ------------------------------------------------------------------------------------
# Validation (csrc/rwkv4_step/rwkv4_step.cpp, same order and words) and fake kernels


def _check_input(op: str, x: Tensor, shift: Tensor) -> None:
    check(x.dim() == 2, lambda: f"{op}: x must have shape [B, H] (one token per sample), got {shape_str(x.shape)}")
    check_floating(op, "x", x, allow_double=allows_double(x))
    check_shape(op, "shift", shift, (x.shape[0], x.shape[1]))
    check_same_device(op, "shift", shift, x, "x")
    check_dtype(op, "shift", shift, x.dtype)


def _check_weight(op: str, name: str, w: Tensor, rows, cols, x: Tensor) -> None:
    check_shape(op, name, w, (rows, cols))
    check_same_device(op, name, w, x, "x")
    check_dtype(op, name, w, x.dtype)


def _check_mixes(op: str, mixes: dict[str, Tensor], x: Tensor) -> None:
    for name, m in mixes.items():
        check(m.numel() == x.shape[1],
              lambda: f"{op}: {name} must have H={x.shape[1]} elements, got shape {shape_str(m.shape)}")
        check_same_device(op, name, m, x, "x")


def _delta_pairs(op: str, deltas: list[Tensor | None], kinds: tuple[str, ...]) -> list[tuple[Tensor | None, ...]]:
    """``check_delta_count`` and ``delta_pair``: the (U, V) pair of every projection."""
    check(len(deltas) in (0, 2 * len(kinds)),
          lambda: f"{op}: deltas must be empty or hold {2 * len(kinds)} entries (U, V per projection, None for "
                  f"none), got {len(deltas)}")
    if not deltas:
        return [(None, None)] * len(kinds)
    pairs = []
    for i, kind in enumerate(kinds):
        U, V = deltas[2 * i], deltas[2 * i + 1]
        check((U is None) == (V is None),
              lambda: f"{op}: the {kind} delta needs both U and V (deltas[{2 * i}] and deltas[{2 * i + 1}]), got "
                      f"only {'U' if U is not None else 'V'}")
        pairs.append((U, V))
    return pairs


def _check_projection(inp: Tensor, weight: Tensor, uv: tuple[Tensor | None, Tensor | None]) -> None:
    """A projection of ``project()``: lowrank_linear's own validation and wording."""
    validate_lowrank_linear("prosg.lowrank_linear", inp, weight, None, *uv)


def validate_time_mix_step(x, shift, wkv_state, time_mix_key, time_mix_value, time_mix_receptance, time_decay,
                           time_first, key_weight, value_weight, receptance_weight, output_weight, deltas) -> None:
    op = "prosg.rwkv4_time_mix_step"
    _check_input(op, x, shift)
    B, H = x.shape
    check(key_weight.dim() == 2,
          lambda: f"{op}: key_weight must have shape [C, H={H}], got {shape_str(key_weight.shape)}")
    C = key_weight.shape[0]
    _check_weight(op, "key_weight", key_weight, C, H, x)
    _check_weight(op, "value_weight", value_weight, C, H, x)
    _check_weight(op, "receptance_weight", receptance_weight, C, H, x)
    _check_weight(op, "output_weight", output_weight, H, C, x)
    check_shape(op, "wkv_state", wkv_state, (B, 3, C))
    check_same_device(op, "wkv_state", wkv_state, x, "x")
    check_dtype(op, "wkv_state", wkv_state, accumulation_dtype(x.dtype))
    check_shape(op, "time_decay", time_decay, (C,))
    check_shape(op, "time_first", time_first, (C,))
    check_same_device(op, "time_decay", time_decay, x, "x")
    check_same_device(op, "time_first", time_first, x, "x")
    dk, dv, dr, do = _delta_pairs(op, deltas, TIME_MIX_KINDS)
    _check_mixes(op, {"time_mix_key": time_mix_key, "time_mix_value": time_mix_value,
                      "time_mix_receptance": time_mix_receptance}, x)
    # The key, value and receptance projections read [B, H] mixes of x; the output
    # projection the [B, C] gated WKV output.
    _check_projection(x, key_weight, dk)
    _check_projection(x, value_weight, dv)
    _check_projection(x, receptance_weight, dr)
    _check_projection(x.new_empty((B, C)), output_weight, do)


def validate_channel_mix_step(x, shift, time_mix_key, time_mix_receptance, key_weight, receptance_weight,
                              value_weight, deltas) -> None:
    op = "prosg.rwkv4_channel_mix_step"
    _check_input(op, x, shift)
    B, H = x.shape
    check(key_weight.dim() == 2,
          lambda: f"{op}: key_weight must have shape [F, H={H}], got {shape_str(key_weight.shape)}")
    F = key_weight.shape[0]
    _check_weight(op, "key_weight", key_weight, F, H, x)
    _check_weight(op, "receptance_weight", receptance_weight, H, H, x)
    _check_weight(op, "value_weight", value_weight, H, F, x)
    dk, dr, dv = _delta_pairs(op, deltas, CHANNEL_MIX_KINDS)
    _check_mixes(op, {"time_mix_key": time_mix_key, "time_mix_receptance": time_mix_receptance}, x)
    # In the C++ order: key (on x), value (on the [B, F] squared ReLU), receptance (on x).
    _check_projection(x, key_weight, dk)
    _check_projection(x.new_empty((B, F)), value_weight, dv)
    _check_projection(x, receptance_weight, dr)


@torch.library.register_fake("prosg::rwkv4_time_mix_step")
def _time_mix_step_fake(x, shift, wkv_state, mk, mv, mr, td, tf, wk, wv, wr, wo, deltas, scale):
    validate_time_mix_step(x, shift, wkv_state, mk, mv, mr, td, tf, wk, wv, wr, wo, deltas)
    return x.new_empty(x.shape), wkv_state.new_empty(wkv_state.shape)


@torch.library.register_fake("prosg::rwkv4_channel_mix_step")
def _channel_mix_step_fake(x, shift, mk, mr, wk, wr, wv, deltas, scale):
    validate_channel_mix_step(x, shift, mk, mr, wk, wr, wv, deltas)
    return x.new_empty(x.shape)


# ------------------------------------------------------------------------------------
# Inference only: both ops refuse inputs that require grad while grad mode is on, an
# Autograd kernel in C++ (bindings/torch_bindings.cpp), cheaper per call than one
# registered from Python.
