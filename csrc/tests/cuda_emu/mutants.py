"""Shows that the CPU execution of the CUDA kernels bites: plants known defects in
copies of the real .cu files, one at a time, and checks that the emulated kernel
suites (test_cuda_kernels, test_cuda_wkv7, test_cuda_rwkv7_step) fail on each.

    python csrc/tests/cuda_emu/mutants.py [--build-dir DIR] [--keep]

The source tree is copied to a temporary directory, configured once with CMake and
built once; each mutant then rewrites one kernel file there, rebuilds (one
translation unit) and runs the tests that cover it. Exit status 0 when every mutant
was caught, 1 when one survived (it is named), 2 when the unmutated suite fails or
a mutation no longer applies (the kernel changed: update the mutant).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once
    mutated: str
    tests: tuple[str, ...]  # cases of `exe` expected to catch it
    exe: str = "test_cuda_kernels"  # the emulated suite that runs them


MUTANTS = (
    Mutant(
        "off-by-one read (expand reads rank + 1 entries of z and U)",
        "csrc/lowrank_linear/cuda/lowrank_linear_kernels.cu",
        "for (long long j = 0; j < p.rank; ++j)\n      acc = lowrank_math::expand_step",
        "for (long long j = 0; j <= p.rank; ++j)\n      acc = lowrank_math::expand_step",
        ("lowrank_shrink_expand",),
    ),
    Mutant(
        "skipped barrier (shrink reads the warps' partial sums before they are all written)",
        "csrc/lowrank_linear/cuda/lowrank_linear_kernels.cu",
        "    __syncthreads();\n    if (threadIdx.x < kRankTile",
        "    if (threadIdx.x < kRankTile",
        ("lowrank_shrink_expand",),
    ),
    Mutant(
        "wrong chunk boundary (the scan advances the state by a full chunk for the last, shorter one)",
        "csrc/wkv4/cuda/wkv4_kernels.cu",
        "const long long len = min(chunk_len, static_cast<long long>(p.seqlen) - i * chunk_len);",
        "const long long len = chunk_len;",
        ("wkv4_forward_every_chunk_boundary",),
    ),
    Mutant(
        "empty trailing chunk (the defect this harness found: the chooser's count unadjusted, "
        "and the launcher's guard against it removed)",
        "csrc/wkv4/cuda/wkv4_kernels.cu",
        "  return chunk_len > 0 ? (seqlen + chunk_len - 1) / chunk_len : 1;",
        "  (void)chunk_len;\n  return chunks;",
        ("wkv4_forward_every_chunk_boundary", "wkv4_backward_segment_boundaries"),
    ),
    Mutant(
        "skipped barrier (wkv7's column phase reads the row phase's sums before every row has written them)",
        "csrc/wkv7/cuda/wkv7_kernels.cu",
        "        __syncthreads();\n        // Column phase",
        "        // Column phase",
        ("wkv7_every_head_size",),
        exe="test_cuda_wkv7",
    ),
    Mutant(
        "skipped barrier (rwkv7_step's block sum lets the next sum overwrite the buffer before every "
        "thread has read this one)",
        "csrc/rwkv7_step/cuda/rwkv7_step_kernels.cu",
        "  const float total = buf[0];\n  __syncthreads();",
        "  const float total = buf[0];",
        ("rwkv7_step_float32",),
        exe="test_cuda_rwkv7_step",
    ),
)
# The empty-chunk mutant also drops the launcher's own check (else it only refuses).
_GUARD = "  if (chunks > 1 && (chunks - 1) * chunk_len >= p.seqlen) return cudaErrorInvalidValue;\n"


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tail(p: subprocess.CompletedProcess, n: int = 25) -> str:
    return "\n".join((p.stdout + p.stderr).splitlines()[-n:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)

    work = args.build_dir or Path(tempfile.mkdtemp(prefix="prosg-mutants-"))
    src, build = work / "src", work / "build"
    try:
        if src.exists():
            shutil.rmtree(src)
        src.mkdir(parents=True)
        shutil.copy2(ROOT / "CMakeLists.txt", src / "CMakeLists.txt")
        shutil.copytree(ROOT / "csrc", src / "csrc")
        configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", "2")
        exes = sorted({m.exe for m in MUTANTS})
        build_cmd = ["cmake", "--build", str(build), "--target", *exes, "--parallel", jobs]
        for step in (configure, build_cmd):
            p = _run(step, work)
            if p.returncode != 0:
                print(f"setup failed: {' '.join(step)}\n{_tail(p)}")
                return 2
        for name in exes:
            cases = sorted({t for m in MUTANTS if m.exe == name for t in m.tests})
            p = _run([str(build / name), *cases], work)
            if p.returncode != 0:
                print(f"the unmutated suite {name} fails:\n{_tail(p)}")
                return 2

        survived = []
        for m in MUTANTS:
            path = src / m.file
            original = path.read_text()
            if original.count(m.original) != 1:
                print(f"mutant '{m.name}': its text occurs {original.count(m.original)} times in {m.file}")
                return 2
            text = original.replace(m.original, m.mutated)
            if "empty trailing chunk" in m.name:
                if text.count(_GUARD) != 1:
                    print(f"mutant '{m.name}': the launcher's guard is not in {m.file}")
                    return 2
                text = text.replace(_GUARD, "")
            path.write_text(text)
            try:
                b = _run(build_cmd, work)
                if b.returncode != 0:
                    print(f"mutant '{m.name}' does not compile:\n{_tail(b)}")
                    return 2
                r = _run([str(build / m.exe), *m.tests], work)
                caught = r.returncode != 0
                first = next((ln for ln in (r.stdout + r.stderr).splitlines() if "FAILED" in ln), "")
                print(f"{'caught  ' if caught else 'SURVIVED'} {m.name}\n         {first[:300]}")
                if not caught:
                    survived.append(m.name)
            finally:
                path.write_text(original)
        if survived:
            print(f"{len(survived)} of {len(MUTANTS)} mutants survived")
            return 1
        print(f"all {len(MUTANTS)} mutants caught")
        return 0
    finally:
        if not args.keep and not args.build_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
