"""RWKV-7 recurrence (the generalized delta rule), forward, backward and state."""

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

_OP = "prosg::wkv7"
_BWD = "prosg::wkv7_backward"
HEAD_SIZES = (16, 32, 64, 128)
_STEP_INPUTS = ("w", "k", "v", "a", "b")


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
         state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RWKV-7 time mixing's recurrence, per sample and head, step by step.

    With the decay ``d = exp(-exp(w))`` and the state ``S`` (``N x N``, indexed
    ``[value i, key j]``), each step ``t`` computes::

        sa_i = sum_j a_j S_ij
        S_ij = S_ij d_j + v_i k_j + sa_i b_j      # S <- S (diag(d) + a b^T) + v k^T
        out_i = sum_j S_ij r_j                   # after the update

    Args:
        r, w, k, v, a, b: ``[B, T, H, N]`` (N the head size: 16, 32, 64 or 128), one
            dtype (float32, float16, bfloat16; float64 on the CPU). ``w`` is the
            log-log decay, any real (large ``|w|`` is safe: ``d`` goes to 0 or 1).
            Any strides, expanded (stride 0) inputs included.
        state: ``[B, H, N, N]`` indexed ``[value, key]``, float32 (float64 for float64
            inputs); None starts from zeros.

    Returns:
        ``(out [B, T, H, N]`` in r's dtype, ``state_out [B, H, N, N])`` like ``state``.
        Differentiable in every argument, the initial state included (also through
        ``state_out``, so chunks of a sequence can be chained); once only
        (``create_graph=True`` raises).

    Layouts of the same recurrence elsewhere:

    * the ``rwkv`` package (``RWKV_x070``, its CPU loop ``state = state * w + state @ ab
      + vk``): one sequence, ``r, k, v`` as ``[T, H*N]`` = ``r[b].reshape(T, H*N)``; its
      state ``[H, N, N]`` = ``state[b]`` (value rows, key columns); its decay factor
      ``exp(-0.606531 * sigmoid(x))`` is ``exp(-exp(w))``, i.e.
      ``w = log(0.606531 * sigmoid(x))``; its ``ab = (-kk) (kk * a)^T`` is ``a = -kk``,
      ``b = kk * a``.
    * flash-linear-attention (``fla.ops.generalized_delta_rule.dplr``,
      ``fla.ops.rwkv7``): ``q = r``, ``alpha = a``, ``beta = b``, log decay
      ``gk = -exp(w)``; its state is ``[B, H, K, V]``, the transpose
      ``state.transpose(-1, -2)``; head-first functions take ``x.transpose(1, 2)``.
      Its naive ``dplr_recurrence`` scales q by ``K ** -0.5``: pass ``q = r * N ** 0.5``.
    """
    return torch.ops.prosg.wkv7.default(r, w, k, v, a, b, state)


class Dims(NamedTuple):
    """The sizes of a call (SymInts when traced with dynamic shapes)."""

    batch: int
    seqlen: int
    heads: int
    head_size: int
    acc: torch.dtype  # the state's dtype


def validate(op: str, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor,
             state: Tensor | None) -> Dims:
    """The checks of ``validate`` in csrc/wkv7/wkv7.cpp, in its order and words."""
    check(r.dim() == 4, lambda: f"{op}: r must have shape [B, T, H, N], got {shape_str(r.shape)}")
    check_floating(op, "r", r, allow_double=allows_double(r))
    d = Dims(*r.shape, accumulation_dtype(r.dtype))
    n = d.head_size
    check(n in HEAD_SIZES,
          lambda: f"{op}: the head size N (r's last dimension) must be 16, 32, 64 or 128, got {n}")
    for name, t in zip(_STEP_INPUTS, (w, k, v, a, b)):
        check_shape(op, name, t, (d.batch, d.seqlen, d.heads, d.head_size))
        check_same_device(op, name, t, r, "r")
        check_dtype(op, name, t, r.dtype)
    if state is not None:
        check_shape(op, "state", state, (d.batch, d.heads, d.head_size, d.head_size))
        check_same_device(op, "state", state, r, "r")
        check_dtype(op, "state", state, d.acc)
    return d


def validate_backward(r, w, k, v, a, b, state, grad_out, grad_state_out) -> Dims:
    """The checks of ``backward`` in csrc/wkv7/wkv7.cpp."""
    op = "prosg.wkv7_backward"
    d = validate(op, r, w, k, v, a, b, state)
    check_shape(op, "grad_out", grad_out, (d.batch, d.seqlen, d.heads, d.head_size))
    check_same_device(op, "grad_out", grad_out, r, "r")
    check_dtype(op, "grad_out", grad_out, r.dtype)
    check_shape(op, "grad_state_out", grad_state_out, (d.batch, d.heads, d.head_size, d.head_size))
    check_same_device(op, "grad_state_out", grad_state_out, r, "r")
    check_dtype(op, "grad_state_out", grad_state_out, d.acc)
    return d


@torch.library.register_fake(_OP)
def _wkv7_fake(r, w, k, v, a, b, state):
    d = validate("prosg.wkv7", r, w, k, v, a, b, state)
    B, T, H, N = d.batch, d.seqlen, d.heads, d.head_size
    return r.new_empty((B, T, H, N)), r.new_empty((B, H, N, N), dtype=d.acc)


@torch.library.register_fake(_BWD)
def _wkv7_backward_fake(r, w, k, v, a, b, state, grad_out, grad_state_out):
    d = validate_backward(r, w, k, v, a, b, state, grad_out, grad_state_out)
    B, T, H, N = d.batch, d.seqlen, d.heads, d.head_size
    grads = tuple(r.new_empty((B, T, H, N)) for _ in range(6))
    return (*grads, r.new_empty((B, H, N, N) if state is not None else (0,), dtype=d.acc))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out, grad_state):
    # Grad mode is on inside a backward exactly when it runs with create_graph=True. The
    # backward kernel has no derivative, so a graph of this backward would carry wrong
    # (zero) second derivatives: refuse rather than return them.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "prosg.wkv7: double backward is not supported (its backward kernel has no derivative), so "
            "torch.autograd.grad / backward through it cannot take create_graph=True; for higher derivatives "
            "use the float64 reference prosg.reference.wkv7_ref")
    r, w, k, v, a, b, state = ctx.saved_tensors
    B, T, H, N = r.shape
    if grad_out is None:
        grad_out = r.new_zeros((B, T, H, N))
    if grad_state is None:
        grad_state = r.new_zeros((B, H, N, N), dtype=accumulation_dtype(r.dtype))
    grads = torch.ops.prosg.wkv7_backward.default(r, w, k, v, a, b, state, grad_out, grad_state)
    need = ctx.needs_input_grad
    out = [g if need[i] else None for i, g in enumerate(grads[:6])]
    return (*out, grads[6] if (state is not None and need[6]) else None)


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
# The backward op refuses inputs that require grad: an Autograd kernel in C++
# (bindings/torch_bindings.cpp).
