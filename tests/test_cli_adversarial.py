"""The command line under misuse (prosg train|eval|demo|pretrain): every case either
does what was asked or stops with a one-line error, before any work when the options
alone show it, and never leaves a wrong result or loses what an earlier run wrote.

Classes (each with the case an adversarial review found and its siblings):
divergence (a NaN run), the resumed log, empty selections, a generator on another
base model, corrupt checkpoints, existing outputs, concurrent runs, numeric options,
and how errors are reported. Runs are tiny (a random 2-layer base, 1-3 steps)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from prosg.__main__ import main
from prosg.method.outputs import LOCK_FILE, locked
from prosg.method.train import (
    CHECKPOINT,
    GENERATOR,
    LOG_FILE,
    TrainConfig,
    TrainingDiverged,
    base_identity,
    read_checkpoint,
    train,
)
from prosg.models.testing import random_model

TINY = dict(vocab_size=104, hidden_size=24, num_hidden_layers=2, intermediate_size=40)
# --threads 0: the in-process CLI must leave this process's thread count alone
SMALL = ["--rank", "2", "--hidden-size", "8", "--stage-length", "3", "--ramble-length", "3", "--max-stages", "3",
         "--no-progress", "--threads", "0", "--device", "cpu"]
DATA = dict(stage_length=3, ramble_length=3, max_stages=3)


def _train_argv(base, out, *extra) -> list[str]:
    return ["train", "--base", str(base), "--out", str(out), "--steps", "2", "--batch-size", "2", "--log-every", "1",
            *SMALL, *extra]


def _demo_argv(base, out, *extra) -> list[str]:
    return ["demo", "--base", str(base), "--out", str(out), "--steps", "1", "--n", "1", "--test-seeds", "1",
            "--batch-size", "2", "--methods", "baseline,repeat_prompt,prosg", *SMALL, *extra]


def _eval_argv(base, out, *extra) -> list[str]:
    return ["eval", "--base", str(base), "--out", str(out), "--n", "1", "--seeds", "1", "--methods", "baseline",
            "--no-progress", "--threads", "0", *extra]


def _pretrain_argv(out, *extra) -> list[str]:
    return ["pretrain", "--out", str(out), "--steps", "1", "--hidden-size", "8", "--num-layers", "1",
            "--batch-size", "2", "--stage-length", "3", "--ramble-length", "3", "--min-stages", "2",
            "--max-stages", "2", "--eval", "1", "--quiet", *extra]


def _argv(command, base, out, *extra) -> list[str]:
    if command == "pretrain":
        return _pretrain_argv(out, *extra)
    return {"train": _train_argv, "eval": _eval_argv, "demo": _demo_argv}[command](base, out, *extra)


@pytest.fixture(autouse=True)
def _one_thread(num_threads):
    with num_threads(1):  # tiny ops: one thread is several times faster on a shared machine
        yield


def _save_base(path, seed=0, **sizes):
    random_model(**{**TINY, **sizes}, seed=seed).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _save_base(tmp_path_factory.mktemp("base") / "a")


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory):
    """A finished 2-step run; tests change copies of it (:func:`_copy`)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_train_argv(base, out)) == 0
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]  # every write renamed into place
    return out


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture
def loads(monkeypatch):
    """The base models the CLI loaded: empty when a command stopped before any work."""
    import prosg.method.cli as cli

    calls, load = [], cli._load_base
    monkeypatch.setattr(cli, "_load_base", lambda path: calls.append(path) or load(path))
    return calls


def _fails(capsys, argv, status, *patterns) -> None:
    """``main(argv)`` exits with ``status`` printing no traceback; its error is one line
    (argparse's after its usage) matching every pattern."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == status, (e.value.code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for pattern in patterns:
        assert pattern in errors[0], (pattern, errors[0])


# --------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("extra, patterns", [
    # step 1 (zero delta) is finite, its update is not survivable: step 2's loss is NaN
    (["--lr", "1e30"], ["training diverged at step 2: loss nan", "(step 1) is kept"]),
    # weight decay of lr * wd > 1e38 makes the weights infinite in step 1's own update
    (["--lr", "1e30", "--weight-decay", "1e12"], ["at step 1: the update made", "no checkpoint had been written"]),
])
def test_a_diverging_run_stops_naming_the_step_and_keeps_its_good_checkpoint(base, tmp_path, capsys, extra,
                                                                           patterns):
    out = tmp_path / "run"
    _fails(capsys, _train_argv(base, out, *extra, "--steps", "4", "--save-every", "1"), 1, *patterns)
    assert not (out / GENERATOR).exists()
    if "(step 1) is kept" in patterns[1]:
        assert read_checkpoint(out / CHECKPOINT)[1]["step"] == "1"  # verified: checksum, all finite
        assert _logged_steps(out) == [1]
    else:
        assert not (out / CHECKPOINT).exists() and _logged_steps(out) == []


def test_divergence_mid_run_leaves_the_checkpoint_bytes_and_resumes_from_them(tmp_path, monkeypatch):
    """A NaN loss at step 4 (a stand-in for any numerical blow-up) stops the run; step
    2's checkpoint is byte for byte what it was, and resuming from it finishes the run
    exactly as an uninterrupted one."""
    import prosg.method.train as T

    cfg = TrainConfig(steps=4, batch_size=2, warmup_steps=1, data=DATA, generator=dict(rank=2, hidden_size=8))
    poisoned, saved, loss = [], {}, T.response_loss
    monkeypatch.setattr(T, "response_loss", lambda *a, **kw: loss(*a, **kw) * (float("nan") if any(poisoned) else 1.0))

    def on_step(step, _record):
        if step == 2:
            saved["bytes"] = (tmp_path / CHECKPOINT).read_bytes()
        poisoned.append(step == 3)

    with pytest.raises(TrainingDiverged, match=r"at step 4: loss nan.*\(step 2\) is kept"):
        train(random_model(**TINY), cfg, tmp_path, progress=False, save_every=2, on_step=on_step)
    assert (tmp_path / CHECKPOINT).read_bytes() == saved["bytes"]
    assert not (tmp_path / GENERATOR).exists()
    poisoned.clear()
    resumed = train(random_model(**TINY), cfg, tmp_path, resume=True, progress=False, save_every=2)
    full = train(random_model(**TINY), cfg, tmp_path / "full", progress=False, save_every=2)
    for k, v in full["generator"].state_dict().items():
        torch.testing.assert_close(resumed["generator"].state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_pretrain_stops_on_divergence(tmp_path, capsys):
    _fails(capsys, _pretrain_argv(tmp_path / "m", "--lr", "1e30", "--steps", "3"), 1, "pretraining diverged at step")
    assert not (tmp_path / "m" / "model.safetensors").exists()


# --------------------------------------------------------------------------- the resumed log


class _Killed(Exception):
    pass


def _kill_at(n):
    def on_step(step, _record):
        if step == n:
            raise _Killed

    return on_step


def _logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / LOG_FILE).read_text().splitlines()]


def _killed_run(tmp_path):
    """A 6-step run killed after step 5 (its checkpoint: step 4), one log line a step."""
    cfg = TrainConfig(steps=6, batch_size=2, warmup_steps=1, data=DATA, generator=dict(rank=2, hidden_size=8))
    with pytest.raises(_Killed):
        train(random_model(**TINY), cfg, tmp_path, progress=False, save_every=2, log_every=1, on_step=_kill_at(5))
    assert _logged_steps(tmp_path) == [1, 2, 3, 4, 5]
    return cfg


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    cfg = _killed_run(tmp_path)
    with open(tmp_path / LOG_FILE, "a") as f:
        f.write('{"step": 6, "lo')  # a line torn by the kill
    train(random_model(**TINY), cfg, tmp_path, resume=True, progress=False, save_every=2, log_every=1)
    assert _logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_the_log_cut_is_atomic(tmp_path, monkeypatch):
    """A failure while the cut log is put in place leaves the old log whole."""
    cfg = _killed_run(tmp_path)
    before = (tmp_path / LOG_FILE).read_bytes()
    import prosg.method.outputs as outputs

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(outputs.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        train(random_model(**TINY), cfg, tmp_path, resume=True, progress=False, save_every=2, log_every=1)
    assert (tmp_path / LOG_FILE).read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------- empty selections


@pytest.mark.parametrize("command, extra, pattern", [
    ("eval", ["--n", "0"], "argument --n"),
    ("eval", ["--methods", ""], "--methods must name at least one"),
    ("eval", ["--methods", " , "], "--methods must name at least one"),
    ("eval", ["--methods", "baseline,baseline"], "more than once"),
    ("eval", ["--methods", "baseline,oracle"], "unknown method(s) ['oracle']"),
    ("eval", ["--seeds", ""], "seeds must be"),
    ("eval", ["--methods", "prosg"], "needs --generator"),
    ("demo", ["--n", "0"], "argument --n"),
    ("demo", ["--test-seeds", " "], "seeds must be"),
    ("train", ["--targets", ""], "--targets must name at least one"),
    ("train", ["--targets", ","], "--targets must name at least one"),
    ("train", ["--input-mode", "true", "--features", "layer", "--encoder-layers", "1"], "encoder_layers=1"),
])
def test_empty_or_invalid_selections_are_refused_before_any_work(base, tmp_path, capsys, loads, command, extra,
                                                                 pattern):
    out = tmp_path / "out"
    _fails(capsys, _argv(command, base, out, *extra), 2, pattern)
    assert not out.exists() and not loads


def test_options_that_do_not_fit_the_base_models_task_are_refused_before_anything_is_created(base, tmp_path,
                                                                                            capsys):
    out = tmp_path / "out"
    _fails(capsys, _train_argv(base, out, "--min-stages", "4"), 2, "max_stages")
    _fails(capsys, _eval_argv(base, out, "--num-letters", "30"), 2, "num_letters")
    assert not out.exists()


def test_the_library_refuses_empty_evaluations():
    from prosg.data import MultiStageConfig
    from prosg.method.demo import run_methods, run_seeds, write_report
    from prosg.method.evaluation import evaluate

    model = random_model(**TINY)
    bench = MultiStageConfig(**DATA)
    with pytest.raises(ValueError, match="n .* must be an int >= 1"):
        run_seeds(model, bench, [1], 0, None, ("baseline",))
    with pytest.raises(ValueError, match="no method"):
        run_seeds(model, bench, [1], 2, None, ())
    with pytest.raises(ValueError, match="more than once"):
        run_methods(model, [], None, ("baseline", "baseline"))
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, [])
    with pytest.raises(ValueError, match="no results"):
        write_report("/nonexistent/never", {}, {})


# --------------------------------------------------------------------------- the generator's base model


def test_a_generator_runs_only_on_its_own_base_model(base, finished, tmp_path, capsys):
    gen = finished / GENERATOR
    record = json.loads(read_checkpoint(gen)[1]["base_model"])
    from prosg.models import RWKV4LM

    assert record == json.loads(json.dumps(base_identity(RWKV4LM.from_pretrained(base))))
    assert record["architecture"] == "RWKV4LM" and record["config"]["hidden_size"] == 24
    same_shape = _save_base(tmp_path / "same_shape", seed=1)
    _fails(capsys, _eval_argv(same_shape, tmp_path / "e1", "--generator", str(gen), "--methods", "prosg"), 1,
           f"{gen} was trained on another base model: weights sha256")
    wider = _save_base(tmp_path / "wider", hidden_size=32)
    _fails(capsys, _eval_argv(wider, tmp_path / "e2", "--generator", str(gen), "--methods", "prosg"), 1,
           "hidden_size 24 vs 32")
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    _fails(capsys, _train_argv(same_shape, run, "--resume"), 1, "trained on another base model: weights")
    assert _snapshot(run) == before
    assert not (tmp_path / "e1" / "report.json").exists() and not (tmp_path / "e2" / "report.json").exists()


# --------------------------------------------------------------------------- corrupt checkpoints


def _header(data: bytes) -> tuple[dict, int]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8: 8 + n]), 8 + n


def _corrupt(path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return
    header, start = _header(data)
    key = sorted(k for k in header if k.startswith("generator.") and header[k]["dtype"] == "F32")[0]
    if how == "bit flip":  # the lowest bit of one weight: still finite, only the checksum can tell
        at = start + header[key]["data_offsets"][0]
        path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
        return
    meta = dict(header["__metadata__"])
    if how == "nan, no checksum":
        del meta["sha256"]  # as an older prosg wrote them: only the finiteness check is left
    tensors = load_file(str(path))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("how", ["nan", "nan, no checksum", "bit flip", "truncated"])
def test_a_corrupt_checkpoint_is_refused_and_nothing_good_is_overwritten(base, finished, tmp_path, capsys, how):
    run = _copy(finished, tmp_path)
    _corrupt(run / CHECKPOINT, how)
    before = _snapshot(run)
    _fails(capsys, _train_argv(base, run, "--resume"), 1, f"{run / CHECKPOINT} is corrupt")
    assert _snapshot(run) == before  # the finished generator above all
    read_checkpoint(run / GENERATOR)
    _fails(capsys, _eval_argv(base, tmp_path / "e", "--generator", str(run / CHECKPOINT)), 1,
           f"{run / CHECKPOINT} is corrupt")
    assert not (tmp_path / "e" / "report.json").exists()


# --------------------------------------------------------------------------- existing outputs


def test_a_finished_run_is_not_replaced_without_resume_or_overwrite(base, finished, tmp_path, capsys, loads):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    _fails(capsys, _train_argv(base, run), 1, f"{run} already holds a training run", "--resume", "--overwrite")
    assert _snapshot(run) == before and not loads
    _fails(capsys, _train_argv(base, run, "--resume", "--overwrite"), 2, "not allowed with argument")
    (run / CHECKPOINT).unlink()  # a generator with nothing to resume from: a fresh start would replace it
    _fails(capsys, _train_argv(base, run, "--resume"), 1, f"no {CHECKPOINT} to resume from")
    assert main(_train_argv(base, run, "--overwrite", "--steps", "1")) == 0
    assert read_checkpoint(run / GENERATOR)[1]["step"] == "1" and _logged_steps(run) == [1]


def test_existing_reports_and_models_are_not_replaced_without_overwrite(base, tmp_path, capsys, loads):
    demo, report = tmp_path / "demo", tmp_path / "eval"
    for folder in (demo, report):
        folder.mkdir()
        (folder / "report.json").write_text("{}\n")
    _fails(capsys, _demo_argv(base, demo), 1, f"{demo} already holds a report (report.json)", "--overwrite")
    _fails(capsys, _demo_argv(base, demo, "--resume"), 1, "already holds a report")
    _fails(capsys, _eval_argv(base, report), 1, f"{report} already holds a report")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}\n")
    _fails(capsys, _pretrain_argv(model), 1, f"{model} already holds a pretrained model", "--overwrite")
    assert not loads and (demo / "report.json").read_text() == "{}\n" == (report / "report.json").read_text()
    assert (model / "config.json").read_text() == "{}\n"
    assert main(_demo_argv(base, demo, "--overwrite")) == 0
    assert main(_pretrain_argv(model, "--overwrite")) == 0
    assert json.loads((model / "config.json").read_text())["hidden_size"] == 8
    assert set(json.loads((demo / "report.json").read_text())["methods"]) == {"baseline", "repeat_prompt", "prosg"}
    capsys.readouterr()


# --------------------------------------------------------------------------- concurrent runs


def test_a_second_process_on_a_folder_in_use_fails_at_once(base, tmp_path):
    """While this process trains into OUT, a real ``prosg train --out OUT --overwrite``
    (which would delete the running run's files) exits 1 at once, naming the folder
    and this process; the first run finishes with its log whole."""
    out, other = tmp_path / "run", {}

    def second_run(step, _record):
        if step == 1:
            argv = [sys.executable, "-m", "prosg", *_train_argv(base, out, "--overwrite", "--threads", "1")]
            other["run"] = subprocess.run(argv, capture_output=True, text=True, timeout=300)

    cfg = TrainConfig(steps=3, batch_size=2, warmup_steps=1, data=DATA, generator=dict(rank=2, hidden_size=8))
    train(random_model(**TINY), cfg, out, progress=False, log_every=1, on_step=second_run)
    run = other["run"]
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("prosg: error: ") and f"{out} is in use by prosg process {os.getpid()}" in last, last
    assert _logged_steps(out) == [1, 2, 3]
    read_checkpoint(out / GENERATOR)


@pytest.mark.parametrize("command", ["train", "eval", "demo", "pretrain"])
def test_every_command_refuses_a_folder_another_process_holds(base, tmp_path, capsys, command):
    """(The lock is a flock on an open file: two opens conflict within one process too.)"""
    out = tmp_path / "out"
    argv = _argv(command, base, out, *(["--resume"] if command == "train" else []))
    with locked(out):
        _fails(capsys, argv, 1, f"{out} is in use by prosg process {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


# --------------------------------------------------------------------------- numeric options


@pytest.mark.parametrize("command, option, value", [
    ("train", "--save-every", "0"), ("train", "--log-every", "0"), ("train", "--steps", "0"),
    ("train", "--steps", "2.5"), ("train", "--batch-size", "-1"), ("train", "--lr", "0"), ("train", "--lr", "nan"),
    ("train", "--lr", "inf"), ("train", "--weight-decay", "-0.1"), ("train", "--warmup-steps", "-1"),
    ("train", "--grad-clip", "nan"), ("train", "--rank", "0"), ("train", "--hidden-size", "0"),
    ("train", "--depth", "0"), ("train", "--encoder-layers", "-1"), ("train", "--scale", "nan"),
    ("train", "--threads", "-1"), ("train", "--stage-length", "0"), ("train", "--max-stages", "0"),
    ("eval", "--n", "-3"), ("eval", "--batch-size", "0"), ("eval", "--ramble-length", "0"),
    ("eval", "--tg-lr", "-1"), ("eval", "--tg-lr", "nan"), ("eval", "--tg-multi-steps", "0"),
    ("demo", "--tg-rank", "0"), ("demo", "--tg-lr", "0"),
    ("demo", "--steps", "0"), ("demo", "--lr", "-1"), ("demo", "--batch-size", "0"),
    ("pretrain", "--steps", "0"), ("pretrain", "--eval", "-1"), ("pretrain", "--save-every", "-1"),
    ("pretrain", "--bptt", "-1"), ("pretrain", "--lr", "0"), ("pretrain", "--hidden-size", "0"),
    ("pretrain", "--seed", "-1"),
])
def test_numeric_options_are_checked_before_anything_is_created(base, tmp_path, capsys, command, option, value):
    out = tmp_path / "out"
    _fails(capsys, _argv(command, base, out, option, value), 2, f"argument {option}", repr(value))
    assert not out.exists()


def test_the_library_checks_its_step_counts_before_creating_anything(tmp_path):
    cfg = TrainConfig(steps=1, batch_size=2, data=DATA, generator=dict(rank=2, hidden_size=8))
    for kw in (dict(save_every=0), dict(log_every=0), dict(resume=True, overwrite=True)):
        with pytest.raises(ValueError, match="save_every|log_every|exclude"):
            train(random_model(**TINY), cfg, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- how errors read


def test_lower_layer_errors_are_one_line_and_debug_brings_the_traceback_back(base, tmp_path, capsys):
    missing = tmp_path / "missing"
    argv = _train_argv(missing, tmp_path / "out")
    _fails(capsys, argv, 1, f"--base {missing}: no such model directory")
    _fails(capsys, _train_argv(base, tmp_path / "out", "--targets", "blocks.9.*"), 1, "matches no module")
    _fails(capsys, _eval_argv(base, tmp_path / "e", "--generator", str(missing)), 1, "no such file")
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])
