"""``prosg eval`` and ``prosg demo``: compliance of baseline / repeat-prompt / ProSG on
held-out benchmark prompts, written as ``report.json``, ``report.md`` and
``forgetting.png``.

Methods (all greedy, scored by the benchmark's exact verifiers through
:func:`prosg.method.evaluation.evaluate`):

* ``baseline``: the frozen base model on the prompt.
* ``repeat_prompt``: the base model reading the prompt twice
  (:func:`prosg.method.evaluation.repeat_prompt`), a no-training baseline against
  forgetting.
* ``prosg``: the base model with the trained generator's delta, applied from the
  prompt's last token on (the convention training uses too).
* ``true_gradient`` / ``true_gradient_multi``: what ProSG approximates, done for real
  (:mod:`prosg.method.true_gradient`): one (or ``TrueGradientConfig.multi_steps``)
  step(s) against each prompt's own LM-loss gradient, truncated to rank r, applied like
  ProSG's delta; the step size is tuned on seed-0 examples (never a test seed).

Each method's cost is measured beside its scores (``cost`` in the report):
``delta_ms_per_prompt`` (wall time of producing the delta, per prompt: one generator
forward for ProSG, the backward passes and SVDs for the true gradient),
``prompt_tokens`` (mean tokens the model reads before responding; repeat_prompt doubles
them) and ``seconds`` (the whole evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from prosg.data import Example, MultiStageConfig, generate_examples
from prosg.method.evaluation import EvalResult, aggregate, evaluate, format_result, repeat_prompt
from prosg.method.generator import SyntheticGradientGenerator
from prosg.method.true_gradient import TrueGradientConfig, true_gradient_delta_fn, tune_lr
from prosg.method.outputs import atomic_write, atomic_write_text
from prosg.models.protocol import RecurrentLM

log = logging.getLogger("prosg.demo")

METHODS = ("baseline", "repeat_prompt", "prosg", "true_gradient", "true_gradient_multi")
#: What the report shows when no --methods are given.
DEFAULT_METHODS = ("baseline", "repeat_prompt", "prosg")
#: Examples of seed 0 the true gradient's step size is tuned on.
TUNE_EXAMPLES = 64
#: What :func:`write_report` writes: their presence means the folder holds a report.
REPORT_FILES = ("report.json", "report.md", "forgetting.png")


def prosg_delta_fn(model: RecurrentLM, generator: SyntheticGradientGenerator):
    """``evaluate``'s ``delta_fn``: the generator's delta for a (left-padded) prompt batch."""

    @torch.no_grad()
    def delta_fn(batch):
        return generator(model, batch.prompt_ids.to(model.device), batch.prompt_mask.to(model.device))

    return delta_fn


def _timed(delta_fn, cost: dict):
    """``delta_fn`` that adds its wall time and prompt count to ``cost``."""

    def timed(batch):
        t0 = time.perf_counter()
        delta = delta_fn(batch)
        cost["delta_seconds"] += time.perf_counter() - t0
        cost["prompts"] += len(batch)
        return delta

    return timed


def true_gradient_configs(config: TrueGradientConfig, methods: tuple[str, ...]) -> dict[str, TrueGradientConfig]:
    """The config of each true-gradient row in ``methods`` (``true_gradient_multi``: ``multi_steps`` steps)."""
    out = {}
    if "true_gradient" in methods:
        out["true_gradient"] = dataclasses.replace(config, steps=1)
    if "true_gradient_multi" in methods:
        out["true_gradient_multi"] = dataclasses.replace(config, steps=config.multi_steps)
    return out


def tune_true_gradient(model: RecurrentLM, benchmark: MultiStageConfig, configs: dict[str, TrueGradientConfig],
                       n: int = TUNE_EXAMPLES) -> dict[str, dict]:
    """Each true-gradient row's tuned step size (on ``n`` examples of seed 0, the
    training seed) and the scores of every step size tried; a row whose ``lr`` is set
    is kept as it is."""
    tuning = held_out(benchmark, n, 0)
    out = {}
    for name, cfg in configs.items():
        if cfg.lr is not None:
            out[name] = {"lr": cfg.lr, "tuned": False}
            continue
        t0 = time.perf_counter()
        lr, rows = tune_lr(model, tuning, cfg)
        configs[name] = dataclasses.replace(cfg, lr=lr)
        out[name] = {"lr": lr, "tuned": True, "seed": 0, "examples": n, "grid": rows,
                     "seconds": round(time.perf_counter() - t0, 1)}
        log.info("%s: step size %g (last stage %.3f on %d seed-0 examples, %.0f s)", name, lr,
                 max(r["last_stage"] or 0.0 for r in rows), n, time.perf_counter() - t0)
    return out


def run_methods(model: RecurrentLM, examples: list[Example], generator: SyntheticGradientGenerator | None,
                methods: tuple[str, ...] = DEFAULT_METHODS, *, batch_size: int = 32, progress: bool = False,
                true_gradient: dict[str, TrueGradientConfig] | None = None,
                forced_free_form: bool = False) -> dict[str, EvalResult]:
    """Each method's :class:`EvalResult` on ``examples`` (with its ``cost``).
    ``true_gradient``: the config of each true-gradient row (:func:`true_gradient_configs`,
    step sizes set)."""
    if not methods:
        raise ValueError(f"no method to evaluate; choose from {list(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {list(methods)} name one more than once")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if "prosg" in methods and generator is None:
        raise ValueError("method 'prosg' needs a trained generator")
    results = {}
    for name in methods:
        t0 = time.perf_counter()
        kwargs = {}
        cost = {"delta_seconds": 0.0, "prompts": 0}
        if name == "repeat_prompt":
            kwargs["prompt_fn"] = repeat_prompt
        elif name == "prosg":
            generator.eval()
            kwargs["delta_fn"] = _timed(prosg_delta_fn(model, generator), cost)
        elif name.startswith("true_gradient"):
            cfg = (true_gradient or {}).get(name)
            if cfg is None or cfg.lr is None:
                raise ValueError(f"method {name!r} needs its TrueGradientConfig with a step size (tune_true_gradient)")
            kwargs["delta_fn"] = _timed(true_gradient_delta_fn(model, cfg), cost)
        result = evaluate(model, examples, batch_size=batch_size, progress=progress,
                          forced_free_form=forced_free_form, **kwargs)
        result.cost = _cost(result, cost, time.perf_counter() - t0)
        results[name] = result
        log.info("%s: stage compliance %.3f (%.1f s)", name, results[name].overall["compliance"] or 0.0,
                 time.perf_counter() - t0)
    return results


def _cost(result: EvalResult, cost: dict, seconds: float) -> dict:
    from prosg.data.vocab import benchmark_tokenizer

    tok = benchmark_tokenizer()
    prompts = [len(tok.encode(r.model_prompt)) for r in result.records]
    return {"delta_ms_per_prompt": 1000 * cost["delta_seconds"] / cost["prompts"] if cost["prompts"] else 0.0,
            "prompt_tokens": sum(prompts) / len(prompts), "seconds": round(seconds, 2),
            "threads": torch.get_num_threads()}


def run_seeds(model: RecurrentLM, benchmark: MultiStageConfig, seeds: list[int], n: int,
              generator: SyntheticGradientGenerator | None, methods: tuple[str, ...] = DEFAULT_METHODS, *,
              batch_size: int = 32, progress: bool = False, true_gradient: TrueGradientConfig | None = None,
              info: dict | None = None, forced_free_form: bool = False
              ) -> tuple[dict[str, EvalResult], dict[int, dict[str, EvalResult]]]:
    """Each method on ``n`` held-out examples of every benchmark seed in ``seeds`` (the
    same prompts for every method): the results pooled over the seeds, and per seed.
    ``forced_free_form``: rambles are read, not generated
    (:func:`prosg.method.evaluation.forced_free_form_response`). True-gradient rows are tuned first (:func:`tune_true_gradient`; what was chosen goes
    to ``info["true_gradient"]`` when ``info`` is given)."""
    if not seeds:
        raise ValueError("run_seeds: at least one seed is needed")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"run_seeds: n (examples per seed) must be an int >= 1, got {n!r}")
    tg = true_gradient_configs(true_gradient or TrueGradientConfig(), methods)
    if tg:
        tuned = tune_true_gradient(model, benchmark, tg)
        if info is not None:
            info["true_gradient"] = {name: {**dataclasses.asdict(tg[name]), **tuned[name]} for name in tg}
    per_seed = {seed: run_methods(model, held_out(benchmark, n, seed), generator, methods,
                                  batch_size=batch_size, progress=progress, true_gradient=tg,
                                  forced_free_form=forced_free_form) for seed in seeds}
    pooled = {}
    for m in methods:
        pooled[m] = aggregate([r for seed in seeds for r in per_seed[seed][m].records])
        costs = [per_seed[seed][m].cost for seed in seeds]
        pooled[m].cost = {k: sum(c[k] for c in costs) / len(costs) for k in costs[0]}
    return pooled, per_seed


def spread(per_seed: dict[int, dict[str, EvalResult]], method: str) -> dict:
    """Mean and sample standard deviation over seeds of the stage compliance: overall,
    last stage and each stage position (``std`` is None for one seed)."""

    def stats(values: list) -> dict:
        values = [v for v in values if v is not None]
        if not values:
            return {"mean": None, "std": None, "seeds": 0}
        mean = sum(values) / len(values)
        std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None)
        return {"mean": mean, "std": std, "seeds": len(values)}

    results = [r[method] for r in per_seed.values()]
    stages = max(len(r.by_stage) for r in results)
    return {"overall": stats([r.overall["compliance"] for r in results]),
            "last_stage": stats([r.last_stage["compliance"] for r in results]),
            "by_stage": [stats([r.by_stage[k]["compliance"] if k < len(r.by_stage) else None for r in results])
                         for k in range(stages)]}


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _pm(stats: dict) -> str:
    if stats["mean"] is None:
        return "-"
    return _pct(stats["mean"]) + ("" if stats["std"] is None else f" ± {100 * stats['std']:.1f}")


def write_report(out: str | Path, results: dict[str, EvalResult], info: dict,
                 per_seed: dict[int, dict[str, EvalResult]] | None = None) -> dict:
    """Writes ``report.json`` (``methods.<name>.{overall,by_stage,last_stage,by_distance,
    by_op}`` plus ``info``; with ``per_seed``, also ``methods.<name>.seeds`` (each seed's
    summary) and ``methods.<name>.spread`` (mean and std over seeds)), ``report.md`` and
    ``forgetting.png`` (skipped with a warning when matplotlib is missing or fails), each
    atomically; returns the JSON."""
    if not results:
        raise ValueError("write_report: no results to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {**info, "methods": {name: r.summary() for name, r in results.items()}}
    if per_seed:
        for name in results:
            report["methods"][name]["seeds"] = {str(seed): {k: v for k, v in r[name].summary().items()
                                                            if k in ("overall", "by_stage", "last_stage")}
                                                for seed, r in per_seed.items()}
            report["methods"][name]["spread"] = spread(per_seed, name)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")

    names = list(results)
    stages = max((len(r.by_stage) for r in results.values()), default=0)
    lines = ["# ProSG: prompt forgetting on held-out benchmark prompts", ""]
    for key in ("base_model", "generator", "examples_per_seed", "test_seeds"):
        if key in info:
            lines.append(f"- {key}: `{json.dumps(info[key])}`")
    train = info.get("train")
    if train and train.get("last"):
        gen_cfg = train.get("config", {}).get("generator", {})
        lines.append(f"- training: {train['steps']} steps in {train.get('seconds', '?')} s, generator {gen_cfg}; "
                     f"last batch loss {train['last']['loss']:.4f} vs {train['last']['base_loss']:.4f} "
                     "without the delta (full record in report.json)")
    lines += ["", "Stage compliance (exact span) by stage position, all held-out examples together; "
              "`last` = each example's final stage.", "",
              "| method | overall | " + " | ".join(f"stage {k + 1}" for k in range(stages)) + " | last | exact responses |",
              "|---" * (stages + 4) + "|"]
    for name in names:
        r = results[name]
        cells = [_pct(g["compliance"]) for g in r.by_stage] + ["-"] * (stages - len(r.by_stage))
        lines.append(f"| {name} | {_pct(r.overall['compliance'])} | " + " | ".join(cells)
                     + f" | {_pct(r.last_stage['compliance'])} | {_pct(r.overall['exact_response'])} |")
    if per_seed and len(per_seed) > 1:
        lines += ["", f"Stage compliance, mean ± standard deviation over the {len(per_seed)} seeds "
                      f"{sorted(per_seed)}:", "",
                  "| method | overall | " + " | ".join(f"stage {k + 1}" for k in range(stages)) + " | last |",
                  "|---" * (stages + 3) + "|"]
        for name in names:
            sp = report["methods"][name]["spread"]
            cells = [_pm(st) for st in sp["by_stage"]] + ["-"] * (stages - len(sp["by_stage"]))
            lines.append(f"| {name} | {_pm(sp['overall'])} | " + " | ".join(cells) + f" | {_pm(sp['last_stage'])} |")
    if any(r.cost for r in results.values()):
        lines += ["", "Cost per prompt (wall time on this machine, "
                      f"{next(r.cost for r in results.values() if r.cost)['threads']} torch thread(s)):", "",
                  "| method | delta ms / prompt | prompt tokens read | evaluation s |", "|---|---|---|---|"]
        for name in names:
            c = results[name].cost
            if c:
                lines.append(f"| {name} | {c['delta_ms_per_prompt']:.2f} | {c['prompt_tokens']:.1f} | {c['seconds']:.1f} |")
    tg = info.get("true_gradient")
    if tg:
        lines += [""] + [f"- {name}: {cfg['steps']} step(s) of size {cfg['lr']:g}"
                         + (f" (tuned on {cfg['examples']} seed-0 examples)" if cfg.get("tuned") else "")
                         + f", rank {cfg['rank']}" for name, cfg in tg.items()]
    lines += ["", "Token accuracy by stage position:", "",
              "| method | overall | " + " | ".join(f"stage {k + 1}" for k in range(stages)) + " |",
              "|---" * (stages + 2) + "|"]
    for name in names:
        r = results[name]
        cells = [_pct(g["accuracy"]) for g in r.by_stage] + ["-"] * (stages - len(r.by_stage))
        lines.append(f"| {name} | {_pct(r.overall['accuracy'])} | " + " | ".join(cells) + " |")
    for name in names:
        lines += ["", f"## {name}", "", "```", format_result(results[name]), "```"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    spreads = {name: report["methods"][name]["spread"] for name in names} if per_seed and len(per_seed) > 1 else None
    # The plot is optional and comes last: the reports above are the run's result, and
    # nothing after them may fail it (a missing matplotlib, a broken backend).
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        (out / "forgetting.png").unlink(missing_ok=True)  # never leave an earlier run's plot beside this report
        log.warning("matplotlib is not installed: %s not drawn (pip install matplotlib); report.json and report.md "
                    "are written", out / "forgetting.png")
        return report
    try:
        atomic_write(out / "forgetting.png", lambda tmp: plot_forgetting(results, tmp, spreads))
    except Exception as e:  # noqa: BLE001 - see above
        (out / "forgetting.png").unlink(missing_ok=True)
        log.warning("could not draw %s (%s: %s); report.json and report.md are written", out / "forgetting.png",
                    type(e).__name__, e)
    return report


def plot_forgetting(results: dict[str, EvalResult], path: str | Path, spreads: dict[str, dict] | None = None) -> None:
    """Compliance against stage position and against distance from the prompt, one line
    per method; with ``spreads`` (each method's :func:`spread` over several seeds), the
    stage plot shows each stage's per-seed mean with its standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        if spreads is not None:
            stages = [(k + 1, st) for k, st in enumerate(spreads[name]["by_stage"]) if st["mean"] is not None]
            a.errorbar([k for k, _ in stages], [st["mean"] for _, st in stages],
                       yerr=[st["std"] or 0.0 for _, st in stages], marker="o", capsize=3, label=name)
        else:
            xs = [g["stage"] for g in r.by_stage if g["count"]]
            a.plot(xs, [g["compliance"] for g in r.by_stage if g["count"]], marker="o", label=name)
        mids = [(g["lo"] + g["hi"]) / 2 for g in r.by_distance if g["count"]]
        b.plot(mids, [g["accuracy"] for g in r.by_distance if g["count"]], marker="o", label=name)
    a.set_xticks(range(1, 1 + max((len(r.by_stage) for r in results.values()), default=1)))
    a.set(xlabel="stage position", ylabel="stage compliance (exact)", ylim=(0, 1),
          title="Compliance by stage (mean ± std over seeds)" if spreads is not None else "Compliance by stage")
    b.set(xlabel="distance of the stage start from the prompt (tokens)", ylabel="token accuracy",
          title="Accuracy by distance", ylim=(0, 1))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def held_out(benchmark: MultiStageConfig, n: int, seed: int) -> list[Example]:
    return generate_examples(benchmark, n, seed=seed)
