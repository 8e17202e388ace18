"""The markdown tables of docs/results.md for one base model, from the reports that
benchmarks/method_bases.sh writes under OUT:

    python benchmarks/method_tables.py OUT [STAGES]     # STAGES: e.g. 1,8,12,16 (default: all)

OUT/main/report.json (every method on the default generator), OUT/{default,seed1,seed2}/
eval/report.json (three generator initialisation seeds), OUT/ramble_x{1,2,4}/report.json
(rambles 1x, 2x and 4x the setting's, read by the model: --forced-rambles). Compliance in %, mean ± standard deviation over the
test seeds unless a table says otherwise.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def pm(stats: dict) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{100 * stats['mean']:.1f} ± {100 * (stats['std'] or 0.0):.1f}"


def mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main_table(report: dict, shown: list[int] | None = None) -> list[str]:
    methods = report["methods"]
    K = max(len(m["spread"]["by_stage"]) for m in methods.values())
    shown = shown or list(range(1, K + 1))
    lines = ["| method | overall | " + " | ".join(f"stage {k}" for k in shown)
             + " | **last stage** | delta ms / prompt | prompt tokens |", "|---" * (len(shown) + 5) + "|"]
    for name, m in methods.items():
        sp, cost = m["spread"], m.get("cost", {})
        stages = [pm(sp["by_stage"][k - 1]) if k <= len(sp["by_stage"]) else "-" for k in shown]
        lines.append(f"| {name} | {pm(sp['overall'])} | " + " | ".join(stages) + f" | **{pm(sp['last_stage'])}** | "
                     f"{cost.get('delta_ms_per_prompt', 0):.1f} | {cost.get('prompt_tokens', 0):.1f} |")
    tg = report.get("true_gradient") or {}
    notes = [f"{name}: {c['steps']} step(s), step size {c['lr']:g}"
             + (f" (tuned on {c['examples']} seed-0 prompts; grid last-stage %: "
                + ", ".join(f"{g['lr']:g}: {100 * (g['last_stage'] or 0):.1f}" for g in c["grid"]) + ")"
                if c.get("tuned") else "") for name, c in tg.items()]
    return lines + [""] + [f"- {n}" for n in notes]


def gate(report: dict) -> str:
    b = report["methods"]["baseline"]
    first = b["by_stage"][0]["compliance"]
    last = b["last_stage"]["compliance"]
    return (f"Forgetting gate (baseline, {b['overall']['examples']} held-out prompts pooled): first stage "
            f"{100 * first:.1f} % (>= 85), last stage {100 * last:.1f} %, gap {100 * (first - last):.1f} points (>= 30).")


def seeds_table(out: Path) -> list[str]:
    rows = [(n, load(out / n / "eval" / "report.json")) for n in ("default", "seed1", "seed2")]
    rows = [(n, r) for n, r in rows if r is not None]
    if not rows:
        return []
    lines = ["| generator init seed | stage 1 (prosg) | last stage (prosg) | last stage (baseline) | last gain | "
             "stage-1 change |", "|---|---|---|---|---|---|"]
    gains, firsts, lasts, changes = [], [], [], []
    for n, r in rows:
        p, b = r["methods"]["prosg"]["spread"], r["methods"]["baseline"]["spread"]
        gain = p["last_stage"]["mean"] - b["last_stage"]["mean"]
        change = p["by_stage"][0]["mean"] - b["by_stage"][0]["mean"]
        gains.append(gain), changes.append(change)
        firsts.append(p["by_stage"][0]["mean"]), lasts.append(p["last_stage"]["mean"])
        seed = {"default": 0, "seed1": 1, "seed2": 2}[n]
        lines.append(f"| {seed} | {pm(p['by_stage'][0])} | {pm(p['last_stage'])} | {pm(b['last_stage'])} | "
                     f"{100 * gain:+.1f} | {100 * change:+.1f} |")
    if len(rows) > 1:
        lines.append(f"| mean ± std over init seeds | {mean_std(firsts)} | {mean_std(lasts)} | | "
                     f"{mean_std(gains)} | {mean_std(changes)} |")
    return lines


def lengths_table(out: Path, main: dict) -> list[str]:
    runs = [(f"x{k}", load(out / f"ramble_x{k}" / "report.json")) for k in (1, 2, 4)]
    runs = [(k, r) for k, r in runs if r is not None]
    lines = ["Rambles read, not generated (`--forced-rambles`):", "",
             "| ramble | baseline stage 1 | prosg stage 1 | baseline last | prosg last | last gain |",
             "|---|---|---|---|---|---|"]
    for k, r in runs:
        b, p = r["methods"]["baseline"]["spread"], r["methods"]["prosg"]["spread"]
        lines.append(f"| {k} ({r['benchmark']['ramble_length']} tokens) | {pm(b['by_stage'][0])} | "
                     f"{pm(p['by_stage'][0])} | {pm(b['last_stage'])} | {pm(p['last_stage'])} | "
                     f"{100 * (p['last_stage']['mean'] - b['last_stage']['mean']):+.1f} |")
    lines += ["", "Compliance by distance of the stage's start from the prompt (all stages, 600 prompts pooled; "
                  "baseline → prosg, count in brackets):", ""]
    for k, r in runs:
        b, p = r["methods"]["baseline"]["by_distance"], r["methods"]["prosg"]["by_distance"]
        pd = {g["lo"]: g for g in p}
        cells = [f"{g['lo']}–{g['hi'] - 1}: {100 * g['compliance']:.0f} → {100 * pd[g['lo']]['compliance']:.0f} "
                 f"({g['count']})" for g in b if g["lo"] in pd]
        lines.append(f"- ramble {k}: " + "; ".join(cells))
    return lines


def main() -> None:
    out = Path(sys.argv[1])
    # optional: the stage positions to show, e.g. 1,8,12,16 (default: all)
    shown = [int(k) for k in sys.argv[2].split(",")] if len(sys.argv) > 2 else None
    report = load(out / "main" / "report.json")
    if report is not None:
        print(gate(report), "\n")
        print("\n".join(main_table(report, shown)), "\n")
        print("\n".join(lengths_table(out, report)), "\n")
    print("\n".join(seeds_table(out)))


if __name__ == "__main__":
    main()
