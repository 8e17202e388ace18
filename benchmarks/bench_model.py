"""RWKV-4 model layer (``prosg.models.RWKV4LM``) against transformers' ``RwkvForCausalLM``.

One model: 6 layers, hidden 512, vocabulary 50277, float32 (random weights; the
speed does not depend on them), ``rescale_every=6``. Side by side in each group:

* ``decode B={1,8}``: ``generate`` of 32 new tokens after a 16-token prompt, greedy.
  ``hf`` is transformers' ``generate``; ``prosg`` ours; ``prosg-delta`` ours with a
  per-sample rank-8 delta on every matrix of every layer (7 x 6 modules).
  extra_info ``tokens_per_s`` counts generated tokens of the whole batch.
  Caveat: transformers 5.24's single-token step with a state is wrong for batch > 1
  (its ``[B, H]`` shift state broadcasts against the ``[B, 1, H]`` input into
  ``[B, B, H]``), so its B=8 numbers are for a computation that does B times the
  work after the first layer and gives wrong tokens; B=1 is the fair comparison.
* ``prefill T=1024 B=1``: one forward over 1024 tokens returning every position's
  logits and the state: ``hf`` forward, ``prosg``, ``prosg-delta``.

Run: ``pytest benchmarks -k bench_model`` (``--bench-devices=cpu,cuda`` as for the
other benchmarks). Naming the file (``pytest benchmarks/bench_model.py``) currently
collects every benchmark twice: once by pytest for the explicit path, once by
``benchmarks/conftest.py``'s ``pytest_collect_file``. On a shared, loaded CPU the
wall-clock numbers swing by 2-4x between runs; single-threaded process time is stable
to a few percent there:
``OMP_NUM_THREADS=1 pytest benchmarks -k bench_model --benchmark-timer=time.process_time``.
"""

from __future__ import annotations

import pytest
import torch

from prosg.models import RWKV4LM
from prosg.models.testing import random_delta, random_model

transformers = pytest.importorskip("transformers")
from transformers import RwkvForCausalLM  # noqa: E402

LAYERS, HIDDEN, VOCAB = 6, 512, 50277
PROMPT, NEW_TOKENS, RANK = 16, 32, 8
PREFILL = 1024


def _devices(config) -> list[str]:
    opt = config.getoption("--bench-devices", default=None)
    if opt:
        return [d.strip() for d in opt.split(",") if d.strip()]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _devices(metafunc.config), scope="module")


@pytest.fixture(scope="module")
def models(device, tmp_path_factory):
    """(ours, transformers') on the same weights, eval mode, float32."""
    ours = random_model(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        intermediate_size=4 * HIDDEN, rescale_every=6, seed=0)
    path = tmp_path_factory.mktemp("bench_model")
    ours.save_pretrained(path)
    hf = RwkvForCausalLM.from_pretrained(path).eval().to(device)
    hf.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens
    hf.generation_config.pad_token_id = 0
    return ours.to(device), hf


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn, device, rounds):
    def timed():
        with torch.no_grad():
            out = fn()
        _sync(device)
        return out

    return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)


IMPLS = ["hf", "prosg", "prosg-delta"]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("impl", IMPLS)
def test_decode(benchmark, models, device, batch, impl):
    ours, hf = models
    prompt = torch.randint(0, VOCAB, (batch, PROMPT), device=device)
    if impl == "hf":
        def fn():
            return hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    else:
        delta = random_delta(ours, batch, RANK, seed=1) if impl == "prosg-delta" else None

        def fn():
            return ours.generate(prompt, NEW_TOKENS, delta)
    benchmark.group = f"decode B={batch} ({device}, {PROMPT}-token prompt + {NEW_TOKENS} new)"
    benchmark.extra_info.update(impl=impl, device=device, B=batch, new_tokens=NEW_TOKENS, rank=RANK)
    out = _run(benchmark, fn, device, rounds=3)
    assert out.shape == (batch, PROMPT + NEW_TOKENS)
    benchmark.extra_info["tokens_per_s"] = batch * NEW_TOKENS / benchmark.stats.stats.mean


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill(benchmark, models, device, impl):
    ours, hf = models
    ids = torch.randint(0, VOCAB, (1, PREFILL), device=device)
    if impl == "hf":
        def fn():
            return hf(ids, use_cache=True).logits
    else:
        delta = random_delta(ours, 1, RANK, seed=2) if impl == "prosg-delta" else None

        def fn():
            return ours(ids, delta=delta)[0]
    benchmark.group = f"prefill T={PREFILL} B=1 ({device})"
    benchmark.extra_info.update(impl=impl, device=device, T=PREFILL, rank=RANK)
    out = _run(benchmark, fn, device, rounds=2)
    assert out.shape == (1, PREFILL, VOCAB)
    benchmark.extra_info["tokens_per_s"] = PREFILL / benchmark.stats.stats.mean


def test_outputs_agree(models, device):
    """The timed implementations compute the same thing (B=1, where transformers'
    decode is right): a benchmark of a wrong implementation is meaningless."""
    ours, hf = models
    prompt = torch.randint(0, VOCAB, (1, PROMPT), device=device)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=8, do_sample=False)
        logits = hf(prompt).logits
    assert torch.equal(ours.generate(prompt, 8), expected)
    torch.testing.assert_close(ours(prompt)[0], logits, atol=1e-4, rtol=1e-4)
    assert isinstance(ours, RWKV4LM)
