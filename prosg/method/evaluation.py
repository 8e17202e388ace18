"""Compliance of a model on the multi-stage benchmark: greedy responses, exact verifiers.

:func:`evaluate` generates each example's response greedily (batched), scores it with
the benchmark's verifier (:meth:`prosg.data.Example.verify`) and aggregates *stage
compliance* — a stage is compliant when its span is exactly the reference (the
verifier's ``exact``) — per stage position (first to last), per distance of the stage's
start from the prompt's end, per operation, and overall. The per-position and
per-distance tables are the forgetting curve.

Conventions (shared with the ProSG method, see docs/base_model.md):

* **Free-form stages are left out of compliance.** ``ramble`` has no instruction to
  recall (any filler word is correct); it only pushes the later stages out. It is
  still generated and verified (its span must be there for the later spans to be
  counted right) and it is reported under ``by_op``.
* **Prompts of different lengths.** An RWKV state is changed by every token it reads,
  so left-padding prompts to one length would feed pads into the state. Each batch is
  prefilled in groups of equal prompt length (all but the last prompt token), the
  states are gathered back into batch order (the model's state objects), and the
  decode runs batched from there. Examples are sorted by (response, prompt) length
  first, so a batch has few prefill groups and similar decode lengths.
* **Where a delta applies.** ``delta_fn`` gets the batch's prompts and returns a
  per-sample :class:`prosg.models.Delta`; it is applied from the prompt's last token
  (``<sep>``) on, i.e. at every position that predicts a response token, and not
  while the rest of the prompt is read (the delta is a function of the prompt's
  states, which the base model computes).
* **Prompt transforms.** ``prompt_fn(example) -> str`` replaces the text the model
  reads (the verifier still scores against the original prompt). :func:`repeat_prompt`
  is the "repeat the prompt" baseline.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prosg.data.batching import Batch, Collator, TokenizedPair
from prosg.data.multistage import Example, StageScore, Verification, mean_scores
from prosg.data.vocab import STAGE, benchmark_tokenizer
from prosg.models import Delta
from prosg.models.generation import generate, prefill
from prosg.models.protocol import RecurrentLM, RecurrentState

#: Extra tokens allowed beyond each example's reference response length: lets a model
#: that overruns a span still be scored (as wrong) instead of cut mid-way.
DEFAULT_MARGIN = 8

#: Width (tokens) of the distance bins of :attr:`EvalResult.by_distance`.
DEFAULT_DISTANCE_BIN = 32

DeltaFn = Callable[[Batch], "Delta | dict | None"]
PromptFn = Callable[[Example], str]


def repeat_prompt(example: Example) -> str:
    """The "repeat the prompt" baseline: the prompt given twice, verbatim,
    ``<bos> i1 ; .. iK ; <sep> <bos> i1 ; .. iK ; <sep>``, so the instructions are read
    twice and the second copy is closer to the response. The bundled base model is
    trained with this form on every ``repeat_prompt_every``-th example
    (:class:`prosg.method.pretrain.PretrainConfig`), so it is not out of distribution."""
    return f"{example.prompt} {example.prompt}"


def _agg(scores: Sequence[StageScore]) -> dict:
    """The data module's mean scores, with ``compliance`` (the exact rate) first."""
    means = mean_scores(scores)
    return {"count": means["count"], "compliance": means["exact"], "accuracy": means["accuracy"],
            "prefix": means["prefix"], "distance": means["distance"]}


@dataclass
class EvalRecord:
    """One example: the text the model read, what it generated, and its verification."""

    id: str
    prompt: str
    model_prompt: str
    response: str
    verification: Verification

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "model_prompt": self.model_prompt,
                "response": self.response, "verification": self.verification.to_dict()}


@dataclass
class EvalResult:
    """Aggregated compliance (JSON-serialisable through :meth:`to_dict`).

    ``by_stage[k]``: stage position k+1 (first to last) over the examples that have an
    instruction stage there. ``last_stage``: each example's final stage (always an
    instruction stage, the farthest from the prompt). ``by_distance``: stages binned by
    the distance of their start from the prompt's end, ``[lo, hi)``. ``overall``:
    ``compliance`` over every instruction stage, ``exact_response`` (every stage,
    ``<eos>``, nothing extra), ``accuracy``. Each group has ``count``, ``compliance``
    (exact rate), ``accuracy``, ``prefix`` and ``distance`` (means).
    """

    overall: dict
    by_stage: list[dict]
    last_stage: dict
    by_distance: list[dict]
    by_op: dict[str, dict]
    records: list[EvalRecord] = field(repr=False)
    #: What producing the responses cost (set by :func:`prosg.method.demo.run_methods`).
    cost: dict | None = None

    def summary(self) -> dict:
        """Everything but the per-example records."""
        out = {"overall": self.overall, "by_stage": self.by_stage, "last_stage": self.last_stage,
               "by_distance": self.by_distance, "by_op": self.by_op}
        if self.cost is not None:
            out["cost"] = self.cost
        return out

    def to_dict(self) -> dict:
        return {**self.summary(), "records": [r.to_dict() for r in self.records]}


def aggregate(records: Sequence[EvalRecord], *, distance_bin: int = DEFAULT_DISTANCE_BIN) -> EvalResult:
    """The :class:`EvalResult` of already-verified records."""
    if isinstance(distance_bin, bool) or not isinstance(distance_bin, int) or distance_bin < 1:
        raise ValueError(f"distance_bin must be an int >= 1, got {distance_bin!r}")
    recall = [[s for s in r.verification.stages if s.op != "ramble"] for r in records]
    flat = [s for stages in recall for s in stages]
    positions = max((s.index for s in flat), default=-1) + 1
    by_stage = []
    for k in range(positions):
        by_stage.append({"stage": k + 1, **_agg([s for s in flat if s.index == k])})
    last = [r.verification.stages[-1] for r in records if r.verification.stages]
    bins: dict[int, list[StageScore]] = {}
    for s in flat:
        bins.setdefault(s.distance // distance_bin, []).append(s)
    by_distance = [{"lo": b * distance_bin, "hi": (b + 1) * distance_bin, **_agg(bins[b])} for b in sorted(bins)]
    by_op: dict[str, list[StageScore]] = {}
    for r in records:
        for s in r.verification.stages:
            by_op.setdefault(s.op, []).append(s)
    n = len(records)
    overall = {
        "examples": n,
        **_agg(flat),
        "exact_response": sum(r.verification.exact for r in records) / n if n else None,
        "response_accuracy": sum(r.verification.accuracy for r in records) / n if n else None,
    }
    return EvalResult(overall=overall, by_stage=by_stage, last_stage=_agg([s for s in last if s.op != "ramble"]),
                      by_distance=by_distance, by_op={op: _agg(g) for op, g in sorted(by_op.items())},
                      records=list(records))


def _prefill(model: RecurrentLM, prompts: list[list[int]]) -> RecurrentState | None:
    """The state after all but the last token of each prompt, in ``prompts``' order
    (equal-length prompts run as one batch, :func:`prosg.models.generation.prefill`)."""
    width = max(len(p) for p in prompts) - 1
    ids = torch.tensor([p[:-1] + [0] * (width - len(p) + 1) for p in prompts], dtype=torch.long, device=model.device)
    return prefill(model, ids, [len(p) - 1 for p in prompts])


@torch.no_grad()
def generate_responses(model: RecurrentLM, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                       delta: Delta | dict | None = None, eos_id: int | None = None) -> list[list[int]]:
    """Greedy responses (token ids, the ``<eos>`` included when produced) of a batch of
    prompts of any lengths; ``delta`` (batch = len(prompts)) applies from each prompt's
    last token on. ``max_new_tokens`` may be one per prompt (each response is cut there;
    the batch runs to the largest)."""
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_responses: every prompt needs at least one token")
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"generate_responses: {len(limits)} max_new_tokens for {len(prompts)} prompts")
    eos_id = benchmark_tokenizer().eos_id if eos_id is None else eos_id
    state = _prefill(model, prompts)
    last = torch.tensor([[p[-1]] for p in prompts], dtype=torch.long, device=model.device)
    out = generate(model, last, max(limits), delta, state=state, stop_tokens=[eos_id])[:, 1:].tolist()
    responses = []
    for row, limit in zip(out, limits):
        row = row[:limit]
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        responses.append(row)
    return responses


def _row(delta: Delta | dict | None, b: int) -> Delta | None:
    delta = Delta.coerce(delta)
    if delta is None:
        return None
    return Delta({k: (u[b: b + 1], v[b: b + 1]) for k, (u, v) in delta.factors.items()}, delta.scale)


@torch.no_grad()
def forced_free_form_response(model: RecurrentLM, prompt: Sequence[int], example: Example, *,
                              delta: Delta | None = None, margin: int = DEFAULT_MARGIN) -> list[int]:
    """One greedy response in which every free-form (``ramble``) span is *read*, not
    written: the model generates each instruction span up to its ``|`` (at most the
    span's length + ``margin`` tokens), then reads the reference ramble and its ``|`` as
    if it had written them, and goes on. So a stage after a ramble starts exactly the
    ramble's length after the previous one, whatever the model would have rambled: the
    way to put a stage farther from the prompt than any training example did (the
    model's own greedy ramble has the length it learnt, and a repeated filler word drives
    its state to a fixed point). A span that runs to its limit without ``|`` before a
    ramble gets the ``|`` read too, so later spans stay aligned. Untagged examples only; ``delta`` (batch 1) applies from
    the prompt's last token on, as in :func:`evaluate`."""
    if example.tagged:
        raise ValueError("forced_free_form_response: tagged examples are not supported")
    tok = benchmark_tokenizer()
    sep, eos = tok.token_to_id(STAGE), tok.eos_id
    reference = tok.encode(example.response)
    device = model.device
    state = None
    if len(prompt) > 1:
        _, state = model(torch.tensor([list(prompt[:-1])], device=device))
    last = prompt[-1]
    out: list[int] = []
    for k, stage in enumerate(example.stages):
        closing = eos if k == len(example.stages) - 1 else sep
        if stage.op == "ramble":
            forced = reference[stage.distance: stage.distance + stage.length] + [closing]
            if out and last != sep:  # the span before ran to its limit unclosed: close it, so spans stay aligned
                forced = [sep] + forced
            _, state = model(torch.tensor([[last] + forced[:-1]], device=device), state=state, delta=delta)
            out += forced
            last = forced[-1]
            continue
        for _ in range(stage.length + margin):
            logits, state = model(torch.tensor([[last]], device=device), state=state, delta=delta)
            last = int(logits[0, -1].argmax())
            out.append(last)
            if last in (sep, eos):
                break
        if last == eos:
            break
    return out


def evaluate(model: RecurrentLM, examples: Sequence[Example], *, delta_fn: DeltaFn | None = None,
             prompt_fn: PromptFn | None = None, batch_size: int = 32, margin: int = DEFAULT_MARGIN,
             distance_bin: int = DEFAULT_DISTANCE_BIN, progress: bool = False,
             forced_free_form: bool = False) -> EvalResult:
    """Greedy responses of ``model`` to ``examples``, verified and aggregated.

    Args:
        model: a :class:`prosg.models.protocol.RecurrentLM` (e.g. :class:`prosg.models.RWKV4LM`)
            over the benchmark vocabulary (run in eval mode).
        examples: benchmark examples (any config, tagged or not).
        delta_fn: ``delta_fn(prompts) -> Delta`` for each batch: ``prompts`` is a
            :class:`prosg.data.Batch` of the (transformed) prompts, left-padded by the
            benchmark's :class:`Collator` (empty responses; ``meta[i]["id"]`` is the
            example id); the returned delta (batch ``len(prompts)``) applies from each
            prompt's last token on. None: the plain model.
        prompt_fn: ``prompt_fn(example) -> str``, the text the model reads instead of
            ``example.prompt`` (e.g. :func:`repeat_prompt`).
        batch_size: examples generated together.
        margin: tokens allowed beyond each reference response's length.
        distance_bin: width of the ``by_distance`` bins.
        progress: a tqdm bar over the batches.
        forced_free_form: read the reference of every free-form span instead of
            generating it (:func:`forced_free_form_response`; one example at a time).

    Returns:
        :class:`EvalResult`; ``records`` are in ``examples``' order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be an int >= 0, got {margin!r}")
    tok = benchmark_tokenizer()
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"evaluate: the model's vocab_size is {model.config.vocab_size}, "
                         f"smaller than the benchmark's {tok.vocab_size}")
    examples = list(examples)
    if not examples:
        raise ValueError("evaluate: no examples (an empty evaluation scores nothing)")
    texts = [prompt_fn(e) if prompt_fn is not None else e.prompt for e in examples]
    prompts = [tok.encode(t) for t in texts]
    # Reference response length (tokens): each span and its closing '|' / tag / <eos>,
    # plus the leading '#1' of the tagged variant.
    limits = [sum(s.length + 1 for s in e.stages) + int(e.tagged) + margin for e in examples]
    order = sorted(range(len(examples)), key=lambda i: (limits[i], len(prompts[i]), i))
    collator = Collator(tok.pad_id, prompt_padding="left")
    was_training = model.training
    model.eval()
    responses: list[list[int] | None] = [None] * len(examples)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc="evaluate", unit="ex", file=sys.stderr, dynamic_ncols=True,
                   disable=None)  # None: no bar when stderr is not a terminal (logs, CI)
    try:
        for rows in batches:
            delta = None
            if delta_fn is not None:
                batch = collator([TokenizedPair(prompts[i], [], meta={"id": examples[i].id}) for i in rows])
                with torch.no_grad():  # evaluation: no graph through the delta provider
                    delta = delta_fn(batch)
            if forced_free_form:
                out = [forced_free_form_response(model, prompts[i], examples[i], delta=_row(delta, b), margin=margin)
                       for b, i in enumerate(rows)]
            else:
                out = generate_responses(model, [prompts[i] for i in rows], [limits[i] for i in rows],
                                         delta=delta, eos_id=tok.eos_id)
            for i, r in zip(rows, out):
                responses[i] = r
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    records = []
    for e, text, ids in zip(examples, texts, responses):
        response = tok.decode(ids)
        records.append(EvalRecord(e.id, e.prompt, text, response, e.verify(response)))
    return aggregate(records, distance_bin=distance_bin)


def format_result(result: EvalResult) -> str:
    """A plain-text table of the forgetting curve (per stage and per distance)."""

    def pct(x):
        return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"

    lines = [f"examples {result.overall['examples']}: stage compliance {pct(result.overall['compliance'])}, "
             f"exact responses {pct(result.overall['exact_response'])}",
             "stage  count  compliance  accuracy  mean distance"]
    for g in result.by_stage:
        lines.append(f"{g['stage']:>5}  {g['count']:>5}  {pct(g['compliance']):>10}  {pct(g['accuracy']):>8}  "
                     f"{g['distance']:>8.1f}")
    g = result.last_stage
    if g["count"]:
        lines.append(f" last  {g['count']:>5}  {pct(g['compliance']):>10}  {pct(g['accuracy']):>8}  {g['distance']:>8.1f}")
    lines.append("distance   count  compliance  accuracy")
    for g in result.by_distance:
        lines.append(f"{g['lo']:>3}-{g['hi'] - 1:<4}  {g['count']:>5}  {pct(g['compliance']):>10}  {pct(g['accuracy']):>8}")
    return "\n".join(lines)
