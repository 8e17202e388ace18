"""Build of the ``prosg._C`` extension.

The extension is built with ``torch.utils.cpp_extension`` rather than by driving
torch's CMake package: ``find_package(Torch)`` needs ``CUDA_TOOLKIT_ROOT_DIR``,
``CUDA_nvrtc_LIBRARY``, the CUDA library headers and C++20 spelled out per torch
release, and broke differently between torch 2.11 and 2.14 on our machines.
``cpp_extension`` already knows each release's flags, ABI and arch list.
``CMakeLists.txt`` builds the torch-free parts (the shared math headers) with
C++ tests; see the README.

Environment:
  PROSG_CUDA=auto|0|1   build the CUDA kernels (auto: when nvcc and a CUDA build of
                        torch are present; a visible GPU is not needed)
  TORCH_CUDA_ARCH_LIST  CUDA archs; default: the visible GPU's, else "9.0+PTX"
  MAX_JOBS              parallel compile jobs (honoured by ninja via cpp_extension)
  PROSG_CPU_ISA=auto|avx512|avx2|generic
                        instruction set of the CPU kernels (at::vec::Vectorized picks
                        its registers at compile time in an extension). auto: the
                        widest this machine runs. `import prosg` checks the CPU.
  PROSG_DEBUG=1         -O0 -g
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _is_toolkit(home: Path) -> bool:
    return (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists()


def _find_cuda_home() -> str | None:
    """CUDA_HOME, CUDA_PATH, the nvcc on PATH, or /usr/local/cuda, in that order.

    Each must be a whole toolkit (bin/nvcc and include/cuda_runtime.h): an nvcc on PATH
    may be a wrapper script (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc)
    whose grandparent directory is no toolkit; taking it compiled against the partial
    headers of the nvidia wheels and failed on crt/host_config.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc and _is_toolkit(Path(nvcc).resolve().parent.parent):
        return str(Path(nvcc).resolve().parent.parent)
    if _is_toolkit(Path("/usr/local/cuda")):
        return "/usr/local/cuda"
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    # cpp_extension reads CUDA_HOME once, at import: set it first.
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    mode = os.environ.get("PROSG_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"PROSG_CUDA must be auto, 0 or 1, got {mode!r}")
    have = _cuda_home is not None and torch.version.cuda is not None
    if mode == "1" and not have:
        why = "no nvcc found (set CUDA_HOME)" if _cuda_home is None else (
            f"torch {torch.__version__} is not a CUDA build")
        sys.exit(f"PROSG_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return mode == "1" or (mode == "auto" and have)


def _nvidia_include_dirs() -> list[str]:
    """Headers of the CUDA libraries (cublas, cusparse, ...) that the CUDA build of
    torch installs as ``nvidia-*`` wheels; a bare toolkit may lack them."""
    dirs = []
    for entry in sys.path:
        nvidia = Path(entry, "nvidia")
        if nvidia.is_dir():
            dirs += sorted(str(p) for p in nvidia.glob("*/include") if p.is_dir())
    return dirs


# -march flags and the at::vec capability each CPU instruction set compiles with.
_CPU_ISAS = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"], "AVX512"),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], "AVX2"),
    "generic": ([], None),
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _cpu_isa() -> str:
    """auto: the widest of avx512 / avx2 that this (the building) machine runs, like
    -march=native for the vector width only; `import prosg` refuses to load the build
    on a CPU that lacks it. Set PROSG_CPU_ISA=avx2 (or generic) for a portable build."""
    isa = os.environ.get("PROSG_CPU_ISA", "auto").strip().lower()
    if isa == "auto":
        import platform

        flags = _cpu_flags() if platform.machine().lower() in ("x86_64", "amd64") else set()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isa = "avx512"
        elif {"avx2", "fma"} <= flags:
            isa = "avx2"
        else:
            isa = "generic"
    if isa not in _CPU_ISAS:
        sys.exit(f"PROSG_CPU_ISA must be auto, avx512, avx2 or generic, got {isa!r}")
    return isa


def _write_build_config(isa: str, with_cuda: bool) -> None:
    """prosg/_build_config.py: what `import prosg` checks before loading the kernels."""
    (ROOT / "prosg" / "_build_config.py").write_text(
        "# Written by setup.py at build time.\n"
        f"CPU_ISA = {isa!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )


def _sources(pattern: str) -> list[str]:
    """The extension's sources matching `pattern`; csrc/tests (the torch-free C++ tests
    and the CPU execution of the CUDA kernels, built by CMake) never belongs to it."""
    tests = ROOT / "csrc" / "tests"
    found = (Path(p) for p in glob.glob(str(ROOT / pattern), recursive=True))
    return sorted(os.path.relpath(p, ROOT) for p in found if tests not in p.parents)


def _extension():
    with_cuda = _want_cuda()
    debug = os.environ.get("PROSG_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=fast: ISO C++ mode turns off fusing a * b + c into FMAs; nvcc fuses by default.
    cxx = opt + ["-std=c++20", "-fopenmp", "-ffp-contract=fast", "-fdiagnostics-color=always"]
    isa = _cpu_isa()
    march, capability = _CPU_ISAS[isa]
    cxx += march
    sources = ["bindings/torch_bindings.cpp"] + _sources("csrc/*/*.cpp") + _sources("csrc/**/cpu/*.cpp")
    include_dirs = [str(ROOT / "csrc")]
    macros = [("PROSG_TORCH_VERSION", '"' + torch.__version__ + '"'), ("PROSG_CPU_ISA", f'"{isa}"')]
    if capability:
        macros += [("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)]
    _write_build_config(isa, with_cuda)
    if not with_cuda:
        return CppExtension(
            "prosg._C", sources, include_dirs=include_dirs, define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Spelled out (cpp_extension would pick the visible GPUs' itself) so that
        # prosg.backends()['cuda_archs'] names the real architectures. Build machines
        # have nvcc but no GPU: target Hopper and keep PTX for newer cards.
        os.environ["TORCH_CUDA_ARCH_LIST"] = _visible_cuda_archs() or "9.0+PTX"
    macros.append(("PROSG_WITH_CUDA", "1"))
    macros.append(("PROSG_CUDA_ARCHS", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"'))
    sources += _sources("csrc/**/cuda/*.cpp") + _sources("csrc/**/cuda/*.cu")
    nvcc = opt + ["-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "prosg._C", sources, include_dirs=include_dirs + _nvidia_include_dirs(),
        define_macros=macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"])


def _visible_cuda_archs() -> str:
    """The compute capabilities of the visible GPUs, e.g. "9.0" or "8.0;9.0"; "" without one."""
    if not torch.cuda.is_available():
        return ""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


setup(
    packages=find_packages(include=["prosg", "prosg.*"]),
    ext_modules=[_extension()],
    # BuildExtension compiles with ninja (and honours MAX_JOBS) when ninja is on PATH.
    cmdclass={"build_ext": BuildExtension},
)
