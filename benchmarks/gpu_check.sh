#!/usr/bin/env bash
# One-shot check of prosg on a machine with a GPU: build, CUDA tests, compute-sanitizer
# (memcheck, initcheck, racecheck), then the card's copy bandwidth and the CUDA
# benchmarks, and a summary.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]      # from the repository root
#
# OUT_DIR defaults to $OUT, else out/gpu_check. It receives one log per step
# (<step>.log), steps.tsv (name, status, exit code, seconds), tests_cuda.xml (JUnit),
# bench.json (pytest-benchmark), bandwidth.json and summary.md.
#
# Made for a lent machine with no package registry and minutes of device time: it
# installs nothing but prosg itself (pip --no-build-isolation --no-deps, against the
# torch already there), needs torch, pytest and pytest-benchmark to be present, and
# triggers no other package's JIT kernel build (no inductor/Triton, no transformers
# CUDA kernel). The extension is built for the visible GPU (TORCH_CUDA_ARCH_LIST is
# unset). Every step runs under `timeout`, a failed step is recorded without stopping
# the later ones, and the step limits add up to the budget (checked before anything
# runs), in the order the results matter: env 15 s, build 150, tests 90, memcheck 45,
# initcheck 30, racecheck 30, bandwidth 20, benchmarks 30, and 10 s for the summary.
#
# --dry-run: everything that can run on a CPU machine, as CI does: argument parsing,
# the step order and budget, the scripts the GPU steps would run (compiled), the CUDA
# kernels executed on the CPU (csrc/tests/cuda_emu, in place of the build and the CUDA
# tests) and the summary; the steps that need a GPU are recorded as skipped.
#
# Environment: GPU_CHECK_BUDGET (s, default 420: the step limits), MAX_JOBS (default
# 16), BENCH_ARGS (extra pytest arguments for the benchmarks; default
# "--benchmark-max-time=0.2"), PYTHON (default: the first of python, python3 that
# imports torch).
set -uo pipefail

DRY_RUN=0
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (use --dry-run, or --help)" >&2; exit 2 ;;
    *)
      if [ -n "$OUT_ARG" ]; then echo "gpu_check.sh: one OUT_DIR only, got '$OUT_ARG' and '$arg'" >&2; exit 2; fi
      OUT_ARG=$arg ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT_ARG:-${OUT:-out/gpu_check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The Python with torch: `python` may be missing, or another interpreter than the one
# torch is installed for.
pick_python() {
  local c
  for c in ${PYTHON:-} python python3; do
    if command -v "$c" > /dev/null 2>&1 && "$c" -c 'import torch' > /dev/null 2>&1; then
      command -v "$c"
      return
    fi
  done
  command -v python3 || command -v python
}
PYTHON=$(pick_python)
BUDGET=${GPU_CHECK_BUDGET:-420}
export MAX_JOBS=${MAX_JOBS:-16}

# The steps in order and their time limits (s); SUMMARY_SECONDS are kept for the summary.
STEP_ORDER=(env build tests_cuda memcheck initcheck racecheck bandwidth bench_cuda)
declare -A STEP_LIMIT=([env]=15 [build]=150 [tests_cuda]=90 [memcheck]=45 [initcheck]=30 [racecheck]=30
                       [bandwidth]=20 [bench_cuda]=30)
SUMMARY_SECONDS=10
total=$SUMMARY_SECONDS
for name in "${STEP_ORDER[@]}"; do total=$((total + STEP_LIMIT[$name])); done
if [ "$total" -gt "$BUDGET" ]; then
  echo "gpu_check.sh: the step limits add up to ${total}s, over the budget of ${BUDGET}s" >&2
  exit 2
fi
echo "=== gpu_check: $PYTHON, budget ${BUDGET}s (limits add up to ${total}s), dry run: $DRY_RUN, results in $OUT"

START=$SECONDS
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\texit\tseconds\n' > "$STEPS"

# run_step NAME COMMAND: runs COMMAND with bash under a timeout of min(the step's
# limit, what is left of the budget less the summary's), logs to $OUT/NAME.log and
# records the outcome.
run_step() {
  local name=$1 cmd=$2
  local max=${STEP_LIMIT[$name]}
  local left=$((BUDGET - (SECONDS - START) - SUMMARY_SECONDS))
  local limit=$((max < left ? max : left))
  local log="$OUT/$name.log"
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped (time budget)\t-\t0\n' "$name" >> "$STEPS"
    echo "=== $name: skipped, the time budget is spent"
    return
  fi
  echo "=== $name (limit ${limit}s): $cmd"
  local t0=$SECONDS rc=0
  timeout -k 10 "$limit" bash -c "$cmd" > "$log" 2>&1 || rc=$?
  local took=$((SECONDS - t0)) status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="timeout (${limit}s)"
  elif [ "$rc" -ne 0 ]; then
    status=FAILED
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" >> "$STEPS"
  echo "--- $name: $status (exit $rc, ${took}s); last lines of $log:"
  tail -n 15 "$log"
}

# skip_step NAME WHY: records a step that does not run.
skip_step() {
  printf '%s\tskipped (%s)\t-\t0\n' "$1" "$2" >> "$STEPS"
  echo "=== $1: skipped ($2)"
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" \
    /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
    /usr/local/cuda-*/bin/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then
      echo "$c"
      return
    fi
  done
}

# Exercises every op forward and backward on CUDA at small, odd sizes (non-multiples
# of the tile widths, strided inputs) so that the sanitizer sees each kernel's edges.
cat > "$OUT/sanitize_ops.py" <<'EOF'
import sys
import traceback

import torch

import prosg
from prosg.ops import lowrank_linear, wkv4, wkv7
from prosg.reference import wkv4_ref, wkv7_ref

# --quick: float32 only (initcheck and racecheck, which cost more per kernel).
quick = "--quick" in sys.argv[1:]

dev = "cuda"
failed = missing = 0


def case(name, fn):
    global failed, missing
    try:
        fn()
        torch.cuda.synchronize()
        print(f"ok       {name}", flush=True)
    except NotImplementedError as e:  # no CUDA kernel registered for this op
        missing += 1
        print(f"MISSING  {name}: {str(e).splitlines()[0]}", flush=True)
    except Exception:
        failed += 1
        print(f"FAILED   {name}", flush=True)
        traceback.print_exc()


def grads(out, tensors):
    loss = sum((o.float() * torch.randn_like(o.float())).sum() for o in out)
    loss.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in tensors)


def lowrank(dtype, B, T, Din, Dout, r, bias, three_d, strided):
    def run():
        x = torch.randn(B, T, Din + strided, device=dev, dtype=dtype)[..., :Din]
        if not three_d:
            x = x[:, 0]
        x.requires_grad_(True)
        W = torch.randn(Dout, Din, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(Dout, device=dev, dtype=dtype, requires_grad=True) if bias else None
        U = torch.randn(B, Dout, r, device=dev, dtype=dtype, requires_grad=True)
        V = torch.randn(B, Din, r, device=dev, dtype=dtype, requires_grad=True)
        y = lowrank_linear(x, W, b, U, V, 0.5)
        grads([y], [t for t in (x, W, b, U, V) if t is not None])
    return run


def wkv(dtype, B, T, C, r, state, lowrank_kv, check_reference=False):
    def run():
        kw = dict(device=dev, dtype=dtype)
        td = torch.randn(C, device=dev, requires_grad=True)
        tf = torch.randn(C, device=dev, requires_grad=True)
        k = torch.randn(B, T, C, **kw, requires_grad=True)
        v = torch.randn(B, T, C, **kw, requires_grad=True)
        s = None
        leaves = [td, tf, k, v]
        if state:
            s = torch.randn(B, 3, C, device=dev)
            s[:, 1].abs_()
            s.requires_grad_(True)
            leaves.append(s)
        klr = vlr = None
        if lowrank_kv:
            kz, ku = torch.randn(B, T, r, **kw, requires_grad=True), torch.randn(B, C, r, **kw, requires_grad=True)
            vz, vu = torch.randn(B, T, r, **kw, requires_grad=True), torch.randn(B, C, r, **kw, requires_grad=True)
            klr, vlr = (kz, ku), (vz, vu)
            leaves += [kz, ku, vz, vu]
        out, state_out = wkv4(td, tf, k, v, s, key_lowrank=klr, value_lowrank=vlr)
        if check_reference:
            # The chunked scan's outputs and final state against the float64 reference
            # (finite is not enough: a wrong chunk boundary gives finite wrong states).
            cpu = lambda t: None if t is None else t.detach().double().cpu()
            lr = lambda p: None if p is None else (cpu(p[0]), cpu(p[1]))
            ref_out, ref_state = wkv4_ref(cpu(td), cpu(tf), cpu(k), cpu(v), cpu(s), lr(klr), lr(vlr))
            tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
            for name, got, want in (("out", out, ref_out), ("state_out", state_out, ref_state)):
                err = (got.double().cpu() - want).abs().max().item() / max(1.0, want.abs().max().item())
                assert err <= tol, f"{name}: relative max error {err:.3g} > {tol}"
        grads([out, state_out], leaves)
    return run


def rwkv7(dtype, B, T, H, N, state, strided=False):
    def run():
        kw = dict(device=dev, dtype=dtype)
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, device=dev), dim=-1)
        x = [torch.randn(B, T, H, N + strided, **kw)[..., :N] / N**0.5 for _ in range(4)]
        x[1] = x[1] * N**0.5 - 2  # w
        leaves = [t.detach().requires_grad_(True) for t in x + [(-kk).to(dtype), (kk * 0.5).to(dtype)]]
        s = torch.randn(B, H, N, N, device=dev, requires_grad=True) if state else None
        out, state_out = wkv7(*leaves, s)
        # Against the float64 reference: finite is not enough for a wrong barrier.
        cpu = lambda t: None if t is None else t.detach().double().cpu()
        ref_out, ref_state = wkv7_ref(*(cpu(t) for t in leaves), cpu(s))
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        for name, got, want in (("out", out, ref_out), ("state_out", state_out, ref_state)):
            err = (got.double().cpu() - want).abs().max().item() / max(1.0, want.abs().max().item())
            assert err <= tol, f"{name}: relative max error {err:.3g} > {tol}"
        grads([out, state_out], leaves + ([s] if state else []))
    return run


def decode_step(dtype, B, H, C, F, r, with_deltas):
    def run():
        kw = dict(device=dev, dtype=dtype)

        def delta(dout, din):
            return (torch.randn(B, dout, r, **kw), torch.randn(B, din, r, **kw)) if with_deltas else None

        x, shift = torch.randn(B, H, **kw), torch.randn(B, H, **kw)
        state = torch.randn(B, 3, C, device=dev)
        state[:, 1].abs_()
        mixes = [torch.rand(1, 1, H, **kw) for _ in range(3)]
        with torch.no_grad():
            out, state_out = prosg.ops.rwkv4_time_mix_step(
                x, shift, state, *mixes, torch.randn(C, device=dev), torch.randn(C, device=dev),
                torch.randn(C, H, **kw), torch.randn(C, H, **kw), torch.randn(C, H, **kw), torch.randn(H, C, **kw),
                deltas=[delta(C, H), delta(C, H), delta(C, H), delta(H, C)])
            ffn = prosg.ops.rwkv4_channel_mix_step(
                x, shift, mixes[0], mixes[1], torch.randn(F, H, **kw), torch.randn(H, H, **kw),
                torch.randn(H, F, **kw), deltas=[delta(F, H), delta(H, H), delta(H, F)])
        assert torch.isfinite(state_out).all() and out.shape == ffn.shape == (B, H)
    return run


print(prosg.backends(), flush=True)
torch.manual_seed(0)
for dtype in (torch.float32,) if quick else (torch.float32, torch.float16, torch.bfloat16):
    n = str(dtype).removeprefix("torch.")
    case(f"lowrank_linear {n} 3d bias", lowrank(dtype, 3, 37, 65, 129, 5, True, True, 0))
    case(f"lowrank_linear {n} 2d strided", lowrank(dtype, 5, 1, 33, 17, 3, False, False, 3))
    case(f"lowrank_linear {n} r=1", lowrank(dtype, 2, 9, 255, 7, 1, True, True, 1))
    case(f"wkv4 {n} plain", wkv(dtype, 2, 33, 67, 0, False, False))
    case(f"wkv4 {n} state+lowrank", wkv(dtype, 3, 65, 131, 4, True, True))
    case(f"wkv4 {n} long (chunked scan)", wkv(dtype, 1, 4099, 37, 2, True, True, check_reference=True))
    case(f"wkv4 {n} short last chunk", wkv(dtype, 1, 2111, 3, 2, True, False, check_reference=True))
    for N in (16, 32, 64, 128):
        case(f"wkv7 {n} N={N}", rwkv7(dtype, 2, 19, 3, N, state=N != 32, strided=N == 64))
    case(f"wkv7 {n} T=40 (3 segments)", rwkv7(dtype, 1, 40, 1, 64, state=True))
    case(f"rwkv4 decode steps {n}", decode_step(dtype, 3, 37, 45, 70, 5, True))
    case(f"rwkv4 decode steps {n} no delta", decode_step(dtype, 1, 64, 64, 256, 1, False))
print(f"{failed} failed, {missing} without a CUDA kernel", flush=True)
sys.exit(1 if failed else 0)
EOF

# Device-to-device copy bandwidth: a 1 GiB copy timed with CUDA events. Each byte is
# read once and written once, so the memory traffic is twice the copy size.
cat > "$OUT/bandwidth.py" <<'EOF'
import json
import sys

import torch

nbytes = 1 << 30
x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
times = []
for _ in range(20):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    y.copy_(x)
    b.record()
    b.synchronize()
    times.append(a.elapsed_time(b) / 1e3)
best, median = min(times), sorted(times)[len(times) // 2]
result = {
    "device": torch.cuda.get_device_name(),
    "copy_bytes": nbytes,
    "best_s": best,
    "median_s": median,
    "traffic_GBps_best": 2 * nbytes / best / 1e9,
    "traffic_GBps_median": 2 * nbytes / median / 1e9,
}
json.dump(result, open(sys.argv[1], "w"), indent=1)
print(json.dumps(result, indent=1))
EOF

run_step env "nvidia-smi || echo 'nvidia-smi: not found or no GPU'; echo; command -v nvcc && nvcc --version; \
  ls -d /usr/local/cuda* 2>/dev/null; $PYTHON -c 'import sys, torch; print(sys.version); \
  print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  torch.cuda.get_device_name() if torch.cuda.is_available() else \"NO CUDA DEVICE\")'; nproc; free -g"

# The build for the visible GPU. --no-deps: nothing to fetch on a machine without a
# registry. Editable, so that `python -m pytest` from the repository root imports the
# built tree. PIP_BREAK_SYSTEM_PACKAGES: the lent machine's Python may be a distribution's
# (PEP 668) and the machine is thrown away after. If pip itself fails before compiling
# (an old setuptools without editable wheels, say), build in place instead: the same
# extension, lacking only the `prosg` console script.
cat > "$OUT/build.sh" <<EOF
set -o pipefail
unset TORCH_CUDA_ARCH_LIST
export PROSG_CUDA=1 PIP_BREAK_SYSTEM_PACKAGES=1
rc=0
$PYTHON -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/pip.log" || rc=\$?
if [ "\$rc" -ne 0 ]; then
  if grep -q "Error compiling objects" "$OUT/pip.log"; then exit "\$rc"; fi
  echo "=== pip failed before compiling: python setup.py build_ext --inplace"
  $PYTHON setup.py build_ext --inplace || exit
fi
$PYTHON -m prosg info
EOF

# The CUDA kernels executed on the CPU (the dry run's stand-in for the build and the
# CUDA tests): the emulated kernel suite and the emulator's own tests, optimised, no
# sanitizers (CI runs them with ASan and UBSan through tests/test_cpp.py).
cat > "$OUT/cuda_emu.sh" <<EOF
set -e
cmake -S . -B "$OUT/cuda_emu_build" -DCMAKE_BUILD_TYPE=Release \$(command -v ninja > /dev/null && echo -G Ninja)
cmake --build "$OUT/cuda_emu_build" --target test_cuda_kernels test_cuda_wkv7 test_cuda_rwkv7_step test_cuda_emu --parallel "$MAX_JOBS"
"$OUT/cuda_emu_build/test_cuda_emu"
"$OUT/cuda_emu_build/test_cuda_kernels"
"$OUT/cuda_emu_build/test_cuda_wkv7"
"$OUT/cuda_emu_build/test_cuda_rwkv7_step"
EOF

SANITIZER=$(find_sanitizer)
# Only prosg's kernels are instrumented and reported (torch's and cuBLAS's would drown
# the report and the time); every prosg kernel lives in namespace prosg::cuda.
SANITIZER_FILTER=""
if [ -n "$SANITIZER" ] && "$SANITIZER" --help 2>/dev/null | grep -q -- '--kernel-name'; then
  SANITIZER_FILTER="--kernel-name kns=prosg"
fi

if [ "$DRY_RUN" -eq 1 ]; then
  run_step build "bash -n '$OUT/build.sh' && $PYTHON -m py_compile '$OUT/sanitize_ops.py' '$OUT/bandwidth.py' \
    && echo 'dry run: build.sh parses; sanitize_ops.py and bandwidth.py compile'"
  run_step tests_cuda "echo 'dry run: the CUDA kernels executed on the CPU'; bash '$OUT/cuda_emu.sh'"
  for name in memcheck initcheck racecheck bandwidth bench_cuda; do skip_step "$name" "dry run: needs a GPU"; done
else
  run_step build "bash '$OUT/build.sh'"
  # Not the inductor cases (marker jit): they compile Triton kernels, minutes of JIT.
  run_step tests_cuda "export PROSG_EXPECT_CUDA=1; \
    $PYTHON -m pytest tests -q -m 'cuda and not jit' --junitxml='$OUT/tests_cuda.xml' && \
    $PYTHON -m pytest -q tests/test_build.py::test_installed_build_holds_what_was_asked"
  if [ -n "$SANITIZER" ]; then
    # No caching allocator under memcheck and initcheck: an access that lands inside a
    # cached block, or reads one left uninitialised, would go unseen.
    run_step memcheck "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SANITIZER' --tool memcheck $SANITIZER_FILTER \
      --error-exitcode 99 --print-limit 20 $PYTHON '$OUT/sanitize_ops.py'"
    run_step initcheck "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SANITIZER' --tool initcheck $SANITIZER_FILTER \
      --error-exitcode 99 --print-limit 20 $PYTHON '$OUT/sanitize_ops.py' --quick"
    run_step racecheck "'$SANITIZER' --tool racecheck $SANITIZER_FILTER --racecheck-report hazard \
      --error-exitcode 99 --print-limit 20 $PYTHON '$OUT/sanitize_ops.py' --quick"
  else
    for name in memcheck initcheck racecheck; do skip_step "$name" "no compute-sanitizer"; done
  fi
  run_step bandwidth "$PYTHON '$OUT/bandwidth.py' '$OUT/bandwidth.json'"
  run_step bench_cuda "$PYTHON -m pytest benchmarks -q --bench-devices=cuda \
    --benchmark-json='$OUT/bench.json' --benchmark-columns=min,median,mean,stddev,rounds \
    ${BENCH_ARGS:---benchmark-max-time=0.2}"
fi

# The summary: steps, the card, bandwidth, test counts, benchmark medians.
$PYTHON - "$OUT" "$((SECONDS - START))" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

out, total = Path(sys.argv[1]), int(sys.argv[2])
lines = ["# prosg GPU check", ""]
env = (out / "env.log").read_text(errors="replace").splitlines() if (out / "env.log").exists() else []
torch_line = next((l for l in env if l.startswith("torch ")), "torch: unknown")
dry = any("dry run" in (out / f"{n}.log").read_text(errors="replace")[:200]
          for n in ("build",) if (out / f"{n}.log").exists())
lines += [f"- {torch_line}", f"- total: {total} s" + (" (dry run: no GPU steps)" if dry else ""), ""]

lines += ["## Steps", "", "| step | status | exit | seconds |", "| --- | --- | --- | --- |"]
rows = [l.split("\t") for l in (out / "steps.tsv").read_text().splitlines()[1:] if l]
lines += [f"| {' | '.join(r)} |" for r in rows]
failed = [r[0] for r in rows if r[1] == "FAILED" or r[1].startswith("timeout")]
skipped = [r[0] for r in rows if r[1].startswith("skipped")]
verdict = "all steps ok" if not failed else "FAILED: " + ", ".join(failed)
lines += ["", f"**{verdict}**" + (f" (skipped: {', '.join(skipped)})" if skipped else ""), ""]

bw = out / "bandwidth.json"
if bw.exists():
    b = json.loads(bw.read_text())
    lines += ["## Copy bandwidth", "",
              f"{b['device']}: 1 GiB device-to-device copy, read+write traffic "
              f"{b['traffic_GBps_best']:.0f} GB/s best, {b['traffic_GBps_median']:.0f} GB/s median "
              f"({b['best_s'] * 1e3:.3f} ms best).", ""]

xml = out / "tests_cuda.xml"
if xml.exists():
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = suite.attrib
    lines += ["## CUDA tests", "",
              f"{a.get('tests')} tests: {a.get('failures')} failures, {a.get('errors')} errors, "
              f"{a.get('skipped')} skipped ({float(a.get('time', 0)):.1f} s).", ""]
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    lines += [f"- FAILED {n}" for n in bad[:30]] + ([""] if bad else [])

bench = out / "bench.json"
if bench.exists():
    data = json.loads(bench.read_text())
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        impl = b.get("extra_info", {}).get("impl", b["name"])
        groups[b.get("group") or b["name"]][impl] = b["stats"]["median"]
    lines += ["## CUDA benchmarks (median, us)", "", "| group | " + "implementations (median us; ratio to prosg) |",
              "| --- | --- |"]
    for g, impls in groups.items():
        base = impls.get("prosg")
        cells = []
        for k, v in impls.items():
            ratio = f"; {v / base:.2f}x" if base and k != "prosg" else ""
            cells.append(f"{k} {v * 1e6:.1f}{ratio}")
        lines.append(f"| {g} | {', '.join(cells)} |")
    lines.append("")

for tool in ("memcheck", "initcheck", "racecheck"):
    log = out / f"{tool}.log"
    if log.exists():
        tail = [l for l in log.read_text(errors="replace").splitlines() if "ERROR SUMMARY" in l or "failed," in l]
        lines += [f"## {tool}", "", *[f"    {l}" for l in tail[-3:]], ""]

(out / "summary.md").write_text("\n".join(lines))
print("\n".join(lines))
EOF

echo "=== gpu_check done in $((SECONDS - START))s; results in $OUT"
# The exit status says whether every step passed.
! grep -qP '\t(FAILED|timeout)' "$STEPS"
