"""Fused RWKV-7 decode steps, each for a batch of single tokens in one call from Python.
The time mix: a mix kernel, the (per-sample perturbed) projections, the low-rank MLPs,
then on the CPU one pass per (sample, head) for the rest (the state update row by row,
no transposes), on CUDA a prepare kernel, wkv7's own kernel and an output kernel. The
channel mix: the token-shift mix and the two projections around the squared ReLU.

Inference only: they carry no autograd formula (training runs the sequence path,
``prosg.ops.wkv7`` and ``prosg.ops.lowrank_linear``, which do). Calling it with any
input that requires grad while grad mode is on is an error; under torch.no_grad() and
torch.inference_mode() it runs.
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
    scalar_type_name,
    shape_str,
)
from prosg.ops.lowrank_linear import validate as validate_lowrank_linear
from prosg.ops.rwkv4_step import _delta_pairs

LowRank = tuple[Tensor, Tensor]

_OP = "prosg.rwkv7_time_mix_step"
_CHANNEL_MIX_OP = "prosg.rwkv7_channel_mix_step"
#: The projections a delta may perturb, in the order of ``deltas``.
TIME_MIX_KINDS = ("key", "value", "receptance", "output")
CHANNEL_MIX_KINDS = ("key", "value")


def rwkv7_time_mix_step(
    x: Tensor, shift: Tensor, wkv_state: Tensor, v_first: Tensor | None, *,
    x_r: Tensor, x_w: Tensor, x_k: Tensor, x_v: Tensor, x_a: Tensor, x_g: Tensor,
    w0: Tensor, w1: Tensor, w2: Tensor, a0: Tensor, a1: Tensor, a2: Tensor, g1: Tensor, g2: Tensor,
    v0: Tensor | None, v1: Tensor | None, v2: Tensor | None, k_k: Tensor, k_a: Tensor, r_k: Tensor,
    receptance_weight: Tensor, key_weight: Tensor, value_weight: Tensor, output_weight: Tensor,
    ln_x_weight: Tensor, ln_x_bias: Tensor, ln_x_eps: float,
    deltas: list[LowRank | None] | None = None, scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """One RWKV-7 time-mix step (what ``RWKV7TimeMix`` computes for one token).

    Shapes, with C = H * N channels:

    - ``x, shift [B, C]``: this and the previous token's ``ln1`` outputs;
    - ``wkv_state [B, H, N, N]`` float32 (float64 for float64 inputs), ``[value, key]``;
    - ``v_first [B, C]``: layer 0's value for the value residual, or None in layer 0
      (then ``v0, v1, v2`` are None too);
    - ``x_r ... x_g, w0, a0, v0, k_k, k_a, ln_x_weight, ln_x_bias``: C elements each;
    - ``w1 [C, Dw], w2 [Dw, C]`` (x's dtype or float32), ``a1/a2``, ``g1/g2``,
      ``v1/v2`` likewise in x's dtype; ``r_k [H, N]``; the four weights ``[C, C]``;
    - ``deltas``: ``(U [B, C, r], V [B, C, r])`` or None for the key, value,
      receptance and output projections.

    Returns ``(out [B, C], wkv_state [B, H, N, N], v [B, C])``; ``v`` is this layer's
    value projection, which the later layers take as ``v_first`` when this is layer 0.
    """
    flat = flatten_deltas("rwkv7_time_mix_step", deltas, TIME_MIX_KINDS)
    return torch.ops.prosg.rwkv7_time_mix_step.default(
        x, shift, wkv_state, v_first, x_r, x_w, x_k, x_v, x_a, x_g, w0, w1, w2, a0, a1, a2, g1, g2, v0, v1, v2,
        k_k, k_a, r_k, receptance_weight, key_weight, value_weight, output_weight, ln_x_weight, ln_x_bias,
        float(ln_x_eps), flat, float(scale))


def rwkv7_channel_mix_step(
    x: Tensor, shift: Tensor, *, x_k: Tensor, key_weight: Tensor, value_weight: Tensor,
    deltas: list[LowRank | None] | None = None, scale: float = 1.0,
) -> Tensor:
    """One RWKV-7 channel-mix step (what ``RWKV7ChannelMix`` computes for one token):
    ``value(relu(key(x + (shift - x) * x_k))^2)``.

    Shapes: ``x, shift [B, C]`` (this and the previous token's ``ln2`` outputs),
    ``x_k``: C elements, ``key_weight [F, C]``, ``value_weight [C, F]``; ``deltas``:
    ``(U, V)`` or None for the key and value projections (``U [B, out, r]``,
    ``V [B, in, r]``). Returns ``out [B, C]``. Inference only, like
    :func:`rwkv7_time_mix_step`.
    """
    flat = flatten_deltas("rwkv7_channel_mix_step", deltas, CHANNEL_MIX_KINDS)
    return torch.ops.prosg.rwkv7_channel_mix_step.default(x, shift, x_k, key_weight, value_weight, flat,
                                                          float(scale))


# ------------------------------------------------------------------------------------
# Validation (csrc/rwkv7_step/rwkv7_step.cpp, same order and words) and the fake kernels


def _check_vector(name: str, t: Tensor, C, x: Tensor, op: str = _OP) -> None:
    check(t.numel() == C, lambda: f"{op}: {name} must have C={C} elements, got shape {shape_str(t.shape)}")
    check_same_device(op, name, t, x, "x")
    check_floating(op, name, t, allow_double=allows_double(t))


def _check_matrix(name: str, t: Tensor, rows, cols, dtype: torch.dtype, x: Tensor, op: str = _OP) -> None:
    check_shape(op, name, t, (rows, cols))
    check_same_device(op, name, t, x, "x")
    check_dtype(op, name, t, dtype)


def _check_token_rows(op: str, x: Tensor, shift: Tensor) -> None:
    check(x.dim() == 2, lambda: f"{op}: x must have shape [B, C] (one token per sample), got {shape_str(x.shape)}")
    check_floating(op, "x", x, allow_double=allows_double(x))
    check_shape(op, "shift", shift, tuple(x.shape))
    check_same_device(op, "shift", shift, x, "x")
    check_dtype(op, "shift", shift, x.dtype)


def _check_mlp(first_name: str, first: Tensor, second_name: str, second: Tensor, dtype: torch.dtype, C,
               x: Tensor) -> None:
    check(first.dim() == 2,
          lambda: f"{_OP}: {first_name} must have shape [C={C}, D], got {shape_str(first.shape)}")
    D = first.shape[1]
    _check_matrix(first_name, first, C, D, dtype, x)
    _check_matrix(second_name, second, D, C, dtype, x)


def validate_time_mix_step(x, shift, wkv_state, v_first, x_r, x_w, x_k, x_v, x_a, x_g, w0, w1, w2, a0, a1, a2, g1,
                           g2, v0, v1, v2, k_k, k_a, r_k, receptance_weight, key_weight, value_weight,
                           output_weight, ln_x_weight, ln_x_bias, ln_x_eps, deltas) -> None:
    _check_token_rows(_OP, x, shift)
    B, C = x.shape
    check(r_k.dim() == 2 and r_k.shape[0] * r_k.shape[1] == C,
          lambda: f"{_OP}: r_k must have shape [H, N] with H * N = C={C}, got {shape_str(r_k.shape)}")
    H, N = r_k.shape
    check(N in (16, 32, 64, 128),
          lambda: f"{_OP}: the head size N (r_k's last dimension) must be 16, 32, 64 or 128, got {N}")
    check_same_device(_OP, "r_k", r_k, x, "x")
    check_floating(_OP, "r_k", r_k, allow_double=allows_double(r_k))
    acc = accumulation_dtype(x.dtype)
    check_shape(_OP, "wkv_state", wkv_state, (B, H, N, N))
    check_same_device(_OP, "wkv_state", wkv_state, x, "x")
    check_dtype(_OP, "wkv_state", wkv_state, acc)
    residual = v_first is not None
    for name, t in (("v0", v0), ("v1", v1), ("v2", v2)):
        check((t is not None) == residual,
              lambda: f"{_OP}: v_first, v0, v1 and v2 come together (layers after the first) or not at all "
                      f"(layer 0); got v_first {'with' if residual else 'without'} {name}")
    if residual:
        check_shape(_OP, "v_first", v_first, (B, C))
        check_same_device(_OP, "v_first", v_first, x, "x")
        check_dtype(_OP, "v_first", v_first, x.dtype)
    for name, t in (("x_r", x_r), ("x_w", x_w), ("x_k", x_k), ("x_v", x_v), ("x_a", x_a), ("x_g", x_g),
                    ("w0", w0), ("a0", a0), ("k_k", k_k), ("k_a", k_a), ("ln_x_weight", ln_x_weight),
                    ("ln_x_bias", ln_x_bias)):
        _check_vector(name, t, C, x)
    if residual:
        _check_vector("v0", v0, C, x)
    check(w1.dtype in (x.dtype, acc),
          lambda: f"{_OP}: w1 must have x's dtype ({scalar_type_name(x.dtype)}) or {scalar_type_name(acc)}, got "
                  f"{scalar_type_name(w1.dtype)}")
    _check_mlp("w1", w1, "w2", w2, w1.dtype, C, x)
    _check_mlp("a1", a1, "a2", a2, x.dtype, C, x)
    _check_mlp("g1", g1, "g2", g2, x.dtype, C, x)
    if residual:
        _check_mlp("v1", v1, "v2", v2, x.dtype, C, x)
    for name, t in (("receptance_weight", receptance_weight), ("key_weight", key_weight),
                    ("value_weight", value_weight), ("output_weight", output_weight)):
        _check_matrix(name, t, C, C, x.dtype, x)
    check(ln_x_eps > 0, lambda: f"{_OP}: ln_x_eps must be positive, got {ln_x_eps:g}")
    dk, dv, dr, do = _delta_pairs(_OP, deltas, TIME_MIX_KINDS)
    # The projections' own checks (lowrank_linear's), in the C++ order: receptance,
    # key, value on [B, C] mixes of x, the output on the gated [B, C].
    for weight, uv in ((receptance_weight, dr), (key_weight, dk), (value_weight, dv), (output_weight, do)):
        validate_lowrank_linear("prosg.lowrank_linear", x, weight, None, *uv)


@torch.library.register_fake("prosg::rwkv7_time_mix_step")
def _time_mix_step_fake(x, shift, wkv_state, v_first, x_r, x_w, x_k, x_v, x_a, x_g, w0, w1, w2, a0, a1, a2, g1, g2,
                        v0, v1, v2, k_k, k_a, r_k, wr, wk, wv, wo, ln_w, ln_b, ln_eps, deltas, scale):
    validate_time_mix_step(x, shift, wkv_state, v_first, x_r, x_w, x_k, x_v, x_a, x_g, w0, w1, w2, a0, a1, a2, g1, g2,
                           v0, v1, v2, k_k, k_a, r_k, wr, wk, wv, wo, ln_w, ln_b, ln_eps, deltas)
    return x.new_empty(x.shape), wkv_state.new_empty(wkv_state.shape), x.new_empty(x.shape)


def validate_channel_mix_step(x, shift, x_k, key_weight, value_weight, deltas) -> None:
    op = _CHANNEL_MIX_OP
    _check_token_rows(op, x, shift)
    B, C = x.shape
    _check_vector("x_k", x_k, C, x, op)
    check(key_weight.dim() == 2,
          lambda: f"{op}: key_weight must have shape [F, C={C}], got {shape_str(key_weight.shape)}")
    F = key_weight.shape[0]
    _check_matrix("key_weight", key_weight, F, C, x.dtype, x, op)
    _check_matrix("value_weight", value_weight, C, F, x.dtype, x, op)
    dk, dv = _delta_pairs(op, deltas, CHANNEL_MIX_KINDS)
    # The projections' own checks: the key on the [B, C] mix, the value on [B, F].
    validate_lowrank_linear("prosg.lowrank_linear", x, key_weight, None, *dk)
    validate_lowrank_linear("prosg.lowrank_linear", x.new_empty((B, F)), value_weight, None, *dv)


@torch.library.register_fake("prosg::rwkv7_channel_mix_step")
def _channel_mix_step_fake(x, shift, x_k, key_weight, value_weight, deltas, scale):
    validate_channel_mix_step(x, shift, x_k, key_weight, value_weight, deltas)
    return x.new_empty(x.shape)


# Both ops refuse inputs that require grad while grad mode is on: an Autograd kernel in
# C++ (bindings/torch_bindings.cpp), cheaper per call than one registered from Python.
