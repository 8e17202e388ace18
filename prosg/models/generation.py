"""Batched autoregressive generation for :class:`prosg.models.RWKV4LM`.

The prompt is prefilled in one call (logits of the last position only), then every
step advances the whole batch by one token with tensor operations only: per-sample
deltas ride along in the batched kernels, stop tokens are tracked with a mask, and
nothing loops over samples in Python.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from prosg.models.state import Delta, RWKV4State


def _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")


def _stop_tensor(stop_tokens, vocab_size: int, device: torch.device) -> Tensor | None:
    if stop_tokens is None:
        return None
    stops = torch.as_tensor(stop_tokens, dtype=torch.long).reshape(-1)
    if stops.numel() == 0:
        return None
    if bool(((stops < 0) | (stops >= vocab_size)).any()):
        raise ValueError(f"stop_tokens must be token ids in [0, {vocab_size}), got {stops.tolist()}")
    return stops.to(device)


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """float32 scores ``[B, V]`` after transformers' sampling warpers, in their order:
    temperature, top-k (ties with the k-th score stay), top-p (the smallest set of
    tokens whose probability reaches ``top_p`` stays, and always the most likely one);
    dropped tokens get ``-inf``."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[..., -1] = False
        scores = scores.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scores


def sample_next(logits: Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """The next token ``[B]`` from ``logits [B, V]``: the argmax (first on ties), or a
    draw from the softmax of :func:`filter_logits`."""
    if not do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def stream_generate(model, input_ids: Tensor, max_new_tokens: int, delta: Delta | dict | None = None, *,
                    state: RWKV4State | None = None, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                    stop_tokens=None) -> Iterator[Tensor]:
    """Yields the ``[B]`` tokens of each of ``max_new_tokens`` steps.

    Arguments are checked here, before the first token is asked for. A sample that has
    emitted a stop token keeps yielding that token; once all samples have stopped no
    more forwards run and the remaining steps yield the stop tokens.
    """
    _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    model._check_input_ids(input_ids)
    batch = input_ids.shape[0]
    layers = model._check_state(state, batch)
    deltas = model._resolve_delta(delta, batch)
    stops = _stop_tensor(stop_tokens, model.config.vocab_size, model.device)
    pick = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _steps(model, input_ids, max_new_tokens, layers, deltas, stops, pick)


def _steps(model, input_ids, max_new_tokens, layers, deltas, stops, pick) -> Iterator[Tensor]:
    if max_new_tokens == 0:
        return
    # no_grad per step, not around the loop: a suspended generator must not leave
    # gradients off in the caller's code between two tokens.
    with torch.no_grad():
        logits, layers = model._forward(input_ids, layers, deltas, logits_to_keep=1)
    finished = fill = None
    for step in range(max_new_tokens):
        with torch.no_grad():
            token = sample_next(logits[:, -1], **pick)
            if stops is not None:
                if finished is None:
                    finished = torch.zeros_like(token, dtype=torch.bool)
                    fill = token
                token = torch.where(finished, fill, token)
                fill = token
                finished = finished | torch.isin(token, stops)
        yield token
        if step + 1 == max_new_tokens:
            return
        if finished is not None and bool(finished.all()):
            for _ in range(max_new_tokens - step - 1):
                yield fill
            return
        with torch.no_grad():
            logits, layers = model._forward(token.unsqueeze(1), layers, deltas)


def generate(model, input_ids: Tensor, max_new_tokens: int, delta: Delta | dict | None = None, **kwargs) -> Tensor:
    """``[B, T + max_new_tokens]``: the prompt followed by the generated tokens."""
    steps = stream_generate(model, input_ids, max_new_tokens, delta, **kwargs)
    batch, prompt = input_ids.shape
    out = torch.empty(batch, prompt + max_new_tokens, dtype=torch.long, device=input_ids.device)
    out[:, :prompt] = input_ids
    for i, token in enumerate(steps):
        out[:, prompt + i] = token
    return out
