"""Runs the torch-free C++ tests (CMakeLists.txt, csrc/tests/) through CMake and CTest.

They test the math headers that the CPU and CUDA kernels share, compiled with the host
compiler, and the CUDA kernels themselves executed on the CPU (csrc/tests/cuda_emu:
every launcher against float64 references), with AddressSanitizer and UBSan where the
compiler has them; then that the CUDA kernel suite catches planted defects. Skipped
when CMake or a C++ compiler is missing. Takes about 2 minutes on two cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="not running from a source tree")
def test_native_cpp_tests_pass(tmp_path):
    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("no C++ compiler")
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-DPROSG_WERROR=ON"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    # ASan/UBSan on Linux (gcc and clang ship them there); PROSG_CPP_SANITIZE=0 turns them off.
    sanitize = os.environ.get("PROSG_CPP_SANITIZE", "1" if os.uname().sysname == "Linux" else "0")
    configure.append(f"-DPROSG_SANITIZE={'ON' if sanitize == '1' else 'OFF'}")

    for step in (
        configure,
        ["cmake", "--build", str(build), "--parallel", os.environ.get("MAX_JOBS", "2")],
        ["ctest", "--test-dir", str(build), "--output-on-failure", "--no-tests=error"],
    ):
        run = _run(step, cwd=tmp_path)
        assert run.returncode == 0, f"{' '.join(step)} failed:\n{_tail(run.stdout)}\n{_tail(run.stderr)}"
    assert "100% tests passed" in run.stdout, run.stdout


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="not running from a source tree")
def test_cuda_kernel_suite_catches_planted_defects():
    """The CPU execution of the CUDA kernels bites: an off-by-one read, three skipped
    barriers (lowrank_linear's, wkv7's, rwkv7_step's), a wrong chunk boundary and the
    empty trailing chunk it once found, each
    planted in a copy of the real .cu files, make the emulated suite fail
    (csrc/tests/cuda_emu/mutants.py; about 35 seconds)."""
    run = subprocess.run([sys.executable, str(ROOT / "csrc/tests/cuda_emu/mutants.py")], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "all 6 mutants caught" in run.stdout, run.stdout
