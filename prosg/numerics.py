"""The numeric rules every layer of prosg shares, in one place.

* :func:`accumulation_dtype`: the kernels accumulate, and keep their recurrent states,
  in float32 for float32/float16/bfloat16 inputs and in float64 for float64 inputs.
* :data:`EMPTY_MAX`: the running maximum ``p`` of an empty WKV state ``(0, 0, p)``
  (transformers' ``-1e38``): ``exp(p - q)`` is 0 for every key, so the first token's
  weight is all that counts.
"""

from __future__ import annotations

import torch

EMPTY_MAX = -1e38


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and state dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32
