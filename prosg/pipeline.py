"""The user-facing pipeline: ``ProSG.from_pretrained(generator_dir).generate(prompts)``.

For each prompt the pipeline does the method's steps (docs/method.md) and nothing else:
encode the prompt with the tokenizer the generator was trained with, compute the
per-sample delta once from the frozen model's states over the prompt, let the base
model read the prompt but its last token without the delta, then generate from the
last token on with the delta applied (the convention of training and evaluation).
Prompts of different lengths run as one batch, each with its own delta. Only the
:class:`prosg.models.protocol.RecurrentLM` protocol is used, so any architecture that
implements it works.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from prosg.models.generation import generate as _generate
from prosg.models.generation import prefill
from prosg.models.generation import stream_generate as _stream_generate
from prosg.models.state import Delta


def load_base(base=None, *, device=None):
    """A base model: an already built model, a model directory, or None / ``"bundled"``
    / ``"bundled:NAME"`` for a tiny base model bundled with prosg (the demo's;
    :data:`prosg.method.pretrain.BUNDLED_BASES`)."""
    if base is not None and not isinstance(base, (str, Path)):
        return base
    from prosg.method.pretrain import bundled_name, load_base_model

    if bundled_name(base) is not None:
        model = load_base_model(base)[0]
    else:
        from prosg.models.loading import load_model

        model = load_model(base)
    return model.to(device) if device is not None else model


class ProSG:
    """A frozen base model, a trained generator and the tokenizer they share."""

    def __init__(self, model, generator, tokenizer):
        if tokenizer is None:
            raise ValueError("ProSG needs the tokenizer the generator was trained with: the generator directory "
                             "records none (an older prosg run); pass tokenizer=")
        self.model = model.eval()
        self.generator = generator.eval()
        self.tokenizer = tokenizer
        if getattr(tokenizer, "vocab_size", 0) > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the base model only "
                             f"{model.config.vocab_size} rows of embeddings: they do not belong together")

    @classmethod
    def from_pretrained(cls, generator_dir, base=None, *, tokenizer=None, device=None) -> "ProSG":
        """``generator_dir``: written by ``prosg train`` or ``save_pretrained``.
        ``base``: a model, a model directory, or None: the one the directory records it
        was trained from if that path exists, else the bundled base. A generator
        trained on another base is refused (naming what differs). ``tokenizer``: a
        :mod:`prosg.data.text` tokenizer, a name or a file, overriding the recorded one."""
        from prosg.data.text import load_text_tokenizer
        from prosg.method.pretrained import load_pretrained, read_config

        if base is None and Path(generator_dir).is_dir():
            hint = (read_config(generator_dir) or {}).get("base_path")
            if hint and (hint.startswith("bundled") or Path(hint).is_dir()):
                base = hint
        model = load_base(base, device=device)
        generator, _ = load_pretrained(generator_dir, model)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_text_tokenizer(tokenizer)
        return cls(model, generator, tokenizer if tokenizer is not None else generator.tokenizer)

    # ------------------------------------------------------------------ steps

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Right-padded ``[B, P]`` ids and their lengths ``[B]``."""
        ids = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} must be a non-empty string, got {p!r}")
            ids.append(self.tokenizer.encode(p))
            if not ids[-1]:
                raise ValueError(f"prompt {i} encodes to no tokens: {p!r}")
        width = max(len(t) for t in ids)
        out = torch.zeros(len(ids), width, dtype=torch.long)
        for b, t in enumerate(ids):
            out[b, : len(t)] = torch.tensor(t)
        return out.to(self.model.device), torch.tensor([len(t) for t in ids], device=self.model.device)

    @torch.no_grad()
    def delta(self, prompts: str | Sequence[str]) -> Delta:
        """The per-sample delta of each prompt (batch = number of prompts)."""
        ids, lengths = self.encode([prompts] if isinstance(prompts, str) else list(prompts))
        return self._delta(ids, lengths)

    def _delta(self, ids: Tensor, lengths: Tensor) -> Delta:
        mask = torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(1)
        return self.generator(self.model, ids, mask)

    def _prepare(self, prompts, steer: bool):
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            raise ValueError("no prompts to generate from")
        ids, lengths = self.encode(prompts)
        with torch.no_grad():
            delta = self._delta(ids, lengths) if steer else None
            state = prefill(self.model, ids, lengths - 1)  # the prompt but its last token, no delta
        last = ids.gather(1, (lengths - 1).unsqueeze(1))
        return single, last, state, delta

    def _sampling(self, do_sample, temperature, top_k, top_p, seed):
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else None
        return dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                    stop_tokens=stops)

    def _text(self, tokens: list[int]) -> str:
        eos = self.tokenizer.eos_id
        if eos is not None and eos in tokens:
            tokens = tokens[: tokens.index(eos)]
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 steer: bool = True, return_delta: bool = False):
        """The steered continuation of each prompt (a str for a str, a list for a
        list), cut at the tokenizer's end-of-text token. ``steer=False``: the base
        model alone (no delta). ``return_delta``: also return the :class:`Delta`
        (``(texts, delta)``). Sampling options as :func:`prosg.models.generation.generate`."""
        single, last, state, delta = self._prepare(prompts, steer)
        out = _generate(self.model, last, max_new_tokens, delta, state=state,
                        **self._sampling(do_sample, temperature, top_k, top_p, seed))[:, 1:]
        texts = [self._text(row) for row in out.tolist()]
        texts = texts[0] if single else texts
        return (texts, delta) if return_delta else texts

    def stream(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               steer: bool = True) -> Iterator:
        """Yields the new text of every step as it is generated: a str per step for a
        str prompt, else a list of str (one per prompt, "" once a prompt has ended).
        Joined, the pieces are :meth:`generate`'s texts."""
        single, last, state, delta = self._prepare(prompts, steer)
        steps = _stream_generate(self.model, last, max_new_tokens, delta, state=state,
                                 **self._sampling(do_sample, temperature, top_k, top_p, seed))
        tokens = [[] for _ in range(last.shape[0])]
        shown = [""] * len(tokens)
        eos = self.tokenizer.eos_id
        for step in steps:
            pieces = []
            for b, t in enumerate(step.tolist()):
                if not (eos is not None and eos in tokens[b]):
                    tokens[b].append(t)
                text = self._text(tokens[b])
                # a multi-byte character split over tokens decodes to U+FFFD until it is whole
                if text.endswith("\ufffd"):
                    pieces.append("")
                    continue
                pieces.append(text[len(shown[b]):] if text.startswith(shown[b]) else "")
                shown[b] = text if text.startswith(shown[b]) else shown[b]
            yield pieces[0] if single else pieces
        # what was held back (a character never completed)
        rest = [self._text(t)[len(s):] for t, s in zip(tokens, shown)]
        if any(rest):
            yield rest[0] if single else rest


__all__ = ["ProSG", "load_base"]
