"""The command line (``prosg info``, also ``python -m prosg info``) and prosg.backends()."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prosg

# The keys the README documents; builds may add more.
DOCUMENTED_KEYS = {
    "version": str,
    "cpu": bool,
    "cuda": bool,
    "cuda_archs": str,
    "cuda_available": bool,
    "built_with_torch": str,
    "running_torch": str,
    "openmp": bool,
    "cpu_threads": int,
}


def test_backends_keys_and_types():
    b = prosg.backends()
    missing = set(DOCUMENTED_KEYS) - set(b)
    assert not missing, f"prosg.backends() lacks {sorted(missing)}: {b}"
    for key, kind in DOCUMENTED_KEYS.items():
        assert isinstance(b[key], kind), f"backends()[{key!r}] = {b[key]!r}, expected {kind.__name__}"
    assert b["version"] == prosg.__version__
    assert b["cpu"] is True
    assert b["running_torch"] == torch.__version__
    # cuda_available implies the kernels are there and a device is visible.
    assert b["cuda_available"] == (b["cuda"] and torch.cuda.is_available())
    assert b["cpu_threads"] >= 1


def _parse_info(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(" ")
        if key:
            rows[key] = value.strip()
    return rows


def _check_info_output(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stderr
    rows = _parse_info(run.stdout)
    expected = prosg.backends()
    for key in DOCUMENTED_KEYS:
        assert key in rows, f"`info` does not print {key}:\n{run.stdout}"
    # The values printed are those of backends() (cpu_threads may differ in a subprocess).
    for key in ("version", "cuda", "cuda_archs", "built_with_torch", "openmp"):
        assert rows[key] == str(expected[key]), f"{key}: printed {rows[key]!r}, backends() has {expected[key]!r}"


def test_python_m_prosg_info():
    run = subprocess.run([sys.executable, "-m", "prosg", "info"], capture_output=True, text=True, timeout=120)
    _check_info_output(run)


def _console_script() -> str | None:
    # The script pip installed beside this interpreter, else one on PATH.
    beside = Path(sys.executable).parent / "prosg"
    return str(beside) if beside.exists() else shutil.which("prosg")


def test_console_script_info():
    script = _console_script()
    if script is None:
        pytest.skip("the `prosg` console script is not installed (pip install the package)")
    run = subprocess.run([script, "info"], capture_output=True, text=True, timeout=120)
    _check_info_output(run)


def test_cli_without_command_fails_with_usage():
    run = subprocess.run([sys.executable, "-m", "prosg"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "usage: prosg" in run.stderr
    assert "info" in run.stderr


def test_config_flags_come_from_the_config_dataclasses():
    """Every GeneratorConfig field and TrainConfig's training fields have a `prosg
    train` flag whose default is the field's, and help from the field's metadata:
    one source, so the CLI cannot drift from the configs (heads had no flag; the
    step/lr/batch defaults were written twice)."""
    import argparse
    import dataclasses

    from prosg.method import cli
    from prosg.method.generator import GeneratorConfig
    from prosg.method.train import TrainConfig

    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--out", "x"])
    train_fields = [f for f in dataclasses.fields(TrainConfig) if f.name in cli._TRAIN_FLAGS]
    assert {f.name for f in train_fields} == set(cli._TRAIN_FLAGS)
    for f in [*dataclasses.fields(GeneratorConfig), *train_fields]:
        assert f.metadata.get("help"), f"{f.name} has no help"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(args, f.name)
        assert value == (",".join(default) if isinstance(default, tuple) else default), f.name
    assert cli._generator_fields(args) == GeneratorConfig().to_dict() | {"targets": GeneratorConfig().targets}
    assert parser.parse_args(["train", "--out", "x", "--heads", "2"]).heads == 2
    assert parser.parse_args(["train", "--out", "x", "--no-filler-loss"]).filler_loss is False
