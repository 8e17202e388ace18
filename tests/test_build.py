"""The build itself: the CPU-only configuration, bad settings, and what the installed
build holds.

The CPU-only build (``PROSG_CUDA=0``) compiles a copy of the sources into a temporary
directory and imports it in a subprocess, so it runs beside whatever build is
installed (CI installs the CUDA one). It takes about a minute on two cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import prosg

ROOT = Path(__file__).resolve().parents[1]

# Everything setup.py reads; build outputs and caches stay behind.
_SOURCE_ITEMS = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "csrc", "bindings", "prosg"]
_IGNORE = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "build", "_build_config.py")


def _copy_sources(dest: Path) -> Path:
    if not (ROOT / "setup.py").exists():
        pytest.skip("not running from a source tree (no setup.py beside tests/)")
    dest.mkdir(parents=True, exist_ok=True)
    for name in _SOURCE_ITEMS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=_IGNORE)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def _build_env(**overrides: str) -> dict:
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", "2")
    env.update(overrides)
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.slow
def test_cpu_only_build_imports_and_runs(tmp_path):
    src = _copy_sources(tmp_path / "src")
    build = _run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", str(tmp_path / "tmp")],
        cwd=src, env=_build_env(PROSG_CUDA="0"), timeout=900,
    )
    assert build.returncode == 0, f"PROSG_CUDA=0 build failed:\n{_tail(build.stdout)}\n{_tail(build.stderr)}"

    # A fresh interpreter that finds the copy first (PYTHONPATH precedes the
    # installed or editable prosg on sys.path).
    check = textwrap.dedent(
        f"""
        import torch, prosg
        from pathlib import Path
        assert Path(prosg.__file__).resolve().is_relative_to(Path({str(src)!r}).resolve()), prosg.__file__
        b = prosg.backends()
        assert b["cuda"] is False and b["cuda_available"] is False and b["cuda_archs"] == "", b
        assert b["cpu"] is True, b
        # No op has a CUDA kernel in this build.
        ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("prosg::")]
        assert "prosg::lowrank_linear" in ops, ops
        for name in ops:
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        # And the CPU kernel computes.
        g = torch.Generator().manual_seed(0)
        x, W, b_ = torch.randn(2, 3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
        U, V = torch.randn(2, 5, 2, generator=g), torch.randn(2, 8, 2, generator=g)
        y = prosg.ops.lowrank_linear(x, W, b_, U, V, 0.5)
        ref = x @ W.T + b_ + 0.5 * (x @ V) @ U.transpose(1, 2)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        print("cpu-only build OK", b["version"])
        """
    )
    env = _build_env(PYTHONPATH=str(src))
    run = _run([sys.executable, "-c", check], cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, f"CPU-only build does not work:\n{run.stdout}\n{run.stderr}"
    assert "cpu-only build OK" in run.stdout


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("PROSG_CUDA", "bogus", "PROSG_CUDA must be auto, 0 or 1, got 'bogus'"),
        ("PROSG_CUDA", "yes", "PROSG_CUDA must be auto, 0 or 1, got 'yes'"),
    ],
)
def test_bad_build_setting_is_rejected(tmp_path, var, value, message):
    # setup.py checks its settings before anything is compiled: this takes seconds.
    src = _copy_sources(tmp_path / "src")
    run = _run([sys.executable, "setup.py", "--version"], cwd=src, env=_build_env(**{var: value}), timeout=300)
    assert run.returncode != 0, f"{var}={value} was accepted:\n{run.stdout}"
    assert message in run.stderr, run.stderr


def _has_cuda_sources(op: str) -> bool:
    """Whether the source tree has CUDA code for ``prosg::<op>`` (csrc/<op>/cuda/; the
    backward op lives with its forward). Outside a source tree every op must have it."""
    name = op.split("::", 1)[1].removesuffix("_backward")
    csrc = ROOT / "csrc"
    if not csrc.is_dir():
        return True
    return any((csrc / name / "cuda").glob("*.c[up]*"))


def test_installed_build_holds_what_was_asked():
    """CI and benchmarks/gpu_check.sh build with PROSG_CUDA=1 and set PROSG_EXPECT_CUDA=1:
    the installed prosg must then carry the CUDA kernels (a silent CPU-only fallback
    would otherwise skip every CUDA check)."""
    expect = os.environ.get("PROSG_EXPECT_CUDA")
    b = prosg.backends()
    if expect is not None:
        assert b["cuda"] is (expect == "1"), f"PROSG_EXPECT_CUDA={expect} but prosg.backends() = {b}"
    ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("prosg::")]
    assert ops, "no prosg ops registered"
    for name in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        if not b["cuda"]:
            assert not has_cuda, f"{name} has a CUDA kernel in a build without CUDA"
        elif _has_cuda_sources(name):
            assert has_cuda, f"{name}: csrc has CUDA sources for it but no CUDA kernel is registered"
    if b["cuda"]:
        assert b["cuda_archs"], b
    assert b["built_with_torch"] == b["running_torch"], (
        f"prosg was built against torch {b['built_with_torch']} but torch {b['running_torch']} is running: rebuild"
    )


@pytest.mark.parametrize("script", [".ci/run", "benchmarks/gpu_check.sh"])
def test_shell_scripts_parse(script):
    """The CI and GPU-check scripts run rarely and unattended: at least keep them parseable,
    with the Python programs they write out (heredocs) compiling."""
    path = ROOT / script
    if not path.exists():
        pytest.skip(f"{script} is not in this tree")
    run = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert os.access(path, os.X_OK), f"{script} is not executable (git update-index --chmod=+x)"
    text = path.read_text()
    # Every quoted heredoc (<<'EOF') in these scripts is a Python program.
    for i, body in enumerate(re.findall(r"<<'EOF'\n(.*?)\nEOF\n", text, re.S)):
        compile(body, f"{script} heredoc {i}", "exec")
