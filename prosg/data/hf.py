"""User data: JSONL (prompt, response) pairs tokenised with a HF ``tokenizers`` file.

For real RWKV-4 checkpoints (e.g. the Pile models' 20B tokenizer, ``tokenizer.json``),
each line of the data file is an object such as
``{"prompt": "Write a story about Tom ...", "response": " Once upon a time ..."}``.
Prompt and response are tokenised *separately* (the boundary is a token boundary, so
a response's loss never covers a prompt token); give the response its own leading
space if the tokenizer marks word starts with it. No special tokens are added besides
the ``bos_token``/``eos_token`` you name (RWKV-4 Pile models use no BOS and
``<|endoftext|>``, id 0, as EOS).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from prosg.data.batching import TokenizedPair
from prosg.data.jsonl import JSONLError, read_jsonl

if TYPE_CHECKING:
    import tokenizers


def load_tokenizer(tokenizer: str | os.PathLike | tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer``: returned as is, or loaded from a ``tokenizer.json`` path."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # optional dependency: only this loader needs it
        raise ImportError("prosg.data.hf needs the 'tokenizers' package (pip install tokenizers)") from e
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a path or a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    path = Path(tokenizer)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"cannot load tokenizer file {path}: {e}") from None


def _special_id(tok: tokenizers.Tokenizer, token: str | int | None, name: str) -> int | None:
    if token is None:
        return None
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < tok.get_vocab_size():
            raise ValueError(f"{name} id {token} is outside the tokenizer's vocabulary [0, {tok.get_vocab_size()})")
        return token
    index = tok.token_to_id(token)
    if index is None:
        raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
    return index


def _unk_id(tok: tokenizers.Tokenizer) -> int | None:
    """Id of the model's unknown token, if it has one (WordLevel, BPE, WordPiece)."""
    unk = getattr(tok.model, "unk_token", None)
    return tok.token_to_id(unk) if isinstance(unk, str) else None


class PairEncoder:
    """Encodes (prompt, response) texts to a :class:`TokenizedPair`, with limits.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or a path to its JSON file.
        bos_token, eos_token: token (string or id) put before each prompt / after each
            response; None adds nothing.
        max_prompt_len, max_response_len: limits in tokens (special tokens included);
            a longer sequence is an error, never silently cut.
        allow_unk: accept text the tokenizer maps to its unknown token (off: an error
            naming the unknown piece, as the model would read garbage).
    """

    def __init__(
        self,
        tokenizer: str | os.PathLike | tokenizers.Tokenizer,
        *,
        bos_token: str | int | None = None,
        eos_token: str | int | None = None,
        max_prompt_len: int | None = None,
        max_response_len: int | None = None,
        allow_unk: bool = False,
    ) -> None:
        self.tokenizer = load_tokenizer(tokenizer)
        self.bos_id = _special_id(self.tokenizer, bos_token, "bos_token")
        self.eos_id = _special_id(self.tokenizer, eos_token, "eos_token")
        for name, v in (("max_prompt_len", max_prompt_len), ("max_response_len", max_response_len)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")
        self.max_prompt_len = max_prompt_len
        self.max_response_len = max_response_len
        self.allow_unk = allow_unk
        self._unk = _unk_id(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def _encode(self, text: str, what: str) -> list[int]:
        try:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
        except Exception as e:  # e.g. WordLevel without an unk token on an unknown word
            raise ValueError(f"cannot tokenize the {what}: {e}") from None
        if self._unk is not None and not self.allow_unk and self._unk in enc.ids:
            i = enc.ids.index(self._unk)
            start, end = enc.offsets[i]
            raise ValueError(f"unknown token in the {what}: {text[start:end]!r} at character {start} (allow_unk=False)")
        return list(enc.ids)

    def encode(self, prompt: str, response: str | None, meta: dict | None = None) -> TokenizedPair:
        """Token ids of one pair; ``response=None`` gives a prompt-only pair (no EOS)."""
        if not isinstance(prompt, str):
            raise ValueError(f"the prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("empty prompt")
        p = ([self.bos_id] if self.bos_id is not None else []) + self._encode(prompt, "prompt")
        if self.max_prompt_len is not None and len(p) > self.max_prompt_len:
            raise ValueError(f"the prompt has {len(p)} tokens, over max_prompt_len={self.max_prompt_len}")
        r: list[int] = []
        if response is not None:
            if not isinstance(response, str):
                raise ValueError(f"the response must be a string, got {type(response).__name__}")
            if not response.strip():
                raise ValueError("empty response")
            r = self._encode(response, "response") + ([self.eos_id] if self.eos_id is not None else [])
            if self.max_response_len is not None and len(r) > self.max_response_len:
                raise ValueError(f"the response has {len(r)} tokens, over max_response_len={self.max_response_len}")
        return TokenizedPair(p, r, meta=meta)


def load_pairs(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike | tokenizers.Tokenizer | PairEncoder,
    *,
    prompt_key: str = "prompt",
    response_key: str | None = "response",
    **encoder_kwargs,
) -> list[TokenizedPair]:
    """Tokenise a JSONL file of ``{prompt_key: str, response_key: str, ...}`` objects.

    ``tokenizer``: a ``tokenizer.json`` path, a ``tokenizers.Tokenizer`` or a
    :class:`PairEncoder` (then ``encoder_kwargs`` must be empty); ``encoder_kwargs`` go
    to :class:`PairEncoder` (``bos_token``, ``eos_token``, ``max_prompt_len``,
    ``max_response_len``, ``allow_unk``). ``response_key=None`` reads prompts only.
    Each pair's ``meta`` is ``{"line": n}`` plus the line's ``"id"`` if it has one.
    Any bad line (malformed JSON, missing or non-string field, empty prompt, too long,
    unknown token) raises :class:`JSONLError` naming the file and line.
    """
    if isinstance(tokenizer, PairEncoder):
        if encoder_kwargs:
            raise TypeError(f"load_pairs: pass options to the PairEncoder, not here: {sorted(encoder_kwargs)}")
        encoder = tokenizer
    else:
        encoder = PairEncoder(tokenizer, **encoder_kwargs)
    pairs = []
    for lineno, record in read_jsonl(path):
        try:
            pairs.append(_encode_record(encoder, record, prompt_key, response_key, lineno))
        except ValueError as e:
            raise JSONLError(path, lineno, str(e)) from None
    return pairs


def _encode_record(encoder: PairEncoder, record: Mapping, prompt_key: str, response_key: str | None, lineno: int):
    for key in (prompt_key, response_key):
        if key is not None and key not in record:
            raise ValueError(f"missing field {key!r} (fields: {', '.join(sorted(record)) or 'none'})")
    meta = {"line": lineno}
    if "id" in record:
        meta["id"] = record["id"]
    return encoder.encode(record[prompt_key], record[response_key] if response_key is not None else None, meta)
