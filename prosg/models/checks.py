"""Argument checks shared by every model of prosg and its generation loop."""

from __future__ import annotations

import torch

#: The dtypes the model runs in (the kernels' dtypes; CUDA has no float64 wkv4).
MODEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_model_dtype(dtype, what: str) -> None:
    """Refuses anything but one of :data:`MODEL_DTYPES`, naming ``what``: a string such
    as ``'float16'`` would otherwise reach ``Tensor.to`` as a device name."""
    if not isinstance(dtype, torch.dtype):
        hint = f"; write torch.{dtype}" if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None),
                                                                              torch.dtype) else ""
        raise TypeError(f"{what} must be a torch.dtype (one of {', '.join(map(str, MODEL_DTYPES))}), "
                        f"got {dtype!r} ({type(dtype).__name__}){hint}")
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(map(str, MODEL_DTYPES))}, got {dtype}")


def check_count(value, what: str, minimum: int = 0) -> int:
    """An int ``>= minimum`` (any ``__index__`` type but bool; a float is refused, not
    truncated). ValueError for a wrong type too, as these checks always raised."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    value = value.__index__()
    if value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value}")
    return value
