"""Fixtures shared by every test of prosg.

Use them as fixtures (by argument name), not by importing this module: pytest puts
``tests/`` on ``sys.path`` and other directories (benchmarks/) have their own
``conftest.py``, so ``from conftest import ...`` can pick up the wrong one when both
are collected in one session. The tolerance table is a plain module: ``tolerances.py``.

* Every test starts from the same random state (``torch.manual_seed(0)``), so a
  failure reproduces when the test is run alone.
* ``device``: parametrised over ``"cpu"`` and ``"cuda"`` (the current CUDA device).
  The CUDA cases carry the ``cuda`` marker, so ``-m "not cuda"`` deselects them.
* Any test marked ``@pytest.mark.cuda`` (explicitly or through ``device``) is skipped
  cleanly where ``torch.cuda.is_available()`` is false.
* ``num_threads(n)``: a context manager running a block with ``torch.set_num_threads(n)``
  (``threads.py``, a plain module like ``tolerances.py``).
* ``nan_empty(*shape, **kw)``: ``torch.empty`` filled with NaN, for output buffers a
  kernel must overwrite completely.
* ``poison_cuda_cache()``: fills free blocks of the CUDA caching allocator with NaN, so
  a kernel that reads an output buffer before writing it, or leaves part of it
  unwritten, produces NaNs rather than the zeros fresh memory often happens to hold.
"""

from __future__ import annotations

import pytest
import threads
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_runtest_setup(item):
    if not HAS_CUDA and item.get_closest_marker("cuda") is not None:
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _seed():
    """Same random stream for every test, wherever it runs in the session."""
    torch.manual_seed(0)
    yield


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    return request.param


@pytest.fixture
def num_threads():
    """``with num_threads(1): ...`` runs the block on one intra-op thread (helpers
    import the same context manager: ``from threads import num_threads``)."""
    return threads.num_threads


def _nan_empty(*shape, **kwargs) -> torch.Tensor:
    return torch.empty(*shape, **kwargs).fill_(float("nan"))


@pytest.fixture
def nan_empty():
    """``nan_empty(*shape, dtype=..., device=...)``: ``torch.empty`` filled with NaN."""
    return _nan_empty


def _poison_cuda_cache(large_bytes: int = 64 << 20, small_blocks: int = 64) -> None:
    # The caching allocator keeps two pools: requests up to 1 MiB are carved from
    # 2 MiB segments, larger ones from their own segments. Fill blocks of both with
    # NaN and free them: the next allocations on this stream reuse them.
    if not HAS_CUDA:
        return
    blocks = [torch.empty(128 << 10, dtype=torch.float32, device="cuda") for _ in range(small_blocks)]
    blocks.append(torch.empty(large_bytes // 4, dtype=torch.float32, device="cuda"))
    for b in blocks:
        b.fill_(float("nan"))
    torch.cuda.synchronize()
    del blocks


@pytest.fixture
def poison_cuda_cache():
    """``poison_cuda_cache()``: NaN-fill the CUDA allocator's free blocks (no-op without
    CUDA: the CPU allocator returns memory to the system, there is nothing to poison)."""
    return _poison_cuda_cache
