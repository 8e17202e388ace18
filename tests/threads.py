"""``num_threads(n)``: a context manager running a block with ``torch.set_num_threads(n)``
and restoring the previous count. A plain module (like ``tolerances.py``) so that
helpers can use it as well as tests; tests also get it as the ``num_threads`` fixture."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
