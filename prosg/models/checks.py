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


def check_input_ids(input_ids, vocab_size: int, device: torch.device) -> None:
    """``[B, T]`` int64/int32 token ids in ``[0, vocab_size)`` on ``device``, ``T >= 1``
    (RWKV4LM's checks, in its words)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a LongTensor [B, T], got {type(input_ids)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per sample (T >= 1), got T = 0")
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if input_ids.numel() == 0:  # B = 0: aminmax refuses empty tensors
        return
    # One reduction (one host sync on CUDA) per call: F.embedding's own error names
    # neither the tensor nor the value.
    lo, hi = torch.aminmax(input_ids)
    lo, hi = torch.stack([lo, hi]).tolist()
    if lo < 0 or hi >= vocab_size:
        bad = ((input_ids < 0) | (input_ids >= vocab_size)).nonzero()[0].tolist()
        raise ValueError(f"input_ids must be token ids in [0, {vocab_size}) (the model's vocab_size), got values in "
                         f"[{lo}, {hi}]; first bad: input_ids[{bad[0]}, {bad[1]}] = "
                         f"{int(input_ids[bad[0], bad[1]])}")
