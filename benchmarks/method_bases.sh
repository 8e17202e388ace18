#!/usr/bin/env bash
# docs/results.md's tables for one bundled base model, reproducibly:
#
#   bash benchmarks/method_bases.sh ARCH [OUT] [STEPS] [JOBS]     # ARCH: rwkv4 | rwkv7
#
# 1. generators with the default settings from three initialisation seeds (rows
#    default, seed1, seed2 of benchmarks/method_ablation.sh; ONLY adds ablation rows),
#    each trained on benchmark seed 0 and evaluated on 3 x N held-out prompts;
# 2. every method (baseline, repeat_prompt, prosg, true_gradient, true_gradient_multi)
#    on the default generator, with costs;
# 3. the forgetting curve past the training lengths: baseline and prosg reading
#    rambles 1x, 2x and 4x the setting's (--forced-rambles).
# Then prints the tables (benchmarks/method_tables.py). Every run is one CPU thread.
set -euo pipefail
ARCH=${1:?usage: method_bases.sh rwkv4|rwkv7 [OUT] [STEPS] [JOBS]}
OUT=${2:-runs/bases/$ARCH}
STEPS=${3:-2000}
JOBS=${4:-2}
N=${N:-200}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
BASE=bundled:$ARCH N=$N ONLY="default seed1 seed2 ${ONLY:-}" bash "$HERE/method_ablation.sh" "$OUT" "$STEPS" "$JOBS"
G=$OUT/default/generator.safetensors
if [[ ! -f "$OUT/main/report.json" ]]; then
  prosg eval --base "bundled:$ARCH" --generator "$G" --out "$OUT/main" --overwrite --no-progress --n "$N" \
    --seeds 1,2,3 --methods baseline,repeat_prompt,prosg,true_gradient,true_gradient_multi > "$OUT/main.log" 2>&1
fi
RL=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['benchmark']['ramble_length'])" "$OUT/main/report.json")
# The model's own greedy ramble has the length it learnt, whatever the reference's:
# --forced-rambles makes it read the reference ramble, so later stages really start
# 1x, 2x, 4x the setting's ramble length after the stage before.
for k in 1 2 4; do
  if [[ ! -f "$OUT/ramble_x$k/report.json" ]]; then
    prosg eval --base "bundled:$ARCH" --generator "$G" --out "$OUT/ramble_x$k" --overwrite --no-progress \
      --forced-rambles --ramble-length $((RL * k)) --methods baseline,prosg --n "$N" --seeds 1,2,3 \
      > "$OUT/ramble_x$k.log" 2>&1
  fi
done
python "$HERE/method_tables.py" "$OUT" | tee "$OUT/tables.md"
