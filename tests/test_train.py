"""Training the generator (prosg.method.train, ``prosg train``): the loss drops, a killed
run resumed equals an uninterrupted one, checkpoints round-trip, the DDP path runs."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from prosg.data import MultiStageConfig
from prosg.method.train import (
    CHECKPOINT,
    GENERATOR,
    LOG_FILE,
    TrainConfig,
    batch_indices,
    load_generator,
    lr_at,
    make_batch,
    read_checkpoint,
    response_loss,
    train,
)
from prosg.models.testing import random_model

DATA = dict(stage_length=5, ramble_length=5, min_stages=2, max_stages=3, num_letters=6)


def _model(seed=0):
    return random_model(vocab_size=104, hidden_size=24, num_hidden_layers=2, intermediate_size=40, seed=seed)


def _config(**kw) -> TrainConfig:
    fields = dict(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, data=DATA,
                  generator=dict(rank=2, hidden_size=16))
    fields.update(kw)
    return TrainConfig(**fields)


def _state(gen):
    return {k: v.detach().clone() for k, v in gen.state_dict().items()}


def test_short_run_lowers_held_out_loss(tmp_path, num_threads):
    model = _model()
    cfg = _config(steps=40, batch_size=8, lr=1e-2, warmup_steps=4)
    with num_threads(1):  # tiny ops: one thread is several times faster on a shared machine
        result = train(model, cfg, tmp_path, progress=False, log_every=10, save_every=1000)
    gen = result["generator"]
    held_out = make_batch(MultiStageConfig(**DATA), seed=1, indices=range(16))
    with torch.no_grad():
        base = float(response_loss(model, held_out))
        ours = float(response_loss(model, held_out, gen(model, held_out.prompt_ids, held_out.prompt_mask)))
    assert ours < base - 0.1, (base, ours)
    hist = result["history"]
    assert hist[0]["loss"] == pytest.approx(hist[0]["base_loss"], abs=1e-6)  # zero delta at the start
    logged = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 10, 20, 30, 40]
    # the final weights load back into an identical generator
    loaded = load_generator(tmp_path / GENERATOR, model)
    for k, v in gen.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


class _Killed(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    cfg = _config(steps=6)
    full = train(_model(), cfg, tmp_path / "full", progress=False, save_every=2)

    def kill_at_5(step, _record):
        if step == 5:  # after the checkpoint of step 4, before the one of step 6
            raise _Killed

    with pytest.raises(_Killed):
        train(_model(), cfg, tmp_path / "killed", progress=False, save_every=2, on_step=kill_at_5)
    _, meta = read_checkpoint(tmp_path / "killed" / CHECKPOINT)
    assert meta["step"] == "4"
    resumed = train(_model(), cfg, tmp_path / "killed", resume=True, progress=False, save_every=2)
    want, got = _state(full["generator"]), _state(resumed["generator"])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # optimizer state too
    a, _ = read_checkpoint(tmp_path / "full" / CHECKPOINT)
    b, _ = read_checkpoint(tmp_path / "killed" / CHECKPOINT)
    assert set(a) == set(b)
    for k in a:
        if not k.startswith("rng."):
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    # resuming a finished run does nothing more
    again = train(_model(), cfg, tmp_path / "killed", resume=True, progress=False)
    assert again["history"] == []


def test_resume_with_other_settings_is_an_error(tmp_path):
    train(_model(), _config(steps=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different configuration \(fields \['lr'\]\)"):
        train(_model(), _config(steps=2, lr=5e-3), tmp_path, resume=True, progress=False)


def test_resume_reads_a_field_newer_than_the_checkpoint_as_its_default(tmp_path):
    from prosg.method.train import saved_train_config

    train(_model(), _config(steps=2), tmp_path, progress=False)
    _, meta = read_checkpoint(tmp_path / CHECKPOINT)
    old = {k: v for k, v in json.loads(meta["train_config"]).items() if not k.startswith("span_start")}
    assert saved_train_config(json.dumps(old)) == json.loads(_config(steps=2).to_json())
    assert saved_train_config(json.dumps({**old, "span_start_weight": 3.0}))["span_start_weight"] == 3.0


def test_batches_are_disjoint_across_steps_and_ranks():
    cfg = _config(batch_size=3)
    seen = [i for s in range(3) for r in range(2) for i in batch_indices(cfg, s, r, 2)]
    assert sorted(seen) == list(range(18))


def test_lr_schedule():
    cfg = _config(steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.5)
    assert lr_at(cfg, 2) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(0.1)


def test_bad_config():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="matches no module"):
        train(_model(), _config(generator=dict(targets=["blocks.5.attention.key"])), "/nonexistent/x", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_world_size_one_matches_single_process(tmp_path, monkeypatch):
    """The torchrun path (process group, DistributedDataParallel) with one gloo process
    trains exactly as the plain loop."""
    cfg = _config(steps=3)
    plain = train(_model(), cfg, tmp_path / "plain", progress=False)
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    ddp = train(_model(), cfg, tmp_path / "ddp", progress=False, device="cpu")
    assert not torch.distributed.is_initialized()
    want, got = _state(plain["generator"]), _state(ddp["generator"])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def test_cli_train(tmp_path, capsys):
    from prosg.__main__ import main

    base = tmp_path / "base"
    _model().save_pretrained(base)
    argv = ["train", "--base", str(base), "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "2",
            "--rank", "2", "--hidden-size", "8", "--stage-length", "4", "--ramble-length", "4", "--max-stages", "3",
            "--no-progress", "--log-every", "1", "--device", "cpu", "--threads", "0"]
    assert main(argv) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert (tmp_path / "run" / GENERATOR).is_file()
    assert main(argv + ["--resume"]) == 0  # already finished: nothing to do


def _generator_and_batch():
    """A frozen tiny base, a generator whose delta is far from zero, and a batch of
    prompts and responses of several lengths."""
    from prosg.method.generator import GeneratorConfig, SyntheticGradientGenerator
    from prosg.method.train import freeze

    model = freeze(_model())
    gen = SyntheticGradientGenerator(model, GeneratorConfig(rank=2, hidden_size=8))
    with torch.no_grad():
        for head in gen.heads.values():
            head.delta.weight.normal_(0, 0.3)
    return model, gen, make_batch(MultiStageConfig(**{**DATA, "min_stages": 2, "max_stages": 4}), seed=3,
                                  indices=range(5))


def test_response_loss_applies_the_delta_from_the_last_prompt_token():
    """The training loss is the evaluation's function: the base model reads prompt[:-1],
    then prompt[-1] ‖ response runs under the delta (checked row by row, unpadded)."""
    model, gen, batch = _generator_and_batch()
    assert len(set(batch.prompt_lengths.tolist())) > 1 and len(set(batch.response_lengths.tolist())) > 1
    with torch.no_grad():
        delta = gen(model, batch.prompt_ids, batch.prompt_mask)
        got = float(response_loss(model, batch, delta))
        total, count = 0.0, 0
        for b in range(len(batch)):
            p = batch.prompt_ids[b, : batch.prompt_lengths[b]].unsqueeze(0)
            r = batch.response_ids[b, : batch.response_lengths[b]].unsqueeze(0)
            one = gen(model, p)
            _, state = model(p[:, :-1])
            logits, _ = model(torch.cat([p[:, -1:], r], 1), state=state, delta=one)
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], r[0], reduction="sum"))
            count += r.shape[1]
    assert got == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("tagged", [False, True])
def test_filler_words_leave_the_loss(tagged):
    """``filler_loss=False`` drops exactly the ramble stages' filler words from the loss
    (not their separators, not the first tag)."""
    from prosg.data import generate_examples
    from prosg.data.vocab import benchmark_tokenizer
    from prosg.method.train import continuation

    data = MultiStageConfig(**{**DATA, "tag_stages": tagged, "ops": ("repeat", "ramble"), "min_stages": 3})
    examples = generate_examples(data, 6, seed=4)
    rambles = sum(s.length for e in examples for s in e.stages if s.op == "ramble")
    assert rambles > 0
    full = make_batch(data, 4, range(6))
    kept = make_batch(data, 4, range(6), filler_loss=False)
    _, labels_full = continuation(full)
    _, labels_kept = continuation(kept)
    dropped = (labels_full != -100) & (labels_kept == -100)
    assert int(dropped.sum()) == rambles and not bool(((labels_full == -100) & (labels_kept != -100)).any())
    filler = set(benchmark_tokenizer().encode("the cat dog sat ran on mat big red and then saw hill sun sky old"))
    assert set(labels_full[dropped].tolist()) <= filler


@pytest.mark.parametrize("tagged", [False, True])
def test_span_start_weights(tagged):
    """``span_start_weight``: exactly the first ``span_start_tokens`` tokens of each
    non-ramble span (not a tag, a separator or a filler word) get the weight, and the
    loss is the weighted mean of the per-token losses; 1 leaves the batch unweighted."""
    from prosg.data import generate_examples
    from prosg.method.train import continuation, freeze

    data = MultiStageConfig(**{**DATA, "tag_stages": tagged, "ops": ("repeat", "ramble"), "min_stages": 3})
    examples = generate_examples(data, 6, seed=4)
    assert make_batch(data, 4, range(6)).label_weights is None
    batch = make_batch(data, 4, range(6), span_start_weight=7.0, span_start_tokens=2)
    want = torch.ones_like(batch.label_weights)
    for b, e in enumerate(examples):
        col = int(batch.response_start[b]) + (1 if tagged else 0)  # after the first tag
        for k, stage in enumerate(e.stages):
            if stage.op != "ramble":
                want[b, col:col + min(2, stage.length)] = 7.0
            col += stage.length + 1  # the span and its separator (or the next tag)
    assert torch.equal(batch.label_weights, want)
    assert any(s.op == "ramble" for e in examples for s in e.stages)
    model = freeze(_model())
    with torch.no_grad():
        losses = response_loss(model, batch, reduction="none")
        _, labels = continuation(batch)
        w = torch.stack([want[b, int(batch.response_start[b]):][:labels.shape[1] - 1] for b in range(len(batch))])
        w = torch.nn.functional.pad(w, (0, labels.shape[1] - 1 - w.shape[1])) * (labels[:, 1:] != -100)
        assert float(response_loss(model, batch)) == pytest.approx(float((losses * w).sum() / w.sum()), rel=1e-6)
    with pytest.raises(ValueError, match="span_start_weight"):
        TrainConfig(span_start_weight=0.0)
    with pytest.raises(ValueError, match="span_start_tokens"):
        TrainConfig(span_start_tokens=0)
    with pytest.raises(ValueError, match="user data"):
        TrainConfig(span_start_weight=2.0, data_file="x.jsonl", tokenizer="t")


def test_own_context_rows_read_the_greedy_response_and_keep_the_labels():
    """``own_context``: the last rows of a batch read the model's own greedy response
    under the delta (each as long as its reference), the others the reference; the
    labels stay the reference's, and the loss is response_loss on that batch."""
    from prosg.method.evaluation import generate_responses
    from prosg.method.train import _Objective, with_own_responses
    from prosg.models import Delta

    model, gen, batch = _generator_and_batch()
    delta = gen(model, batch.prompt_ids, batch.prompt_mask)
    own = with_own_responses(model, batch, delta.detach(), [2, 4])
    assert torch.equal(own.labels, batch.labels) and torch.equal(own.response_mask, batch.response_mask)
    changed = 0
    for b in range(len(batch)):
        if b not in (2, 4):
            assert torch.equal(own.response_ids[b], batch.response_ids[b])
            continue
        p = batch.prompt_ids[b, :batch.prompt_lengths[b]].tolist()
        n = int(batch.response_lengths[b])
        one = Delta({k: (u[b:b + 1], v[b:b + 1]) for k, (u, v) in delta.factors.items()}, delta.scale)
        want = generate_responses(model, [p], n, delta=one)[0]
        assert own.response_ids[b, :len(want)].tolist() == want
        assert torch.equal(own.response_ids[b, len(want):], batch.response_ids[b, len(want):])
        changed += int((own.response_ids[b, :n] != batch.response_ids[b, :n]).sum())
    assert changed > 0, "a random delta's greedy responses should differ from the references somewhere"
    objective = _Objective(gen, model, TrainConfig(own_context=0.4))  # round(0.4 * 5) = 2 rows: 3 and 4
    with torch.no_grad():
        got = float(objective(batch, None))
        d = gen(model, batch.prompt_ids, batch.prompt_mask)
        want = float(response_loss(model, with_own_responses(model, batch, d, [3, 4]), d))
    assert got == pytest.approx(want, rel=1e-6)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="own_context"):
            TrainConfig(own_context=bad)
    with pytest.raises(ValueError, match="user data"):
        TrainConfig(own_context=0.5, data_file="x.jsonl", tokenizer="t")


def test_cli_eval_and_demo_write_reports(tmp_path, capsys):
    from prosg.__main__ import main

    base = tmp_path / "base"
    _model().save_pretrained(base)
    # --threads 0: the CLI must not change this test process's thread count
    small = ["--stage-length", "3", "--ramble-length", "3", "--max-stages", "3", "--no-progress", "--threads", "0"]
    assert main(["demo", "--base", str(base), "--out", str(tmp_path / "demo"), "--steps", "2", "--n", "4",
                 "--batch-size", "2", "--rank", "2", "--hidden-size", "8", "--tg-lr", "0.1"] + small) == 0
    for name in ("report.json", "report.md", "forgetting.png"):
        assert (tmp_path / "demo" / name).is_file(), name
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert set(report["methods"]) == {"baseline", "repeat_prompt", "prosg", "true_gradient"}
    assert report["true_gradient"]["true_gradient"] == {**report["true_gradient"]["true_gradient"], "lr": 0.1,
                                                        "tuned": False, "steps": 1, "rank": 4}
    for name, m in report["methods"].items():
        assert m["cost"]["prompt_tokens"] > 0 and m["cost"]["seconds"] >= 0
        assert (m["cost"]["delta_ms_per_prompt"] > 0) == (name in ("prosg", "true_gradient")), name
    assert "| true_gradient | " in (tmp_path / "demo" / "report.md").read_text()
    assert report["test_seeds"] == [1, 2, 3]
    for m in report["methods"].values():
        # n examples per seed, pooled; each seed's own summary; mean and spread over seeds
        assert m["overall"]["examples"] == 12 and m["by_stage"] and "compliance" in m["by_stage"][0]
        assert sorted(m["seeds"]) == ["1", "2", "3"]
        assert all(s["overall"]["examples"] == 4 for s in m["seeds"].values())
        per_seed = [s["overall"]["compliance"] for s in m["seeds"].values()]
        assert m["spread"]["overall"]["mean"] == pytest.approx(sum(per_seed) / 3)
        assert m["spread"]["overall"]["seeds"] == 3 and m["spread"]["overall"]["std"] is not None
    assert "mean ± standard deviation over the 3 seeds" in (tmp_path / "demo" / "report.md").read_text()
    gen = tmp_path / "demo" / "generator" / GENERATOR
    assert main(["eval", "--base", str(base), "--generator", str(gen), "--out", str(tmp_path / "eval"),
                 "--n", "3", "--seeds", "5", "--methods", "baseline,prosg", "--no-progress", "--threads", "0"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["methods"]) == {"baseline", "prosg"}
    assert report["test_seeds"] == [5] and report["methods"]["prosg"]["spread"]["overall"]["std"] is None
    assert report["benchmark"]["stage_length"] == 3  # the generator's training task
    with pytest.raises(SystemExit, match="needs --generator"):
        main(["eval", "--base", str(base), "--out", str(tmp_path / "e2"), "--n", "2", "--threads", "0"])
    for bad in ("1,x", "2,2", ""):
        with pytest.raises(SystemExit, match="seeds must be"):
            main(["eval", "--base", str(base), "--out", str(tmp_path / "e3"), "--n", "2", "--seeds", bad,
                  "--methods", "baseline", "--threads", "0"])
    with pytest.raises(SystemExit, match="must not include 0, the training seed"):
        main(["demo", "--base", str(base), "--out", str(tmp_path / "d2"), "--test-seeds", "0,1"] + small)
    with pytest.raises(SystemExit, match="--arch .* or --base, not both"):
        main(["demo", "--arch", "rwkv7", "--base", str(base), "--out", str(tmp_path / "d3")] + small)
    with pytest.raises(SystemExit, match="no bundled base model 'nope'"):
        main(["eval", "--base", "bundled:nope", "--out", str(tmp_path / "e4"), "--methods", "baseline"] + small)


def test_cli_train_defaults_to_the_bundled_base_and_its_task(tmp_path):
    from prosg.__main__ import main
    from prosg.method.pretrain import load_base_model

    _, benchmark = load_base_model()
    assert main(["train", "--out", str(tmp_path), "--steps", "1", "--batch-size", "2", "--rank", "2",
                 "--hidden-size", "8", "--no-progress", "--threads", "0"]) == 0
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["data"] == benchmark.to_dict()


def test_short_training_restores_the_forgotten_last_stage_on_the_bundled_base(tmp_path, num_threads):
    """The method's claim at small scale (docs/results.md; the full demo gives +44.8
    points): 300 steps on the bundled base model (`prosg demo --quick`, ~45 s) bring the
    last instruction back on held-out prompts without hurting the first one."""
    from prosg.method.demo import run_seeds
    from prosg.method.pretrain import load_base_model

    model, bench = load_base_model()
    cfg = TrainConfig(steps=300, batch_size=16, lr=1e-2, warmup_steps=20, data=bench.to_dict())
    with num_threads(1):
        result = train(model, cfg, tmp_path, progress=False, save_every=10_000, log_every=100)
        pooled, per_seed = run_seeds(model, bench, [1, 2], 64, result["generator"], ("baseline", "prosg"))
    base, prosg = pooled["baseline"], pooled["prosg"]
    assert base.last_stage["compliance"] < 0.05  # the bundled base model forgets it
    assert prosg.last_stage["compliance"] >= base.last_stage["compliance"] + 0.08, (base.last_stage, prosg.last_stage)
    # A guard against a delta that wrecks what the model still does, not the -2 point
    # acceptance bound of the full run: after only 300 steps stage 1 moves by up to ~7
    # points on a single seed (64 prompts: one prompt is ~1.8 points); the full demo
    # keeps it within 0.2 points pooled.
    assert prosg.by_stage[0]["compliance"] >= base.by_stage[0]["compliance"] - 0.10
