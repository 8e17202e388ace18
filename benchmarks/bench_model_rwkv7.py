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
* ``decode, interleaved rounds``: every decode target as a ratio of measurements taken
  one after another in the same round (the package, prosg at B=1 and B=8 with and
  without deltas, the copy bandwidth right before and after the B=1 decode), nine
  rounds; the ratios and their medians are in
  ``extra_info`` (``-s`` prints them). The shared host's speed drifts by 20-30% between
  the groups above, which run minutes apart; these ratios do not see that drift.

Run (the machine is shared; single-threaded process time is stable there):
``PYTHONPATH=. pytest benchmarks/bench_model_rwkv7.py --bench-threads=1
--benchmark-timer=time.process_time``. Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import pytest
import torch

from prosg.models.testing import random_delta, random_rwkv7_model, rwkv_package_x070, write_blinkdl7

LAYERS, HIDDEN, HEAD, VOCAB = 12, 768, 64, 65536
PROMPT, NEW_TOKENS, RANK = 16, 32, 8
PREFILL = 1024
#: Rounds of the interleaved decode benchmark (each ~15 s); the medians are the figures.
ROUNDS = 9


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


def test_decode_interleaved(benchmark, models):
    """The decode targets as ratios of adjacent measurements: each round times, one
    after another, the rwkv package at B=1, prosg at B=1 and B=8 with and without the
    rank-8 deltas, and the copy bandwidth behind the weight-read floor; every ratio is
    taken within a round, so a slow or fast phase of the shared host moves both of its
    sides (the separate groups above run minutes apart). ``extra_info`` holds each
    ratio per round and its median; ``-s`` prints them."""
    ours, theirs = models
    prompt = torch.randint(0, VOCAB, (8, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, rwkv_state0 = theirs.forward(prompt[0].tolist(), None)
    first = int(logits.argmax())
    deltas = {b: random_delta(ours, b, RANK, seed=1) for b in (1, 8)}
    states = {}
    with torch.no_grad():
        for b in (1, 8):
            for d in (None, deltas[b]):
                states[b, d is not None] = ours(prompt[:b, :-1], delta=d, logits_to_keep=1)[1]

    def rwkv_decode():
        state, token = [s.clone() for s in rwkv_state0], first
        for _ in range(NEW_TOKENS):
            logits, state = theirs.forward(token, state)
            token = int(logits.argmax())

    def prosg_decode(b, with_delta):
        ours.generate(prompt[:b, -1:], NEW_TOKENS, deltas[b] if with_delta else None, state=states[b, with_delta])

    def timed(fn, *args):
        t = time.process_time()
        with torch.no_grad():
            fn(*args)
        return time.process_time() - t

    floor_bytes = _bytes_per_token(ours)
    ratios: dict[str, list[float]] = {k: [] for k in (
        "decode_b1_vs_rwkv", "decode_b1_vs_floor", "decode_b8_tokens_per_s_vs_rwkv", "delta_cost_b1",
        "delta_cost_b8")}

    def one_round():
        rwkv = timed(rwkv_decode)
        # The bandwidth right before and after the B=1 decode: the host's speed moves
        # within a round too, and the floor ratio is the most sensitive to it.
        bandwidth = _bandwidth()
        p1 = timed(prosg_decode, 1, False)
        floor_s = floor_bytes / (0.5 * (bandwidth + _bandwidth()))
        p1d = timed(prosg_decode, 1, True)
        p8, p8d = timed(prosg_decode, 8, False), timed(prosg_decode, 8, True)
        ratios["decode_b1_vs_rwkv"].append(rwkv / p1)
        ratios["decode_b1_vs_floor"].append(p1 / NEW_TOKENS / floor_s)
        ratios["decode_b8_tokens_per_s_vs_rwkv"].append(8 * rwkv / p8)
        ratios["delta_cost_b1"].append(p1d / p1 - 1)
        ratios["delta_cost_b8"].append(p8d / p8 - 1)

    benchmark.group = "rwkv7 decode, interleaved rounds (ratios in extra_info)"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    # The warm-up round is not a measurement.
    for k in ratios:
        ratios[k] = ratios[k][1:]
    for k, v in ratios.items():
        benchmark.extra_info[k] = [round(x, 3) for x in v]
        benchmark.extra_info[k + "_median"] = round(statistics.median(v), 3)
        print(f"{k:32s} median {statistics.median(v):7.3f}  rounds {', '.join(f'{x:.3f}' for x in v)}")


def test_outputs_agree(models):
    """The timed implementations compute the same thing: a benchmark of a wrong
    implementation is meaningless."""
    ours, theirs = models
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = theirs.forward(prompt[0].tolist(), None, full_output=True)
        logits, _ = ours(prompt)
    torch.testing.assert_close(logits[0], ref.float(), atol=1e-4 * float(ref.abs().max()), rtol=1e-4)
