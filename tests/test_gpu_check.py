"""benchmarks/gpu_check.sh on a CPU machine: its dry run (argument parsing, the step
order and time budget, the GPU steps' scripts compiled, the CUDA kernels executed on
the CPU, the summary), and its refusals of bad arguments and of step limits over the
budget. The real run needs a GPU; this keeps the script working between such runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ORDER = ["env", "build", "tests_cuda", "memcheck", "initcheck", "racecheck", "bandwidth", "bench_cuda"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("cmake") is None,
                                reason="needs bash and cmake")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "MAX_JOBS": os.environ.get("MAX_JOBS", "2"), **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=full_env)


def test_dry_run(tmp_path):
    run = _run("--dry-run", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ORDER
    status = {r[0]: r[1] for r in rows}
    assert status["env"] == status["build"] == status["tests_cuda"] == "ok", status
    for name in ORDER[3:]:
        assert status[name] == "skipped (dry run: needs a GPU)", (name, status[name])
    emu = (tmp_path / "tests_cuda.log").read_text()
    assert "0 failed" in emu and "wkv4_forward_every_chunk_boundary" in emu, emu[-2000:]
    assert "[  OK  ] wkv7_every_head_size" in emu, emu[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "dry run" in summary and "**all steps ok**" in summary
    for name in ORDER:
        assert f"| {name} |" in summary


def test_refuses_bad_arguments_and_an_overspent_budget(tmp_path):
    bad = _run("--bogus")
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    two = _run(str(tmp_path / "a"), str(tmp_path / "b"))
    assert two.returncode == 2 and "one OUT_DIR only" in two.stderr
    over = _run("--dry-run", str(tmp_path), env={"GPU_CHECK_BUDGET": "100"})
    assert over.returncode == 2 and "over the budget of 100s" in over.stderr
    assert not (tmp_path / "steps.tsv").exists(), "nothing runs when the limits do not fit"
