"""prosg: prompt synthetic gradients for RNN-like language models.

Importing the package loads the compiled kernels (``prosg._C``), which register the
ops under ``torch.ops.prosg``; the Python wrappers with autograd and fake kernels live
in :mod:`prosg.ops`.
"""

from __future__ import annotations

import torch

from prosg import _C  # noqa: F401  (registers torch.ops.prosg.*)
from prosg import ops  # noqa: F401

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
        "openmp": bool(_C.openmp),
        "cpu_threads": torch.get_num_threads(),
    }


__all__ = ["backends", "ops", "__version__"]
