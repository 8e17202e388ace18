"""Argument checks for the fake (meta) kernels, worded exactly as csrc/common/checks.h.

The fake kernels run wherever the C++ kernels do not: under FakeTensorMode (what
torch.compile and torch.library.opcheck trace with), on meta tensors, and whenever a
single argument is on the meta device, because the dispatcher then picks the Meta
kernel for the whole call, whatever device the other arguments are on. Each one must
therefore reject what the C++ kernel rejects, with the same exception type (ValueError,
as TORCH_CHECK_VALUE) and the same message, or a bad call would trace, or run, and
return a tensor of uninitialised memory.

Conditions on sizes go through ``torch._check_value`` rather than ``if``: under dynamic
shapes a size is a SymInt, and that records the condition for the traced graph (a
guard, or a runtime assert for a data-dependent size) instead of failing to evaluate it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prosg.numerics import accumulation_dtype  # noqa: F401  (re-exported to the ops)
from torch import Tensor

# Matches any size in check_shape (printed "*", as -1 in checks.h). Not -1: an expected
# size may be a SymInt, and comparing it with -1 would add a guard.
ANY = None

# c10's ScalarType names (what `os << ScalarType` prints) that torch's dtype names do not
# give by capitalisation; the others (Bool, Int4, Float8_e4m3fn, ...) do.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int8: "Char", torch.int16: "Short", torch.int32: "Int", torch.int64: "Long", torch.uint8: "Byte",
    torch.complex32: "ComplexHalf", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}
if hasattr(torch, "bcomplex32"):
    _SCALAR_TYPE_NAMES[torch.bcomplex32] = "BComplex32"


def scalar_type_name(dtype: torch.dtype) -> str:
    """The name c10 prints for ``dtype``: ``Float`` for torch.float32, ``UInt16`` for torch.uint16."""
    if dtype in _SCALAR_TYPE_NAMES:
        return _SCALAR_TYPE_NAMES[dtype]
    name = str(dtype).removeprefix("torch.")
    if name.startswith("uint"):
        return "UInt" + name[4:]
    return name[:1].upper() + name[1:]


def shape_str(sizes: Sequence) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def check(cond, message: Callable[[], str]) -> None:
    """TORCH_CHECK_VALUE: a ValueError with ``message()`` unless ``cond`` (a bool or SymBool)."""
    torch._check_value(cond, message)


def check_shape(op: str, name: str, t: Tensor, expected: Sequence) -> None:
    def message() -> str:
        want = shape_str("*" if e is ANY else e for e in expected)
        return f"{op}: {name} must have shape {want}, got {shape_str(t.shape)}"

    check(t.dim() == len(expected), message)
    for size, e in zip(t.shape, expected):
        if e is not ANY:
            check(size == e, message)


def check_same_device(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    check(t.device == ref.device,
          lambda: f"{op}: {name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_dtype(op: str, name: str, t: Tensor, expected: torch.dtype) -> None:
    check(t.dtype == expected, lambda: f"{op}: {name} must have dtype {scalar_type_name(expected)}, got "
                                       f"{scalar_type_name(t.dtype)}")


def allows_double(t: Tensor) -> bool:
    """Whether float64 is accepted for ``t``'s device (the C++ kernels: CPU only).

    A meta tensor stands for a tensor on any device, so it gets the CPU's rule: the
    fake kernel must not reject a call that the CPU kernel runs, and a bad dtype gets
    the same message on meta as on the CPU. (A FakeTensor reports the device it fakes.)"""
    return t.device.type in ("cpu", "meta")


def check_floating(op: str, name: str, t: Tensor, allow_double: bool) -> None:
    ok = t.dtype in (torch.float32, torch.float16, torch.bfloat16) or (allow_double and t.dtype == torch.float64)
    suffix = " (or float64 on the CPU)" if allow_double else ""
    check(ok, lambda: f"{op}: {name} must be float32, float16 or bfloat16{suffix}, got {scalar_type_name(t.dtype)}")


def flatten_deltas(name: str, deltas: list | None, kinds: tuple[str, ...]) -> list[Tensor | None]:
    """A decode-step op's ``deltas`` argument from one ``(U, V)`` pair or None per kind
    in ``kinds`` order: ``[U, V, ...]`` (None, None for a kind without one), or ``[]``
    when no kind has one. ``name``: the op, for the messages."""
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
