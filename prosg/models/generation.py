"""Batched autoregressive generation for any :class:`prosg.models.protocol.RecurrentLM`.

The prompt is prefilled in one call (logits of the last position only), then every
step advances the whole batch by one token with tensor operations only: per-sample
deltas ride along in the batched kernels, stop tokens are tracked with a mask, and
nothing loops over samples in Python.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from prosg.models.checks import check_count
from prosg.models.protocol import RecurrentState
from prosg.models.state import Delta


class NonFiniteLogitsError(FloatingPointError):
    """Generation met NaN or infinite logits. ``step`` is the 0-based index of the new
    token that was being chosen (step 0 uses the prompt's last logits) and ``rows`` the
    batch rows whose logits were not finite at that step."""

    def __init__(self, message: str, step: int, rows: list[int]):
        super().__init__(message)
        self.step = step
        self.rows = rows


def _real(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, generator=None, device=None) -> None:
    check_count(max_new_tokens, "max_new_tokens")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r} ({type(do_sample).__name__})")
    # Checked whether or not sampling is on: a bad value is a bug in the caller either way.
    temperature = _real(temperature, "temperature")
    if not (math.isfinite(temperature) and temperature > 0):
        hint = "; greedy decoding is do_sample=False (the default)" if temperature == 0 and not do_sample else ""
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}{hint}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    top_p = _real(top_p, "top_p")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if do_sample:
        if generator is not None and device is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {device}; "
                             f"create it with torch.Generator(device={device.type!r})")
    else:
        ignored = [f"{n}={v!r}" for n, v, off in (("temperature", temperature, 1.0), ("top_k", top_k, 0),
                                                  ("top_p", top_p, 1.0)) if v != off]
        if ignored:
            # Greedy decoding ignores them: without a word the caller believes they sample.
            warnings.warn(f"generate: {', '.join(ignored)} have no effect with do_sample=False (greedy decoding)",
                          UserWarning, stacklevel=5)


def _stop_tensor(stop_tokens, vocab_size: int, device: torch.device) -> Tensor | None:
    """The stop tokens as a LongTensor on ``device``. Integers only: a float would be
    truncated to another token by a cast."""
    if stop_tokens is None:
        return None
    if not isinstance(stop_tokens, Tensor) and hasattr(stop_tokens, "__array__"):
        stop_tokens = torch.as_tensor(stop_tokens)  # numpy arrays and scalars
    if isinstance(stop_tokens, Tensor):
        if stop_tokens.is_floating_point() or stop_tokens.is_complex() or stop_tokens.dtype == torch.bool:
            raise ValueError(f"stop_tokens must hold integer token ids, got a {stop_tokens.dtype} tensor")
        if stop_tokens.dim() > 1:
            raise ValueError(f"stop_tokens must be a 0-D or 1-D tensor of token ids, got shape "
                             f"{list(stop_tokens.shape)}")
        stops = stop_tokens.to(torch.long).reshape(-1)
    else:
        listed = isinstance(stop_tokens, (list, tuple, set, frozenset, range))
        items = list(stop_tokens) if listed else [stop_tokens]
        for i, t in enumerate(items):
            if isinstance(t, bool) or not hasattr(type(t), "__index__"):
                raise ValueError(f"stop_tokens{f'[{i}]' if listed else ''} must be an int token id, "
                                 f"got {t!r} ({type(t).__name__})")
        stops = torch.tensor([t.__index__() for t in items], dtype=torch.long)
    if stops.numel() == 0:
        return None
    if bool(((stops < 0) | (stops >= vocab_size)).any()):
        raise ValueError(f"stop_tokens must be token ids in [0, {vocab_size}), got {stops.tolist()}")
    return stops.to(device)


@torch.no_grad()
def prefill(model, input_ids: Tensor, lengths: Tensor | list[int]) -> RecurrentState | None:
    """The state after the first ``lengths[b]`` tokens of each row ``b`` of the
    right-padded ``input_ids [B, P]``, in row order, base weights, no delta, no
    gradient: the model's :meth:`~prosg.models.protocol.RecurrentLM.prefill_rows` for
    the rows of nonzero length (no pad ever changes a state: an RNN's state is changed
    by every token it reads); a row of length 0 gets the empty state. None when every
    length is 0."""
    lengths = lengths.tolist() if isinstance(lengths, Tensor) else list(lengths)
    if len(lengths) != input_ids.shape[0]:
        raise ValueError(f"prefill: {len(lengths)} lengths for {input_ids.shape[0]} rows of input_ids")
    if any(n < 0 or n > input_ids.shape[1] for n in lengths):
        raise ValueError(f"prefill: lengths must be in [0, {input_ids.shape[1]}] (input_ids' width), got {lengths}")
    if all(n == 0 for n in lengths):
        return None
    if all(n > 0 for n in lengths):
        return model.prefill_rows(input_ids, lengths)
    rows = [b for b, n in enumerate(lengths) if n > 0]
    index = torch.tensor(rows, dtype=torch.long, device=model.device)
    filled = model.prefill_rows(input_ids.index_select(0, index), [lengths[b] for b in rows])
    return model.zero_state(len(lengths)).index_copy_(index, filled)


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
                    state: RecurrentState | None = None, do_sample: bool = False, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                    stop_tokens=None) -> Iterator[Tensor]:
    """Yields the ``[B]`` tokens of each of ``max_new_tokens`` steps.

    Arguments are checked here, before the first token is asked for. A sample that has
    emitted a stop token keeps yielding that token; once all samples have stopped no
    more forwards run and the remaining steps yield the stop tokens.

    Non-finite logits (NaN or inf: from NaN weights, state or deltas, or an overflow)
    raise :class:`NonFiniteLogitsError` at the step they appear, naming it and the
    batch rows, before that step's token is yielded: argmax over NaN is token 0, so
    greedy decoding would otherwise emit it forever. The check is one reduction over
    the step's logits (the greedy pick's own maximum); on CUDA reading its result is
    one host synchronisation per step, which :func:`generate` defers to the end.
    """
    return _steps(*_prepare(model, input_ids, max_new_tokens, delta, state, do_sample, temperature, top_k, top_p,
                            generator, stop_tokens), defer_check=False)


def _prepare(model, input_ids, max_new_tokens, delta, state, do_sample, temperature, top_k, top_p, generator,
             stop_tokens):
    _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, generator, model.device)
    carried = model.start_decoding(input_ids, state, delta)
    stops = _stop_tensor(stop_tokens, model.config.vocab_size, model.device)
    pick = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return model, input_ids, max_new_tokens.__index__(), carried, stops, pick


def _nonfinite(step: int, finite: Tensor, max_new_tokens: int, dtype: torch.dtype, late: bool) -> NonFiniteLogitsError:
    rows = (~finite).nonzero().flatten().tolist()
    when = (" (found when generation ended: on CUDA, greedy generate checks once at the end so that the decode "
            "loop needs no host synchronisation)") if late else ""
    return NonFiniteLogitsError(
        f"generation stopped: the logits are NaN or infinite at step {step} (0-based; the choice of new token "
        f"{step + 1} of {max_new_tokens}) for batch rows {rows} of {finite.numel()}{when}. Greedy decoding would "
        f"emit garbage from there on (the argmax of NaN logits is token 0). Look for NaN/inf in the weights, in "
        f"those rows of the state or the delta, or for activations overflowing {dtype}.", step, rows)


def _steps(model, input_ids, max_new_tokens, carried, stops, pick, *, defer_check: bool) -> Iterator[Tensor]:
    if max_new_tokens == 0:
        return
    # no_grad per step, not around the loop: a suspended generator must not leave
    # gradients off in the caller's code between two tokens.
    with torch.no_grad():
        logits, carried = model.decode(input_ids, carried, logits_to_keep=1)
    # Deferred: each step's peak logit is stored on the device and checked once at the
    # end (greedy only: multinomial over NaN must never run).
    peaks = (torch.empty(max_new_tokens, input_ids.shape[0], dtype=logits.dtype, device=logits.device)
             if defer_check and not pick["do_sample"] else None)
    finished = fill = None
    step = 0
    for step in range(max_new_tokens):
        with torch.no_grad():
            last = logits[:, -1]
            # NaN propagates through max and +inf is the max, so a finite peak means a
            # usable row; for greedy decoding the max is the pick itself (argmax's
            # first-index tie rule), so the check adds no pass over the logits.
            if pick["do_sample"]:
                peak, token = last.amax(-1), None
            else:
                peak, token = last.max(-1)
            if peaks is None:
                # B host floats: an order of magnitude cheaper on the CPU than isfinite + all
                # + bool (benchmarks/bench_design.py, RESULTS.md).
                if not all(map(math.isfinite, peak.tolist())):
                    raise _nonfinite(step, torch.isfinite(peak), max_new_tokens, logits.dtype, late=False)
            else:
                peaks[step] = peak
            if token is None:
                token = sample_next(last, **pick)
            if stops is not None:
                if finished is None:
                    finished = torch.zeros_like(token, dtype=torch.bool)
                    fill = token
                token = torch.where(finished, fill, token)
                fill = token
                finished = finished | torch.isin(token, stops)
        yield token
        if step + 1 == max_new_tokens:
            break
        if finished is not None and bool(finished.all()):
            _check_peaks(peaks, step + 1, max_new_tokens, logits.dtype)
            for _ in range(max_new_tokens - step - 1):
                yield fill
            return
        with torch.no_grad():
            logits, carried = model.decode(token.unsqueeze(1), carried)
    _check_peaks(peaks, step + 1, max_new_tokens, logits.dtype)


def _check_peaks(peaks: Tensor | None, steps: int, max_new_tokens: int, dtype: torch.dtype) -> None:
    if peaks is None:
        return
    finite = torch.isfinite(peaks[:steps])
    if not bool(finite.all()):
        step = int((~finite).any(1).nonzero()[0])
        raise _nonfinite(step, finite[step], max_new_tokens, dtype, late=True)


def generate(model, input_ids: Tensor, max_new_tokens: int, delta: Delta | dict | None = None, *,
             state: RecurrentState | None = None, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None, stop_tokens=None) -> Tensor:
    """``[B, T + max_new_tokens]``: the prompt followed by the generated tokens.

    Non-finite logits raise :class:`NonFiniteLogitsError` as in :func:`stream_generate`;
    on CUDA, greedy decoding checks once when generation ends rather than at every step
    (a host synchronisation per token would slow decoding down), so the error comes
    after the remaining steps have run, naming the first bad step; nothing is returned."""
    prepared = _prepare(model, input_ids, max_new_tokens, delta, state, do_sample, temperature, top_k, top_p,
                        generator, stop_tokens)
    steps = _steps(*prepared, defer_check=model.device.type != "cpu")
    batch, prompt = input_ids.shape
    max_new_tokens = prepared[2]
    out = torch.empty(batch, prompt + max_new_tokens, dtype=torch.long, device=input_ids.device)
    out[:, :prompt] = input_ids
    for i, token in enumerate(steps):
        out[:, prompt + i] = token
    return out
