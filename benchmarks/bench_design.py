"""Measurements behind choices made in the code, side by side with the alternative.

Each group is one choice; its comment in the code points here, and the figures are
recorded in RESULTS.md ("Choices in the code").

* ``decode_head``: the LM head of one decode step for a batch, ``x [B, H] @ W^T`` (what
  ``F.linear`` runs) against the transposed problem ``W @ x^T`` (what the models use
  on the CPU for a batch the small-batch kernel does not take) and
  ``prosg.ops.lowrank_linear``'s small-batch kernel without a delta (what they use for
  up to 16 float32 rows, ``prosg.models.common.runs_small_batch_kernel``); B=8, H=512,
  vocabulary 50277, float32.
* ``finite_check``: the per-step finiteness check of the greedy pick's ``[B]`` peak
  logits during CPU generation (``prosg.models.generation``): B host floats through
  ``math.isfinite`` against ``bool(torch.isfinite(peak).all())``.

Run: ``pytest benchmarks -k bench_design --bench-threads=1``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prosg.ops import lowrank_linear

BATCH, HIDDEN, VOCAB = 8, 512, 50277


@pytest.fixture(scope="module")
def head():
    g = torch.Generator().manual_seed(0)
    return torch.randn(VOCAB, HIDDEN, generator=g), torch.randn(BATCH, HIDDEN, generator=g)


HEAD_SPELLINGS = {
    "F.linear(x, W)": lambda W, x: F.linear(x, W),
    "mm(W, x.T).T": lambda W, x: torch.mm(W, x.t()).t(),
    "lowrank_linear(x, W)": lambda W, x: lowrank_linear(x, W),
}


@pytest.mark.parametrize("impl", list(HEAD_SPELLINGS))
def test_decode_head(benchmark, head, impl):
    W, x = head
    fn = HEAD_SPELLINGS[impl]
    torch.testing.assert_close(fn(W, x), F.linear(x, W), rtol=1e-4, atol=1e-4)
    benchmark.group = f"decode_head B={BATCH} H={HIDDEN} V={VOCAB} float32 threads={torch.get_num_threads()}"
    benchmark.extra_info.update(impl=impl, threads=torch.get_num_threads())
    benchmark(fn, W, x)


CHECK_SPELLINGS = {
    "math.isfinite on host floats": lambda peak: all(map(math.isfinite, peak.tolist())),
    "torch.isfinite().all()": lambda peak: bool(torch.isfinite(peak).all()),
}


@pytest.mark.parametrize("impl", list(CHECK_SPELLINGS))
def test_finite_check(benchmark, impl):
    peak = torch.randn(BATCH)
    fn = CHECK_SPELLINGS[impl]
    assert fn(peak) and not fn(torch.tensor([0.0, float("nan")]))
    benchmark.group = f"finite_check B={BATCH} float32"
    benchmark.extra_info.update(impl=impl)
    benchmark(fn, peak)
