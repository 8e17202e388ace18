#!/usr/bin/env bash
# The ablations of docs/results.md: ProSG generators on a base model that differ from the
# default in one setting each, trained on benchmark seed 0 (`prosg train`) and evaluated
# on N held-out prompts of each of the seeds 1, 2, 3 (`prosg eval`). `seed1`, `seed2`
# are the default with other generator initialisation seeds (the default row is seed 0).
#
#   BASE=bundled:rwkv7 N=200 bash benchmarks/method_ablation.sh [OUT] [STEPS] [JOBS]
#   # defaults: BASE=bundled (rwkv4), N=200, runs/ablation 2000 2
#
# Every run is one CPU thread; JOBS runs go side by side. Prints the markdown table of
# docs/results.md at the end (also in OUT/table.md). Set ONLY="default rank1" to run a subset.
set -euo pipefail
OUT=${1:-runs/ablation}
STEPS=${2:-2000}
JOBS=${3:-2}
BASE=${BASE:-bundled}
N=${N:-200}
mkdir -p "$OUT"

declare -A FLAGS=(
  [default]=""
  [seed1]="--seed 1"
  [seed2]="--seed 2"
  [rank1]="--rank 1"
  [rank16]="--rank 16"
  [residual_writers]="--targets blocks.*.attention.output,blocks.*.feed_forward.value"
  [last_layer]="--targets blocks.2.*"
  [kv_ffnkey]="--targets blocks.*.attention.key,blocks.*.attention.value,blocks.*.feed_forward.key"
  [no_copy]="--no-copy-tokens"
  [true_input]="--input-mode true"
  [layer_features]="--features layer"
  [no_filler_loss]="--no-filler-loss"
  [span_w10]="--span-start-weight 10"
  [span_w30]="--span-start-weight 30"
  [span_w3]="--span-start-weight 3"
  [span_w10_t1]="--span-start-weight 10 --span-start-tokens 1"
  [span_w10_seed1]="--span-start-weight 10 --seed 1"
  [span_w10_seed2]="--span-start-weight 10 --seed 2"
  [own_half]="--own-context 0.5"
  [own_half_w10]="--own-context 0.5 --span-start-weight 10"
  [own_half_seed1]="--own-context 0.5 --seed 1"
  [own_half_seed2]="--own-context 0.5 --seed 2"
  [previous]="--targets blocks.*.attention.key,blocks.*.attention.value,blocks.*.feed_forward.key --features layer --input-mode true --no-copy-tokens"
)
ORDER=(default rank1 rank16 residual_writers last_layer kv_ffnkey no_copy true_input layer_features no_filler_loss previous)
RUNS=(${ONLY:-${ORDER[@]}})

run_one() {
  local name=$1 flags=$2
  local dir="$OUT/$name"
  if [[ -f "$dir/eval/report.json" ]]; then echo "$name: done already"; return; fi
  local t0=$SECONDS
  # shellcheck disable=SC2086
  # A run killed before its evaluation resumes from its checkpoint; one with none starts over.
  local again=--overwrite
  if [[ -f "$dir/checkpoint.safetensors" ]]; then again=--resume; fi
  prosg train --base "$BASE" --out "$dir" --steps "$STEPS" --no-progress $again $flags > "$dir.train.log" 2>&1
  prosg eval --base "$BASE" --generator "$dir/generator.safetensors" --out "$dir/eval" --overwrite \
    --methods baseline,prosg --n "$N" --seeds 1,2,3 --no-progress > "$dir.eval.log" 2>&1
  echo "$((SECONDS - t0))" > "$dir/seconds"
  echo "$name: $((SECONDS - t0)) s"
}
export -f run_one
export OUT STEPS BASE N
for name in "${RUNS[@]}"; do printf '%s\t%s\n' "$name" "${FLAGS[$name]}"; done |
  xargs -P "$JOBS" -d '\n' -I{} bash -c 'IFS=$'"'"'\t'"'"' read -r n f <<< "{}"; mkdir -p "$OUT/$n"; run_one "$n" "$f"'

python - "$OUT" "${RUNS[@]}" <<'PY' | tee "$OUT/table.md"
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
pct = lambda s: "-" if s["mean"] is None else f"{100 * s['mean']:.1f} ± {100 * (s['std'] or 0):.1f}"
reports = {n: json.loads((out / n / "eval" / "report.json").read_text()) for n in names
           if (out / n / "eval" / "report.json").is_file()}
K = max((len(r["methods"]["prosg"]["spread"]["by_stage"]) for r in reports.values()), default=4)
print("| run | settings | " + " | ".join(f"stage {k + 1}" for k in range(K))
      + " | last stage | baseline last | last gain | stage-1 change | train loss (base) | s |")
print("|---" * (K + 8) + "|")
for n in names:
    rep = out / n / "eval" / "report.json"
    if not rep.is_file():
        print(f"| {n} | (missing) |"); continue
    r = json.loads(rep.read_text())
    p, b = r["methods"]["prosg"]["spread"], r["methods"]["baseline"]["spread"]
    log = [json.loads(l) for l in (out / n / "train_log.jsonl").read_text().splitlines()]
    last = log[-1]
    g = json.loads((out / n / "train_config.json").read_text())
    gen = g["generator"]
    settings = f"r={gen['rank']}, {','.join(t.replace('blocks.', '') for t in gen['targets'])}, V={gen['input_mode']}, " \
               f"features={gen['features']}, copy={gen['copy_tokens']}, filler_loss={g['filler_loss']}"
    stages = " | ".join(pct(s) for s in p["by_stage"][:K]) + " | -" * (K - len(p["by_stage"][:K]))
    gain = 100 * (p["last_stage"]["mean"] - b["last_stage"]["mean"])
    s1 = 100 * (p["by_stage"][0]["mean"] - b["by_stage"][0]["mean"])
    secs = (out / n / "seconds").read_text().strip() if (out / n / "seconds").is_file() else "?"
    print(f"| {n} | {settings} | {stages} | {pct(p['last_stage'])} | {pct(b['last_stage'])} | {gain:+.1f} | {s1:+.1f} | "
          f"{last['loss']:.3f} ({last['base_loss']:.3f}) | {secs} |")
PY
