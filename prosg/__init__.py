"""prosg: prompt synthetic gradients for RNN-like language models.

Importing the package loads the compiled kernels (``prosg._C``), which register the
ops under ``torch.ops.prosg``; the Python wrappers with autograd and fake kernels live
in :mod:`prosg.ops`.
"""

from __future__ import annotations

import torch


def _check_cpu_isa() -> None:
    """Fail with a clear message, not SIGILL, when the kernels were built for vector
    instructions this CPU lacks (see PROSG_CPU_ISA in setup.py)."""
    try:
        from prosg._build_config import CPU_ISA
    except ImportError:  # pragma: no cover - a source tree that was never built
        raise ImportError("prosg is not built: run `pip install --no-build-isolation .` in the source tree") from None
    needs = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}.get(CPU_ISA, ())
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        return  # cannot tell (not Linux): trust the build
    missing = [flag for flag in needs if flag not in flags]
    if missing:
        raise ImportError(f"prosg was built with PROSG_CPU_ISA={CPU_ISA} but this CPU lacks {', '.join(missing)}; "
                          "rebuild with PROSG_CPU_ISA=generic (or avx2)")


_check_cpu_isa()

from prosg import _C  # noqa: E402,F401  (registers torch.ops.prosg.*)
from prosg import ops  # noqa: E402,F401

__version__ = "0.1.0"


def backends() -> dict:
    """What this build of prosg holds: kernels compiled in and the torch it was built for."""
    cuda = bool(_C.with_cuda)
    return {
        "version": __version__,
        "cpu": True,
        "cuda": cuda,
        "cuda_archs": _C.cuda_archs if cuda else "",
        "cuda_available": cuda and torch.cuda.is_available(),
        "built_with_torch": _C.torch_version,
        "running_torch": torch.__version__,
        "cpu_isa": _C.cpu_isa,
        "openmp": bool(_C.openmp),
        "cpu_threads": torch.get_num_threads(),
    }




def __getattr__(name: str):
    # The pipeline imports the method (and tqdm, safetensors): loaded on first use, so
    # `import prosg` stays the kernels only.
    if name == "ProSG":
        from prosg.pipeline import ProSG

        return ProSG
    raise AttributeError(f"module 'prosg' has no attribute {name!r}")


__all__ = ["ProSG", "backends", "ops", "__version__"]
