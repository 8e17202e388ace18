"""Collating (prompt ids, response ids) pairs into padded tensors for training and eval.

Layout (``prompt_padding="left"``, the default)::

    input_ids  row b:  [pad .. pad | prompt_b | response_b | pad .. pad]
                        <- P - len(prompt_b) ->            <- R - len(response_b) ->

Every prompt ends at column ``P`` (the longest prompt's length) and every response
starts there, so a prompt's last state and the response's stage boundaries line up
across the batch (stage k of the benchmark starts at the same column in every row
with the same earlier stage lengths). That is the layout a recurrent model wants when
it reads the prompt state at one column for the whole batch (ProSG turns that state
into a weight delta). The price: the model must *skip* the left pads, i.e. leave its
state unchanged where ``attention_mask`` is False, because an RWKV state is changed by
any token it reads, a pad included. HF's ``RwkvModel`` ignores ``attention_mask``;
use ``prompt_padding="right"`` (``[prompt_b | response_b | pad ..]``, nothing before a
real token) for a model that cannot skip, and read per-row positions from
``response_start``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label of positions without loss (``torch.nn.functional.cross_entropy``'s default ignore_index)."""


@dataclass
class TokenizedPair:
    """One example as token ids.

    ``response_stage``: optional stage index of each response token (benchmark data),
    collated into ``Batch.stage_ids``. ``meta``: anything (e.g. the example id), passed
    through to ``Batch.meta``.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_stage: list[int] | None = None
    meta: dict | None = None


@dataclass
class Batch:
    """A padded batch (B rows). Masks are bool, ids int64.

    ``input_ids``/``attention_mask`` [B, T]: prompt then response per row, laid out as
    the module docstring says; ``attention_mask`` marks real tokens.
    ``labels`` [B, T]: the token id where a loss is taken, ``IGNORE_INDEX`` elsewhere,
    *unshifted* (HF convention: logits at t-1 predict labels[t]); response tokens always,
    prompt tokens after the first one when ``train_on_prompt``.
    ``stage_ids`` [B, T] or None: benchmark stage of each response token, -1 elsewhere.
    ``prompt_ids``/``prompt_mask`` [B, P]: prompts alone, padded on ``prompt_padding``'s
    side. ``response_ids``/``response_mask`` [B, R]: responses alone, right-padded.
    ``prompt_lengths``/``response_lengths``/``response_start`` [B]: lengths, and the
    column of ``input_ids`` where each response starts (P in every row when left-padded).
    ``label_weights`` [B, T] float or None: the weight of each label's loss in a
    weighted mean (None: the plain mean; set by the caller, never by collate).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    stage_ids: Tensor | None
    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    prompt_lengths: Tensor
    response_lengths: Tensor
    response_start: Tensor
    prompt_padding: str
    meta: list
    label_weights: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor moved to ``device``."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v
        return Batch(**moved)


def _as_ids(seq, what: str, row: int, vocab_size: int | None) -> list[int]:
    if isinstance(seq, Tensor):
        if seq.dim() != 1 or seq.dtype.is_floating_point or seq.dtype.is_complex:
            raise ValueError(f"row {row}: {what} must be a 1-D integer tensor, got {seq.dtype} {tuple(seq.shape)}")
        seq = seq.tolist()
    ids = list(seq)
    for pos, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise ValueError(f"row {row}: {what}[{pos}] must be an int token id, got {t!r}")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"row {row}: {what}[{pos}] = {t} is not a valid token id (expected {bound})")
    return ids


class Collator:
    """Pads a list of :class:`TokenizedPair` (or ``(prompt_ids, response_ids)`` tuples) into a :class:`Batch`.

    Use as ``DataLoader(pairs, batch_size=..., collate_fn=Collator(pad_id))``.

    Args:
        pad_id: id written at padded positions (never attended to nor trained on, but it
            must be a valid embedding index).
        prompt_padding: ``"left"`` (prompts end at one column; the model must skip pads)
            or ``"right"`` (no pad before a real token); see the module docstring.
        train_on_prompt: also take the loss on prompt tokens (after the first).
        max_prompt_len, max_response_len: raise ValueError on a longer sequence.
        vocab_size: when given, every id must be in ``[0, vocab_size)``.

    An empty prompt is an error (nothing to condition on); an empty response is allowed
    (prompt-only batches for generation).
    """

    def __init__(
        self,
        pad_id: int,
        *,
        prompt_padding: str = "left",
        train_on_prompt: bool = False,
        max_prompt_len: int | None = None,
        max_response_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if prompt_padding not in ("left", "right"):
            raise ValueError(f"Collator: prompt_padding must be 'left' or 'right', got {prompt_padding!r}")
        if not isinstance(pad_id, int) or pad_id < 0 or (vocab_size is not None and pad_id >= vocab_size):
            raise ValueError(f"Collator: pad_id must be a valid token id, got {pad_id!r}")
        for name, v in (("max_prompt_len", max_prompt_len), ("max_response_len", max_response_len), ("vocab_size", vocab_size)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"Collator: {name} must be an int >= 1 or None, got {v!r}")
        self.pad_id = pad_id
        self.prompt_padding = prompt_padding
        self.train_on_prompt = train_on_prompt
        self.max_prompt_len = max_prompt_len
        self.max_response_len = max_response_len
        self.vocab_size = vocab_size

    def __call__(self, pairs: Sequence[TokenizedPair | tuple]) -> Batch:
        if len(pairs) == 0:
            raise ValueError("Collator: empty batch")
        prompts, responses, stages, metas = [], [], [], []
        for b, pair in enumerate(pairs):
            if isinstance(pair, TokenizedPair):
                p, r, st, meta = pair.prompt_ids, pair.response_ids, pair.response_stage, pair.meta
            elif isinstance(pair, (tuple, list)) and len(pair) == 2:
                (p, r), st, meta = pair, None, None
            else:
                raise TypeError(f"Collator: row {b} must be a TokenizedPair or a (prompt_ids, response_ids) pair, got {type(pair).__name__}")
            p = _as_ids(p, "prompt_ids", b, self.vocab_size)
            r = _as_ids(r, "response_ids", b, self.vocab_size)
            where = f"row {b}" + (f" ({meta['id']})" if isinstance(meta, dict) and meta.get("id") else "")
            if not p:
                raise ValueError(f"Collator: {where}: empty prompt")
            if self.max_prompt_len is not None and len(p) > self.max_prompt_len:
                raise ValueError(f"Collator: {where}: prompt has {len(p)} tokens, over max_prompt_len={self.max_prompt_len}")
            if self.max_response_len is not None and len(r) > self.max_response_len:
                raise ValueError(
                    f"Collator: {where}: response has {len(r)} tokens, over max_response_len={self.max_response_len}"
                )
            if st is not None:
                st = list(st)
                if len(st) != len(r):
                    raise ValueError(f"Collator: {where}: response_stage has {len(st)} entries for {len(r)} response tokens")
            prompts.append(p)
            responses.append(r)
            stages.append(st)
            metas.append(meta)

        B = len(prompts)
        P = max(len(p) for p in prompts)
        R = max(len(r) for r in responses)
        left = self.prompt_padding == "left"
        T = P + R if left else max(len(p) + len(r) for p, r in zip(prompts, responses))
        pad = self.pad_id
        with_stages = any(s is not None for s in stages)

        input_ids = torch.full((B, T), pad, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.bool)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        stage_ids = torch.full((B, T), -1, dtype=torch.long) if with_stages else None
        prompt_ids = torch.full((B, P), pad, dtype=torch.long)
        prompt_mask = torch.zeros((B, P), dtype=torch.bool)
        response_ids = torch.full((B, R), pad, dtype=torch.long)
        response_mask = torch.zeros((B, R), dtype=torch.bool)
        starts = []
        for b, (p, r, st) in enumerate(zip(prompts, responses, stages)):
            lp, lr = len(p), len(r)
            p0 = P - lp if left else 0  # first prompt column in input_ids and prompt_ids
            r0 = p0 + lp  # first response column
            starts.append(r0)
            pt, rt = torch.tensor(p, dtype=torch.long), torch.tensor(r, dtype=torch.long)
            input_ids[b, p0:r0] = pt
            input_ids[b, r0 : r0 + lr] = rt
            attention[b, p0 : r0 + lr] = True
            labels[b, r0 : r0 + lr] = rt
            if self.train_on_prompt:
                # Not the first prompt token: nothing real precedes it to predict it from
                # (with left padding the position before it is a pad).
                labels[b, p0 + 1 : r0] = pt[1:]
            if st is not None:
                stage_ids[b, r0 : r0 + lr] = torch.tensor(st, dtype=torch.long)
            prompt_ids[b, p0 : p0 + lp] = pt
            prompt_mask[b, p0 : p0 + lp] = True
            response_ids[b, :lr] = rt
            response_mask[b, :lr] = True

        return Batch(
            input_ids=input_ids,
            attention_mask=attention,
            labels=labels,
            stage_ids=stage_ids,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
            response_lengths=torch.tensor([len(r) for r in responses], dtype=torch.long),
            response_start=torch.tensor(starts, dtype=torch.long),
            prompt_padding=self.prompt_padding,
            meta=metas,
        )


def collate(pairs: Sequence[TokenizedPair | tuple], pad_id: int, **kwargs) -> Batch:
    """One-off form of :class:`Collator`: ``collate(pairs, pad_id, prompt_padding=...)``."""
    return Collator(pad_id, **kwargs)(pairs)
