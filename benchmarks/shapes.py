"""Named benchmark shapes shared by every ``benchmarks/bench_*.py``.

A shape is one workload: batch B, sequence length T, model width ``dim`` (Din of a
projection, the channel count C of wkv4), output width ``dim_out`` (Dout; defaults to
``dim``) and the rank r of the per-sample perturbations. Benchmarks parametrise over
:func:`selected` shapes, so every op is measured on the same workloads.

Which shapes run: ``--bench-shapes=a,b`` (see ``benchmarks/conftest.py``), else the
``PROSG_BENCH_SHAPES`` environment variable, else :data:`DEFAULT` for the device
(the CUDA defaults are larger: the CPU ones keep a run of every benchmark file within
minutes on a laptop).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seqlen: int
    dim: int
    rank: int
    dim_out: int | None = None

    @property
    def d_out(self) -> int:
        return self.dim if self.dim_out is None else self.dim_out

    def __str__(self) -> str:
        out = "" if self.dim_out is None else f"->{self.dim_out}"
        return f"{self.name}(B={self.batch},T={self.seqlen},D={self.dim}{out},r={self.rank})"


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        # Smoke test of the harness: runs in seconds anywhere.
        Shape("tiny", batch=2, seqlen=64, dim=128, rank=4),
        # Prompt processing (prefill) of a small RWKV-4 (169M: d_model 768).
        Shape("small", batch=4, seqlen=256, dim=768, rank=8),
        Shape("medium", batch=8, seqlen=1024, dim=768, rank=8),
        # One sequence of the medium shape (bench_wkv7: 12 heads of 64 for one sample,
        # too few to fill every core or SM).
        Shape("medium-b1", batch=1, seqlen=1024, dim=768, rank=8),
        # A 1.5B-class width (d_model 2048) with the FFN's 4x up-projection.
        Shape("wide", batch=8, seqlen=512, dim=2048, dim_out=8192, rank=16),
        # Token-by-token generation: many sequences, one token each.
        Shape("decode", batch=64, seqlen=1, dim=768, rank=8),
    ]
}

#: Shapes run by default on each device type.
DEFAULT: dict[str, list[str]] = {
    "cpu": ["small", "decode"],
    "cuda": ["small", "medium", "wide", "decode"],
}


def parse(names: str) -> list[Shape]:
    """``"tiny,decode"`` -> the registered shapes, with a clear error for unknown names."""
    out = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in SHAPES:
            raise ValueError(f"unknown benchmark shape {name!r}; known: {', '.join(SHAPES)}")
        out.append(SHAPES[name])
    return out


def selected(device_type: str, override: str | None = None) -> list[Shape]:
    """Shapes to run on ``device_type`` ("cpu" or "cuda"): ``override`` (a comma-separated
    list, e.g. from ``--bench-shapes``), else ``$PROSG_BENCH_SHAPES``, else the default."""
    names = override or os.environ.get("PROSG_BENCH_SHAPES")
    return parse(names) if names else [SHAPES[n] for n in DEFAULT[device_type]]
