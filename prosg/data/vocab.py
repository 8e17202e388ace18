"""The fixed vocabulary of the multi-stage benchmark and its whitespace tokenizer.

The benchmark's text is a sequence of whitespace-separated symbols, each one token, so
tokenization is a dictionary lookup and decoding is exact (``decode(encode(t)) ==
" ".join(t.split())``). The vocabulary is fixed and ordered: token ids are part of the
benchmark's definition (a model trained on one build reads data written by another),
so tokens are only ever appended at the end, never reordered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PAD = "<pad>"
BOS = "<bos>"
EOS = "<eos>"
SEP = "<sep>"  # ends the prompt; the response starts right after it
STAGE = "|"  # separates consecutive stage outputs in the response
END = ";"  # ends each instruction in the prompt

SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, SEP, STAGE, END)

# Instruction words (the first token of every instruction, plus the direction words of
# ``count``). See prosg.data.multistage for their meaning.
OP_WORDS: tuple[str, ...] = ("repeat", "count", "up", "down", "alternate", "bounce", "letters", "ramble")

LETTERS: tuple[str, ...] = tuple(chr(ord("A") + i) for i in range(26))
NUM_MODULUS = 32
NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(NUM_MODULUS))

# Free-form "story" words emitted by the ``ramble`` stage. Lower-case and disjoint from
# every other group so a ramble span can be told apart from instruction output.
FILLER_WORDS: tuple[str, ...] = (
    "the", "cat", "dog", "sat", "ran", "on", "mat", "big",
    "red", "and", "then", "saw", "hill", "sun", "sky", "old",
)

# Stage tags ``#1`` .. ``#16`` of the tagged variant of the benchmark (numbered
# instructions, each response span opened by its number). Appended after the rest so
# the ids of the untagged vocabulary did not move.
MAX_TAGGED_STAGES = 16
STAGE_TAGS: tuple[str, ...] = tuple(f"#{k}" for k in range(1, MAX_TAGGED_STAGES + 1))

VOCAB: tuple[str, ...] = SPECIAL_TOKENS + OP_WORDS + LETTERS + NUMBERS + FILLER_WORDS + STAGE_TAGS


class UnknownTokenError(ValueError):
    """A symbol outside the vocabulary; names the symbol and its position."""


class SymbolTokenizer:
    """Whitespace tokenizer over a fixed symbol vocabulary (default: the benchmark's).

    ``encode`` accepts a string (split on whitespace) or a sequence of symbols and raises
    :class:`UnknownTokenError` on a symbol outside the vocabulary: the benchmark has no
    ``<unk>``, because an unknown symbol in benchmark data is a bug, not input to model.
    """

    def __init__(self, tokens: Sequence[str] = VOCAB) -> None:
        tokens = tuple(tokens)
        seen: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str) or not tok or tok.split() != [tok]:
                raise ValueError(f"SymbolTokenizer: token {i} must be a non-empty string without whitespace, got {tok!r}")
            if tok in seen:
                raise ValueError(f"SymbolTokenizer: token {tok!r} appears twice (ids {seen[tok]} and {i})")
            seen[tok] = i
        for special in (PAD, BOS, EOS, SEP):
            if special not in seen:
                raise ValueError(f"SymbolTokenizer: the vocabulary must contain {special!r}")
        self._tokens = tokens
        self._ids = seen

    # ids of the special tokens
    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def sep_id(self) -> int:
        return self._ids[SEP]

    @property
    def stage_id(self) -> int:
        """Id of the stage marker ``|`` (KeyError-free: raises if the vocabulary lacks it)."""
        return self.token_to_id(STAGE)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[str, ...]:
        return self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def token_to_id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise UnknownTokenError(f"unknown token {token!r} (not in the {len(self)}-token vocabulary)") from None

    def id_to_token(self, index: int) -> str:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(self._tokens):
            raise ValueError(f"token id must be an int in [0, {len(self._tokens)}), got {index!r}")
        return self._tokens[index]

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    def encode(self, text: str | Sequence[str]) -> list[int]:
        """Ids of a whitespace-separated string or a sequence of symbols."""
        symbols = text.split() if isinstance(text, str) else list(text)
        ids = []
        for pos, sym in enumerate(symbols):
            index = self._ids.get(sym)
            if index is None:
                raise UnknownTokenError(
                    f"unknown token {sym!r} at position {pos} (not in the {len(self)}-token vocabulary)"
                )
            ids.append(index)
        return ids

    def decode(self, ids: Iterable[int], *, skip_pad: bool = False) -> str:
        """Space-joined symbols of ``ids`` (ints or 0-d tensors); ``skip_pad`` drops ``<pad>``."""
        out = []
        for pos, raw in enumerate(ids):
            index = int(raw)
            if not 0 <= index < len(self._tokens):
                raise ValueError(f"decode: id {index} at position {pos} is outside [0, {len(self._tokens)})")
            if skip_pad and index == self.pad_id:
                continue
            out.append(self._tokens[index])
        return " ".join(out)

    def to_hf_tokenizer(self):
        """The same vocabulary as a ``tokenizers.Tokenizer`` (WordLevel, whitespace split).

        Lets the benchmark go through the user-data path (:mod:`prosg.data.hf`) unchanged,
        e.g. ``tok.to_hf_tokenizer().save("bench.json")``. Needs the ``tokenizers`` package.
        """
        from tokenizers import Tokenizer, models, pre_tokenizers

        hf = Tokenizer(models.WordLevel(dict(self._ids), unk_token=None))
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return hf


_DEFAULT: SymbolTokenizer | None = None


def benchmark_tokenizer() -> SymbolTokenizer:
    """The shared tokenizer over :data:`VOCAB` (ids: pad 0, bos 1, eos 2, sep 3, ``|`` 4, ``;`` 5)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SymbolTokenizer(VOCAB)
    return _DEFAULT
