"""Text tokenizers for user data and generation, behind one small interface.

Three kinds, each with a *spec* (a JSON dict) that a generator checkpoint records so
that the pipeline reads and writes text exactly as training did:

* ``benchmark``: the multi-stage benchmark's fixed vocabulary (:mod:`prosg.data.vocab`).
* ``tokenizers``: a HF ``tokenizers`` file (``tokenizer.json``), e.g. the 20B tokenizer of
  the RWKV-4 Pile models; the file is copied into the generator directory.
* ``rwkv-world``: the RWKV World tokenizer of the RWKV-5/6/7 models, through the
  ``rwkv`` package's ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` and the
  ``rwkv_vocab_v20230424.txt`` it bundles. That is BlinkDL's own reference
  implementation (the one ChatRWKV and the RWKV-7 reference code use), so its ids are
  the models' by definition; a re-implementation would be one more thing to keep in
  step with it. The vocabulary's sha256 is recorded and checked on load.

User data (:func:`load_text_pairs`): JSONL lines ``{"prompt": str, "response": str}``;
any bad line is a :class:`prosg.data.JSONLError` naming the file and the line, raised
before anything is trained or written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable

from prosg.data.batching import TokenizedPair
from prosg.data.jsonl import JSONLError, read_jsonl

#: The names ``--tokenizer`` accepts besides a file.
NAMES = ("benchmark", "rwkv-world")
TRUNCATE = ("error", "response")


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@runtime_checkable
class TextTokenizer(Protocol):
    """What training, evaluation and generation need from a tokenizer."""

    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def spec(self) -> dict: ...

    def save(self, directory: Path) -> None:
        """Copies what :func:`tokenizer_from_spec` needs into ``directory``."""
        ...


class BenchmarkTokenizer:
    """The benchmark's whitespace tokenizer (prompts carry their own ``<bos>``/``<sep>``)."""

    def __init__(self):
        from prosg.data.vocab import benchmark_tokenizer

        self._tok = benchmark_tokenizer()
        self.vocab_size = self._tok.vocab_size
        self.eos_id = self._tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def spec(self) -> dict:
        return {"kind": "benchmark", "vocab_size": self.vocab_size}

    def save(self, directory: Path) -> None:
        pass


class HFTokenizer:
    """A ``tokenizers`` JSON file; no special tokens are added (RWKV-4 Pile models read
    none), ``eos_token`` (default ``<|endoftext|>`` where the vocabulary has it) ends
    each training response."""

    FILE = "tokenizer.json"

    def __init__(self, path: str | os.PathLike, eos_token: str | None = "auto"):
        from prosg.data.hf import load_tokenizer

        self.path = Path(path)
        self._tok = load_tokenizer(self.path)
        self.vocab_size = self._tok.get_vocab_size()
        from prosg.data.hf import _unk_id

        self._unk = _unk_id(self._tok)
        if eos_token == "auto":
            eos_token = "<|endoftext|>" if self._tok.token_to_id("<|endoftext|>") is not None else None
        self.eos_token = eos_token
        self.eos_id = None
        if eos_token is not None:
            self.eos_id = self._tok.token_to_id(eos_token)
            if self.eos_id is None:
                raise ValueError(f"--eos-token {eos_token!r} is not in the vocabulary of {self.path}")

    def encode(self, text: str) -> list[int]:
        enc = self._tok.encode(text, add_special_tokens=False)
        if self._unk is not None and self._unk in enc.ids:
            # the model would read garbage where the text has a piece the vocabulary lacks
            start, end = enc.offsets[enc.ids.index(self._unk)]
            raise ValueError(f"unknown token {text[start:end]!r} at character {start} (not in {self.path.name})")
        return list(enc.ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def spec(self) -> dict:
        return {"kind": "tokenizers", "file": self.FILE, "sha256": _sha256(self.path), "eos_token": self.eos_token,
                "vocab_size": self.vocab_size}

    def save(self, directory: Path) -> None:
        target = Path(directory) / self.FILE
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)


class WorldTokenizer:
    """The RWKV World tokenizer (``rwkv`` package); end of text is token 0."""

    VOCAB = "rwkv_vocab_v20230424.txt"

    def __init__(self):
        try:
            from rwkv import rwkv_tokenizer
        except ImportError as e:
            raise ImportError("--tokenizer rwkv-world needs the 'rwkv' package (pip install rwkv)") from e
        self.vocab_path = Path(rwkv_tokenizer.__file__).with_name(self.VOCAB)
        self._tok = rwkv_tokenizer.TRIE_TOKENIZER(str(self.vocab_path))
        self.vocab_size = 65536  # the World models' embedding rows (ids 1..65529 are used)
        self.eos_id = 0

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        # the package's decode() turns any incomplete UTF-8 into a lone U+FFFD; keep the rest
        return self._tok.decodeBytes([i for i in ids if i != 0]).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "rwkv-world", "vocab": self.VOCAB, "sha256": _sha256(self.vocab_path),
                "vocab_size": self.vocab_size}

    def save(self, directory: Path) -> None:
        pass


def load_text_tokenizer(name_or_path: str | os.PathLike, *, eos_token: str | None = "auto") -> TextTokenizer:
    """``benchmark``, ``rwkv-world``, a ``tokenizer.json`` file, or a folder holding one."""
    text = str(name_or_path)
    if text == "benchmark":
        return BenchmarkTokenizer()
    if text in ("rwkv-world", "world"):
        return WorldTokenizer()
    path = Path(text)
    if path.is_dir() and (path / HFTokenizer.FILE).is_file():
        path = path / HFTokenizer.FILE
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {text}: no such file, and not one of the names {', '.join(NAMES)}")
    return HFTokenizer(path, eos_token)


def tokenizer_from_spec(spec: dict, directory: str | os.PathLike | None = None) -> TextTokenizer:
    """The tokenizer a generator directory records (checked against its sha256)."""
    kind = spec.get("kind")
    if kind == "benchmark":
        return BenchmarkTokenizer()
    if kind == "rwkv-world":
        tok = WorldTokenizer()
    elif kind == "tokenizers":
        if directory is None:
            raise ValueError("a 'tokenizers' tokenizer spec needs the directory that holds its file")
        tok = HFTokenizer(Path(directory) / spec["file"], spec.get("eos_token"))
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected benchmark, tokenizers or rwkv-world)")
    recorded, actual = spec.get("sha256"), tok.spec().get("sha256")
    if recorded is not None and recorded != actual:
        raise ValueError(f"the {kind} tokenizer's files differ from the ones the generator was trained with "
                         f"(sha256 {actual[:16]}... vs recorded {recorded[:16]}...)")
    return tok


def encode_pair(tok: TextTokenizer, prompt, response, *, max_length: int = 0, truncate: str = "error",
                meta: dict | None = None) -> TokenizedPair:
    """Token ids of one (prompt, response); the response ends with the EOS token when the
    tokenizer has one. ``max_length`` (0: none) bounds prompt + response tokens: over it
    is an error, or with ``truncate="response"`` the response's end is cut (and then
    carries no EOS: the model is not taught to stop where the cut fell)."""
    if truncate not in TRUNCATE:
        raise ValueError(f"truncate must be one of {TRUNCATE}, got {truncate!r}")
    for what, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise ValueError(f"the {what} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"empty {what}")
    p = tok.encode(prompt)
    r = tok.encode(response) + ([tok.eos_id] if tok.eos_id is not None else [])
    if not p or not tok.encode(response):
        raise ValueError(f"the {'prompt' if not p else 'response'} encodes to no tokens")
    if max_length:
        if len(p) + 1 > max_length:
            raise ValueError(f"the prompt has {len(p)} tokens; with --max-length {max_length} it leaves no room "
                             "for a response (prompts are never cut: that would change the task)")
        if len(p) + len(r) > max_length:
            if truncate == "error":
                raise ValueError(f"prompt + response are {len(p)} + {len(r)} tokens, over --max-length "
                                 f"{max_length} (raise it, or --truncate response to cut the response)")
            r = tok.encode(response)[: max_length - len(p)]
    return TokenizedPair(p, r, meta=meta)


def load_text_pairs(path: str | os.PathLike, tok: TextTokenizer, *, max_length: int = 0, truncate: str = "error",
                    require_response: bool = True) -> list[TokenizedPair]:
    """Every line of a JSONL file of ``{"prompt", "response"}`` objects, encoded; the
    first bad line raises :class:`JSONLError` (``path:line: reason``). Each pair's
    ``meta`` holds the line number, the texts and any other fields of the line."""
    pairs = []
    for lineno, record in read_jsonl(path):
        try:
            needed = ("prompt", "response") if require_response else ("prompt",)
            missing = [k for k in needed if k not in record]
            if missing:
                raise ValueError(f"missing field {missing[0]!r} (fields: {', '.join(sorted(record)) or 'none'})")
            meta = {**record, "line": lineno}
            if require_response:
                pairs.append(encode_pair(tok, record["prompt"], record["response"], max_length=max_length,
                                         truncate=truncate, meta=meta))
            else:
                prompt = record["prompt"]
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError("the prompt must be a non-empty string")
                ids = tok.encode(prompt)
                if max_length and len(ids) >= max_length:
                    raise ValueError(f"the prompt has {len(ids)} tokens, over --max-length {max_length}")
                pairs.append(TokenizedPair(ids, [], meta=meta))
        except ValueError as e:
            raise JSONLError(path, lineno, str(e)) from None
    if not pairs:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return pairs
