"""prosg.method.pretrain: the base-model trainer, the bundled base model, ``prosg pretrain``."""

from __future__ import annotations

import json

import pytest
import torch

from prosg.__main__ import main as prosg_main
from prosg.data import MultiStageConfig, benchmark_tokenizer, generate_examples
from prosg.data.batching import Collator
from prosg.data import SETTINGS
from prosg.method.pretrain import (
    BASE_BENCHMARK,
    BUNDLED_BASES,
    DEFAULT_BASE,
    TRAIN_CONFIG_FILE,
    PretrainConfig,
    load_base_model,
    lr_at,
    pretrain,
    save_base_model,
    training_batch,
)
from prosg.models import RWKV4LM, RWKV7LM

TOK = benchmark_tokenizer()
TINY_BENCH = MultiStageConfig(min_stages=2, max_stages=2, stage_length=4, ramble_length=5, max_pattern=2)


def _tiny(**kw) -> PretrainConfig:
    fields = dict(benchmark=TINY_BENCH, hidden_size=16, num_layers=1, steps=25, batch_size=8, lr=1e-2,
                  warmup_steps=3, repeat_prompt_every=4)
    fields.update(kw)
    return PretrainConfig(**fields)


def test_a_few_steps_lower_the_loss_and_are_deterministic():
    threads = torch.get_num_threads()
    h1, h2 = [], []
    m1 = pretrain(_tiny(), progress=False, history=h1)
    m2 = pretrain(_tiny(), progress=False, history=h2)
    assert torch.get_num_threads() == threads  # restored after training with cfg.threads
    assert h1 == h2
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    first = sum(loss for _, loss in h1[:3]) / 3
    last = sum(loss for _, loss in h1[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert not m1.training
    assert m1.config.vocab_size == TOK.vocab_size and m1.config.rescale_every == 0
    m3 = pretrain(_tiny(seed=1), progress=False)
    assert not torch.equal(m3.state_dict()["head.weight"], s1["head.weight"])


def test_training_batches_are_a_function_of_the_step():
    cfg = _tiny()
    col = Collator(TOK.pad_id, prompt_padding="right")
    a, b = training_batch(cfg, 3, col), training_batch(cfg, 3, col)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(training_batch(cfg, 4, col).input_ids[:, :5], a.input_ids[:, :5])
    # examples 3*8 .. 4*8-1 of the data seed; every 4th one reads its prompt twice
    examples = generate_examples(cfg.benchmark, 8, seed=cfg.data_seed, start=24)
    for row, e in enumerate(examples):
        prompt = TOK.decode(a.prompt_ids[row], skip_pad=True)
        doubled = (24 + row) % 4 == 3
        assert prompt == (f"{e.prompt} {e.prompt}" if doubled else e.prompt)
    # right padding: no pad before a real token
    first_pad = (~a.attention_mask).int().argmax(1)
    for row in range(len(a)):
        if not a.attention_mask[row].all():
            assert not a.attention_mask[row, first_pad[row]:].any()


def test_lr_schedule():
    cfg = _tiny(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    values = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_config_round_trip_and_validation():
    cfg = _tiny()
    back = PretrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="hidden_size"):
        PretrainConfig(hidden_size=0)
    with pytest.raises(ValueError, match="unknown"):
        PretrainConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="lr"):
        PretrainConfig(lr=-1.0)


def test_save_and_load_round_trip(tmp_path):
    cfg = _tiny(steps=2)
    model = pretrain(cfg, progress=False)
    save_base_model(model, cfg, tmp_path / "m", extra={"note": 1})
    loaded, bench = load_base_model(tmp_path / "m")
    assert bench == TINY_BENCH
    sd, sl = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], sl[k]) for k in sd)
    record = json.loads((tmp_path / "m" / TRAIN_CONFIG_FILE).read_text())
    assert record["note"] == 1 and PretrainConfig.from_dict(record["pretrain_config"]) == cfg
    with pytest.raises(FileNotFoundError, match=TRAIN_CONFIG_FILE):
        load_base_model(tmp_path)


def _parse_pretrain(argv: list[str]) -> PretrainConfig:
    import argparse

    from prosg.method.pretrain import add_pretrain_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_pretrain_parser(parser.add_subparsers())
    return config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("name", BUNDLED_BASES)
def test_bundled_base_models_load_and_their_commands_rebuild_them(name):
    """Each bundled base loads as the architecture its record says, and the command its
    record gives, parsed by ``prosg pretrain``, is exactly the recorded config."""
    import shlex
    from importlib import resources

    model, bench = load_base_model(f"bundled:{name}")
    record = json.loads((resources.files("prosg.assets") / name / TRAIN_CONFIG_FILE).read_text())
    cfg = PretrainConfig.from_dict(record["pretrain_config"])
    assert type(model) is {"rwkv4": RWKV4LM, "rwkv7": RWKV7LM}[cfg.arch] and not model.training
    assert bench == cfg.benchmark
    assert model.config.vocab_size == TOK.vocab_size
    assert model.config.hidden_size == cfg.hidden_size and model.config.num_hidden_layers == cfg.num_layers
    argv = shlex.split(record["command"])
    assert argv[:2] == ["prosg", "pretrain"] and "#" not in argv
    assert _parse_pretrain(argv[1:]) == cfg
    size = sum((resources.files("prosg.assets") / name / f).stat().st_size
               for f in ("config.json", "model.safetensors", TRAIN_CONFIG_FILE))
    assert size <= 2 * 2**20, f"{name}: {size} bytes, over the 2 MB a bundled base may take"
    # it answers a benchmark prompt with finite logits
    e = generate_examples(bench, 1, seed=1000)[0]
    logits, _ = model(torch.tensor([TOK.encode(e.prompt)]))
    assert torch.isfinite(logits).all()


def test_the_default_bundled_base_and_the_cli_defaults():
    """No --base: the DEFAULT_BASE control; ``prosg pretrain``'s defaults: bundled:rwkv4."""
    from importlib import resources

    model, bench = load_base_model()
    same, same_bench = load_base_model(f"bundled:{DEFAULT_BASE}")
    assert bench == same_bench
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    record = json.loads((resources.files("prosg.assets") / "rwkv4" / TRAIN_CONFIG_FILE).read_text())
    assert PretrainConfig.from_dict(record["pretrain_config"]) == PretrainConfig()
    assert PretrainConfig().benchmark == BASE_BENCHMARK == SETTINGS["long"] and PretrainConfig().bptt == 0
    with pytest.raises(ValueError, match="bundled:rwkv7"):
        load_base_model("bundled:nope")


def test_pretrain_command_round_trips():
    from prosg.method.pretrain import pretrain_command

    for cfg in (PretrainConfig(), PretrainConfig(arch="rwkv7", head_size=32, steps=7, bptt=16, seed=3),
                PretrainConfig(benchmark=SETTINGS["many"], lr=1e-3, data_seed=5),
                PretrainConfig(benchmark=MultiStageConfig(**{**BASE_BENCHMARK.to_dict(), "ramble_length": 40,
                                                              "min_stages": 2}))):
        import shlex

        argv = shlex.split(pretrain_command(cfg, "OUT"))
        assert _parse_pretrain(argv[1:]) == cfg, argv


def test_rwkv7_base_trains_and_is_reproducible():
    h1, h2 = [], []
    m1 = pretrain(_tiny(arch="rwkv7", steps=12), progress=False, history=h1)
    m2 = pretrain(_tiny(arch="rwkv7", steps=12), progress=False, history=h2)
    assert isinstance(m1, RWKV7LM) and h1 == h2
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert sum(loss for _, loss in h1[-3:]) < sum(loss for _, loss in h1[:3]) - 0.5
    with pytest.raises(ValueError, match="arch"):
        PretrainConfig(arch="rwkv5")


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = prosg_main(["pretrain", "--out", str(out), "--seed", "2", "--steps", "3", "--hidden-size", "8",
                     "--num-layers", "1", "--batch-size", "4", "--stage-length", "3", "--ramble-length", "4",
                     "--min-stages", "2", "--max-stages", "2", "--eval", "4", "--quiet"])
    assert rc == 0
    record = json.loads((out / TRAIN_CONFIG_FILE).read_text())
    cfg = PretrainConfig.from_dict(record["pretrain_config"])
    assert cfg.seed == 2 and cfg.data_seed == 2 and cfg.steps == 3 and cfg.benchmark.stage_length == 3
    assert record["eval"]["overall"]["examples"] == 4
    model, bench = load_base_model(out)
    assert bench.stage_length == 3 and model.config.hidden_size == 8
    assert '"out"' in capsys.readouterr().out


def test_truncated_bptt_same_loss_cut_gradient():
    """Chunking changes no loss value (the state crosses chunks), only the gradient:
    nothing reaches the embedding of the first token from a loss 7+ tokens later."""
    from prosg.method.pretrain import lm_loss

    cfg = _tiny()
    batch = training_batch(cfg, 0, Collator(TOK.pad_id, prompt_padding="right"))
    model = RWKV4LM(cfg.model_config())
    full = lm_loss(model, batch, 0)
    chunked = lm_loss(model, batch, 7)
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    g_full = torch.autograd.grad(full, model.blocks[0].attention.time_decay)[0]
    g_chunk = torch.autograd.grad(chunked, model.blocks[0].attention.time_decay)[0]
    assert not torch.allclose(g_full, g_chunk)


#: What 64 held-out prompts (seed 1) must show of each naturally forgetting base: the
#: least first-stage compliance and the least drop from the first to the last stage.
#: The full measurement (3 x 200 prompts, docs/results.md and docs/base_model.md):
#: rwkv4 84.1 % -> 49.5 % (gap 34.6 points, the gate: >= 30 with >= 85 % first);
#: rwkv7 keeps far more (gap about 12 points: it misses the gate, see base_model.md).
#: Measured on this sample: rwkv4 79.6 % -> 39.1 %, rwkv7 92.6 % -> 84.4 %; the bounds
#: leave room for the sample's noise (one prompt is 1.6 points).
SMALL_SAMPLE_GATE = {"rwkv4": (0.70, 0.25), "rwkv7": (0.85, 0.03)}


@pytest.mark.parametrize("name", list(SMALL_SAMPLE_GATE))
def test_bundled_bases_forget_on_a_small_sample(name):
    """The forgetting of the naturally forgetting bases, on a small sample (the short
    form of the gate; the full measurement is in docs/results.md)."""
    from prosg.method.evaluation import evaluate

    model, bench = load_base_model(f"bundled:{name}")
    result = evaluate(model, generate_examples(bench, 64, seed=1))
    first, last = result.by_stage[0]["compliance"], result.last_stage["compliance"]
    least_first, least_gap = SMALL_SAMPLE_GATE[name]
    assert first >= least_first, (first, last)
    assert first - last >= least_gap, (first, last)
