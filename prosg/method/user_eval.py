"""``prosg eval --data``: base model vs ProSG on user (prompt, response) pairs, with no
task verifier: the response-token loss by position in the response (a forgetting curve
for free text: does the delta keep the prompt's effect alive further into the answer),
and optionally a user verifier's score of greedy responses.

Positions are binned by powers of two (``[0, 1), [1, 2), [2, 4), ...``): early tokens
are dense and the tail is sparse. The loss of position ``j`` is the cross-entropy of
response token ``j`` given the prompt and tokens ``< j`` (teacher forcing, the
training objective's per-token terms, :func:`prosg.method.train.response_loss`).

A verifier (``--verifier module:function``) is called as
``function(prompt=str, response=str, reference=str, record=dict)`` with each greedy
response and returns a bool or a number; the report gives each method's mean.
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch

from prosg.data import collate
from prosg.method.train import prefix_state, response_loss


def load_verifier(spec: str):
    """The callable ``module:function`` (checked before any work)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--verifier must be module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"--verifier {spec}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"--verifier {spec}: module {module!r} has no {name!r}") from None
    if not callable(fn):
        raise ValueError(f"--verifier {spec}: {name!r} is not callable")
    try:
        inspect.signature(fn).bind(prompt="", response="", reference="", record={})
    except TypeError as e:
        raise ValueError(f"--verifier {spec}: must accept prompt=, response=, reference=, record= ({e})") from None
    return fn


def _bin(j: int) -> int:
    return 0 if j == 0 else j.bit_length()


def _bins_table(sums: dict[str, list[float]], counts: list[int]) -> list[dict]:
    rows = []
    for b, n in enumerate(counts):
        if not n:
            continue
        lo, hi = (0, 1) if b == 0 else (1 << (b - 1), 1 << b)
        rows.append({"lo": lo, "hi": hi, "tokens": n, **{m: s[b] / n for m, s in sums.items()}})
    return rows


@torch.no_grad()
def evaluate_pairs(model, generator, pairs, tokenizer, *, batch_size: int = 8, verifier=None,
                   max_new_tokens: int = 0, progress: bool = False) -> dict:
    """``{"examples", "loss": {method: mean}, "loss_by_position": [...], "verifier"?}``
    for the methods ``base`` and ``prosg`` (the latter only with a generator)."""
    from tqdm.auto import tqdm

    methods = ["base"] + (["prosg"] if generator is not None else [])
    nbins = 1 + max(_bin(len(p.response_ids) - 1) for p in pairs)
    sums = {m: [0.0] * nbins for m in methods}
    counts = [0] * nbins
    totals = {m: 0.0 for m in methods}
    scores = {m: [] for m in methods}
    ntokens = 0
    for start in tqdm(range(0, len(pairs), batch_size), desc="eval", disable=None if progress else True):
        rows = pairs[start:start + batch_size]
        batch = collate(rows, 0, prompt_padding="right").to(model.device)
        state = prefix_state(model, batch.prompt_ids, batch.prompt_lengths)
        deltas = {"base": None}
        if generator is not None:
            deltas["prosg"] = generator(model, batch.prompt_ids, batch.prompt_mask)
        lengths = batch.response_lengths.tolist()
        for m in methods:
            losses = response_loss(model, batch, deltas[m], state, reduction="none").cpu()  # [B, R]
            for b, n in enumerate(lengths):
                for j in range(n):
                    sums[m][_bin(j)] += float(losses[b, j])
                totals[m] += float(losses[b, :n].sum())
        for n in lengths:
            for j in range(n):
                counts[_bin(j)] += 1
        ntokens += sum(lengths)
        if verifier is not None:
            from prosg.method.evaluation import generate_responses

            limits = [max_new_tokens or (n + 8) for n in lengths]
            prompts = [p.prompt_ids for p in rows]
            eos = tokenizer.eos_id if tokenizer.eos_id is not None else -1
            for m in methods:
                outs = generate_responses(model, prompts, limits, delta=deltas[m], eos_id=eos)
                for pair, out in zip(rows, outs):
                    if eos in out:
                        out = out[: out.index(eos)]
                    meta = pair.meta or {}
                    value = verifier(prompt=meta.get("prompt", ""), response=tokenizer.decode(out),
                                     reference=meta.get("response", ""), record=meta)
                    if isinstance(value, bool):
                        value = float(value)
                    if not isinstance(value, (int, float)) or not math.isfinite(value):
                        raise ValueError(f"--verifier returned {value!r} for line {meta.get('line')}; expected a "
                                         "bool or a finite number")
                    scores[m].append(float(value))
    report = {"examples": len(pairs), "response_tokens": ntokens,
              "loss": {m: totals[m] / ntokens for m in methods},
              "loss_by_position": _bins_table(sums, counts)}
    if verifier is not None:
        report["verifier"] = {m: sum(s) / len(s) for m, s in scores.items()}
    return report


def format_markdown(report: dict, info: dict) -> str:
    methods = list(report["loss"])
    lines = ["# ProSG on user data: response-token loss by position", ""]
    for k, v in info.items():
        lines.append(f"- {k}: `{v}`")
    lines += ["", f"{report['examples']} examples, {report['response_tokens']} response tokens. Mean loss (nats/token): "
              + ", ".join(f"{m} {report['loss'][m]:.4f}" for m in methods), "",
              "| response positions | tokens | " + " | ".join(methods) + " |", "|---" * (2 + len(methods)) + "|"]
    for row in report["loss_by_position"]:
        lines.append(f"| {row['lo']}-{row['hi'] - 1} | {row['tokens']} | "
                     + " | ".join(f"{row[m]:.4f}" for m in methods) + " |")
    if "verifier" in report:
        lines += ["", "Verifier (mean score of greedy responses): "
                  + ", ".join(f"{m} {v:.4f}" for m, v in report["verifier"].items())]
    return "\n".join(lines) + "\n"
