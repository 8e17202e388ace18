"""RWKV-7 model layer (``prosg.models.RWKV7LM``) against the ``rwkv`` package's x070
CPU path (``RWKV_x070``, ``cpu fp32``, no JIT: the package's CPU recurrence is a Python
loop over tokens; ``RWKV_JIT_ON=1`` would script it, which its current torch warns is
deprecated).

One model: 12 layers, hidden 768, head size 64, vocabulary 65536, float32 (random
weights; the speed does not depend on them). Groups:

* ``prefill T=1024 B=1``: one forward over 1024 tokens from the empty state returning
  the last position's logits and the state (what generation needs): ``rwkv``
  (``forward(tokens, None)``), ``prosg`` (``model(ids, logits_to_keep=1)``),
  ``prosg-delta`` (with a rank-8 delta on every matrix: 6 x 12 modules).
* ``decode B=1``: 32 single-token steps from a 16-token prompt's state, greedy:
  ``rwkv`` (``forward(token, state)`` + argmax), ``prosg`` / ``prosg-delta``
  (``generate(last_token, 32, state=...)``). ``extra_info``: ``tokens_per_s`` and,
  for ``prosg``, ``floor_ms``: the time to read every weight a token needs once at the
  memory bandwidth measured here (a copy of 512 MiB), the bound no decode beats.
* ``decode B=8``: the same with 8 sequences; ``rwkv`` runs one sequence at a time, so
  its tokens/s is its B=1 figure (compare ``prosg``'s B=8 ``tokens_per_s`` with it).

Run (the machine is shared; single-threaded process time is stable there):
``PYTHONPATH=. pytest benchmarks/bench_model_rwkv7.py --bench-threads=1
--benchmark-timer=time.process_time``. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import io
import time

import pytest
import torch

from prosg.models.testing import random_delta, random_rwkv7_model, rwkv_package_x070, write_blinkdl7

LAYERS, HIDDEN, HEAD, VOCAB = 12, 768, 64, 65536
PROMPT, NEW_TOKENS, RANK = 16, 32, 8
PREFILL = 1024


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, the rwkv package's) on the same weights, float32, CPU."""
    try:
        x070 = rwkv_package_x070()
    except ImportError as e:
        pytest.skip(str(e))
    ours = random_rwkv7_model(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, head_size=HEAD,
                              intermediate_size=4 * HIDDEN, decay_low_rank_dim=64, a_low_rank_dim=64,
                              v_low_rank_dim=32, gate_low_rank_dim=128, seed=0)
    path = tmp_path_factory.mktemp("bench_rwkv7") / "model.pth"
    write_blinkdl7(ours, path)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = x070(str(path).removesuffix(".pth"), "cpu fp32")
    path.unlink()
    return ours, theirs


def _run(benchmark, fn, rounds):
    def timed():
        with torch.no_grad():
            return fn()

    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


def _bandwidth() -> float:
    """Bytes per second of a single-threaded 512 MiB copy (read + write counted)."""
    src = torch.ones(128 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def _bytes_per_token(model) -> int:
    """Every weight a decode step reads once; of the embedding only one row."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embeddings.weight")
    return total + model.embeddings.weight[0].numel() * model.embeddings.weight.element_size()


IMPLS = ["rwkv", "prosg", "prosg-delta"]


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill(benchmark, models, impl):
    ours, theirs = models
    ids = torch.randint(0, VOCAB, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    if impl == "rwkv":
        tokens = ids[0].tolist()

        def fn():
            return theirs.forward(tokens, None)[0]
    else:
        delta = random_delta(ours, 1, RANK, seed=2) if impl == "prosg-delta" else None

        def fn():
            return ours(ids, delta=delta, logits_to_keep=1)[0]
    benchmark.group = f"rwkv7 prefill T={PREFILL} B=1 (cpu)"
    benchmark.extra_info.update(impl=impl, T=PREFILL, rank=RANK)
    out = _run(benchmark, fn, rounds=2)
    assert out.numel() == VOCAB
    benchmark.extra_info["tokens_per_s"] = PREFILL / benchmark.stats.stats.mean


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", IMPLS)
def test_decode(benchmark, models, batch, impl):
    ours, theirs = models
    if impl == "rwkv" and batch > 1:
        pytest.skip("the rwkv package runs one sequence: its B=8 tokens/s is its B=1 figure")
    prompt = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    if impl == "rwkv":
        with torch.no_grad():
            logits, state0 = theirs.forward(prompt[0].tolist(), None)
        first = int(logits.argmax())

        def fn():
            state, token, out = [s.clone() for s in state0], first, []
            for _ in range(NEW_TOKENS):
                logits, state = theirs.forward(token, state)
                token = int(logits.argmax())
                out.append(token)
            return torch.tensor(out)
    else:
        delta = random_delta(ours, batch, RANK, seed=1) if impl == "prosg-delta" else None
        with torch.no_grad():
            _, state0 = ours(prompt[:, :-1], delta=delta, logits_to_keep=1)
        last = prompt[:, -1:]

        def fn():
            return ours.generate(last, NEW_TOKENS, delta, state=state0)[:, 1:]
    benchmark.group = f"rwkv7 decode B={batch} (cpu, {NEW_TOKENS} steps after a {PROMPT}-token prompt)"
    benchmark.extra_info.update(impl=impl, B=batch, new_tokens=NEW_TOKENS, rank=RANK)
    out = _run(benchmark, fn, rounds=3)
    assert out.numel() == batch * NEW_TOKENS
    benchmark.extra_info["tokens_per_s"] = batch * NEW_TOKENS / benchmark.stats.stats.mean
    if impl == "prosg" and batch == 1:
        benchmark.extra_info["floor_ms"] = 1e3 * _bytes_per_token(ours) / _bandwidth()
        benchmark.extra_info["ms_per_token"] = 1e3 * benchmark.stats.stats.mean / NEW_TOKENS


def test_outputs_agree(models):
    """The timed implementations compute the same thing: a benchmark of a wrong
    implementation is meaningless."""
    ours, theirs = models
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = theirs.forward(prompt[0].tolist(), None, full_output=True)
        logits, _ = ours(prompt)
    torch.testing.assert_close(logits[0], ref.float(), atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
