"""The multi-stage prompt-forgetting benchmark: seeded generator and exact verifiers.

A prompt lists K ordered instructions; the response carries them out in order, one
span per instruction, spans separated by ``|``::

    prompt:   <bos> repeat A B C ; count 7 up 3 ; ramble ; letters C 2 ; <sep>
    response: A B C A B C ... | 7 10 13 16 ... | the cat sat ... | C E G I ... <eos>

Stage k's span starts ``sum_{j<k} (L_j + 1)`` tokens after the prompt ends, so later
stages must be recalled from farther back. A recurrent model holds the prompt only in
its fixed-size state; what it has forgotten by stage k shows up as a wrong start of
stage k. Stages are drawn independently, so nothing generated before stage k tells
which instruction comes next: it can only come from the prompt. Within a span the
output is periodic, so after its first tokens it can be continued from the span itself;
the memory test sits at each span's start (reported as ``prefix``) and in its accuracy.

Operations (letters ``A``-``Z``, numbers ``0``-``31``; output at position ``i = 0, 1, ...``;
see docs/benchmark.md):

- ``repeat P1 .. Pm``: ``P[i mod m]`` (``A B C A B C``)
- ``count S up D``: ``(S + D*i) mod 32``; ``down``: ``S - D*i`` (``7 10 13 16``)
- ``alternate X Y R``: ``X`` R times, ``Y`` R times, ... (``A A B B A A``)
- ``bounce P1 .. Pm``: ``P`` forwards then backwards, ping-pong (``A B C B A B C``)
- ``letters S D``: letter ``(S + D*i) mod 26`` (``C E G I``)
- ``ramble``: any filler words, free-form "story" text (``the cat sat on``)

With ``MultiStageConfig(tag_stages=True)`` the instructions are numbered and each span
opens with its number instead of ``|`` (``<bos> #1 repeat A B C ; #2 ... <sep>`` /
``#1 A B C A ... #2 7 10 ... <eos>``): recall becomes a lookup of what followed ``#k``.

``ramble`` carries no information: it stands for the long free-form parts of a real
response (the body of a story before its ending) and pushes later stages farther from
the prompt. Its reference text is random filler words; any filler word is correct.

Generation is reproducible across platforms and Python versions: example ``i`` of seed
``s`` uses its own ``random.Random`` seeded from ``sha256("prosg.multistage:s:i")`` and
draws only through ``random()`` (the one method whose stream Python guarantees), so
example ``i`` is the same whatever the number of examples generated.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

from prosg.data.jsonl import JSONLError, read_jsonl, write_jsonl
from prosg.data.vocab import (
    BOS,
    END,
    EOS,
    FILLER_WORDS,
    LETTERS,
    MAX_TAGGED_STAGES,
    NUM_MODULUS,
    NUMBERS,
    PAD,
    SEP,
    STAGE,
    STAGE_TAGS,
    SymbolTokenizer,
    benchmark_tokenizer,
)

_LETTER_INDEX = {c: i for i, c in enumerate(LETTERS)}
_NUMBER_INDEX = {c: i for i, c in enumerate(NUMBERS)}
_FILLER = frozenset(FILLER_WORDS)
_TAG_INDEX = {t: k for k, t in enumerate(STAGE_TAGS, start=1)}  # '#k' -> k


# --------------------------------------------------------------------------- random draws


class _Rng:
    """Draws built only on ``random.Random.random()``, whose stream Python guarantees.

    ``randrange``/``choice``/``shuffle`` of the standard library are not guaranteed stable
    across Python versions; the dataset must be.
    """

    def __init__(self, seed: int, index: int) -> None:
        digest = hashlib.sha256(f"prosg.multistage:{seed}:{index}".encode()).digest()
        self._r = random.Random(int.from_bytes(digest[:16], "big"))

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def randint(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)

    def choice(self, seq: Sequence):
        return seq[self.below(len(seq))]

    def weighted(self, items: Sequence, weights: Sequence[float]):
        x = self._r.random() * math.fsum(weights)
        acc = 0.0
        for item, w in zip(items, weights):
            acc += w
            if x < acc:
                return item
        return next(item for item, w in zip(reversed(items), reversed(weights)) if w > 0)

    def sample(self, seq: Sequence, k: int) -> list:
        """k distinct elements (partial Fisher-Yates)."""
        pool = list(seq)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


# --------------------------------------------------------------------------- operations


def _letters(args: Sequence[str], what: str) -> list[int]:
    out = []
    for a in args:
        if a not in _LETTER_INDEX:
            raise ValueError(f"{what}: expected a letter A-Z, got {a!r}")
        out.append(_LETTER_INDEX[a])
    return out


def _number(arg: str, what: str, lo: int, hi: int) -> int:
    if arg not in _NUMBER_INDEX or not lo <= _NUMBER_INDEX[arg] <= hi:
        raise ValueError(f"{what}: expected a number {lo}-{hi}, got {arg!r}")
    return _NUMBER_INDEX[arg]


def _check_arity(op: str, args: Sequence[str], lo: int, hi: int) -> None:
    if not lo <= len(args) <= hi:
        want = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise ValueError(f"'{op}' takes {want} argument(s), got {len(args)}: {' '.join(args) or '(none)'}")


def _check_count(args: Sequence[str]) -> None:
    _number(args[0], "count start", 0, NUM_MODULUS - 1)
    if args[1] not in ("up", "down"):
        raise ValueError(f"count direction: expected 'up' or 'down', got {args[1]!r}")
    _number(args[2], "count step", 1, NUM_MODULUS - 1)


def _count_output(args: Sequence[str], n: int) -> list[str]:
    s, d = _NUMBER_INDEX[args[0]], _NUMBER_INDEX[args[2]]
    sign = 1 if args[1] == "up" else -1
    return [NUMBERS[(s + sign * d * i) % NUM_MODULUS] for i in range(n)]


def _check_alternate(args: Sequence[str]) -> None:
    x, y = _letters(args[:2], "alternate")
    if x == y:
        raise ValueError(f"alternate: the two letters must differ, got {args[0]!r} twice")
    _number(args[2], "alternate run length", 1, NUM_MODULUS - 1)


def _bounce_output(args: Sequence[str], n: int) -> list[str]:
    cycle = list(args) + list(args[-2:0:-1])
    return [cycle[i % len(cycle)] for i in range(n)]


def _check_letters(args: Sequence[str]) -> None:
    _letters(args[:1], "letters start")
    _number(args[1], "letters step", 1, len(LETTERS) - 1)


def _letters_output(args: Sequence[str], n: int) -> list[str]:
    s, d = _LETTER_INDEX[args[0]], _NUMBER_INDEX[args[1]]
    return [LETTERS[(s + d * i) % len(LETTERS)] for i in range(n)]


@dataclass(frozen=True)
class Operation:
    """One benchmark operation, whole: how many arguments it takes, how a seeded
    example draws them (``sample(rng, config)``; the order of draws is the dataset's,
    so it never changes), how a prompt's arguments are checked (``check(args)``, after
    the count; ValueError naming what is wrong) and its exact output of ``n`` tokens
    (``output(args, n)``; None: free-form, any filler word is correct)."""

    arity: tuple[int, int]
    sample: Callable[[_Rng, "MultiStageConfig"], tuple[str, ...]]
    check: Callable[[Sequence[str]], object]  # its return value is ignored
    output: Callable[[Sequence[str], int], list[str]] | None


def _pattern(rng: _Rng, cfg: "MultiStageConfig", lo: int, hi: int) -> tuple[str, ...]:
    return tuple(rng.sample(LETTERS[: cfg.num_letters], rng.randint(lo, hi)))


#: Every operation (the order is ``OPS``'); docs/benchmark.md describes each.
OPERATIONS: dict[str, Operation] = {
    # repeat P1 .. Pm: P[i mod m]
    "repeat": Operation(
        (1, 26), lambda rng, cfg: _pattern(rng, cfg, 1, cfg.max_pattern),
        lambda args: _letters(args, "repeat"),
        lambda args, n: [args[i % len(args)] for i in range(n)]),
    # count S up|down D: (S +- D*i) mod 32
    "count": Operation(
        (3, 3), lambda rng, cfg: (NUMBERS[rng.below(NUM_MODULUS)], rng.choice(("up", "down")),
                                  NUMBERS[rng.randint(1, cfg.max_step)]),
        _check_count, _count_output),
    # alternate X Y R: X R times, Y R times, ...
    "alternate": Operation(
        (3, 3), lambda rng, cfg: (*rng.sample(LETTERS[: cfg.num_letters], 2), NUMBERS[rng.randint(1, cfg.max_run)]),
        _check_alternate, lambda args, n: [args[(i // _NUMBER_INDEX[args[2]]) % 2] for i in range(n)]),
    # bounce P1 .. Pm: P forwards then backwards, ping-pong
    "bounce": Operation(
        (2, 26), lambda rng, cfg: _pattern(rng, cfg, 2, max(2, cfg.max_pattern)),
        lambda args: _letters(args, "bounce"), _bounce_output),
    # letters S D: letter (S + D*i) mod 26
    "letters": Operation(
        (2, 2), lambda rng, cfg: (rng.choice(LETTERS[: cfg.num_letters]), NUMBERS[rng.randint(1, cfg.max_step)]),
        _check_letters, _letters_output),
    # ramble: free-form filler words
    "ramble": Operation((0, 0), lambda rng, cfg: (), lambda args: None, None),
}


def _check_args(op: str, args: Sequence[str]) -> None:
    """Raise ValueError unless ``args`` are valid arguments of ``op``."""
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r} (expected one of {', '.join(OPS)})")
    _check_arity(op, args, *OPERATIONS[op].arity)
    OPERATIONS[op].check(args)


OPS: tuple[str, ...] = tuple(OPERATIONS)
"""Operation names; ``ramble`` is the one without a fixed output."""


@dataclass(frozen=True)
class Stage:
    """One instruction: an operation and its arguments (validated on construction)."""

    op: str
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        _check_args(self.op, self.args)

    @property
    def free_form(self) -> bool:
        """True for ``ramble``: any filler word is correct, nothing is recalled."""
        return OPERATIONS[self.op].output is None

    def instruction(self, tag: int | None = None) -> list[str]:
        """Its prompt tokens, ``;`` included, after the tag ``#tag`` when one is given."""
        return ([STAGE_TAGS[tag - 1]] if tag is not None else []) + [self.op, *self.args, END]

    def expected(self, n: int) -> list[str] | None:
        """The exact output of ``n`` tokens, or None for a free-form stage."""
        output = OPERATIONS[self.op].output
        return None if output is None else output(self.args, n)

    def score(self, got: Sequence[str], n: int) -> tuple[int, int]:
        """(correct positions, leading correct positions) of ``got`` against ``n`` expected tokens."""
        exp = self.expected(n)
        if exp is None:
            correct = [tok in _FILLER for tok in got[:n]]
        else:
            correct = [a == b for a, b in zip(got, exp)]
        prefix = next((i for i, ok in enumerate(correct) if not ok), len(correct))
        return sum(correct), prefix


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class MultiStageConfig:
    """Parameters of the task family (all validated; see docs/benchmark.md).

    Args:
        min_stages, max_stages: K is drawn uniformly from this range per example.
        stage_length: L, the output length of every instruction stage.
        ramble_length: output length of a ``ramble`` stage (None: ``stage_length``).
        ops: operations that may be drawn; ``op_weights`` their relative weights
            (default: equal).
        ramble_last: let ``ramble`` be the final stage. Off by default: the final stage is
            the farthest from the prompt and should test recall.
        max_pattern: most letters of a ``repeat``/``bounce`` pattern (repeat: 1..max,
            bounce: 2..max(2, max)).
        max_step: largest step of ``count`` and ``letters``.
        max_run: largest run length of ``alternate``.
        num_letters: letters drawn for patterns and starts: the first ``num_letters`` of
            ``A``-``Z`` (fewer: an easier task; ``letters`` output still wraps mod 26).
        tag_stages: number the instructions and open each response span with its
            number: ``<bos> #1 repeat A B ; #2 ... <sep>`` / ``#1 A B A B #2 ... <eos>``
            (instead of ``|`` between spans). Recalling stage k then means looking up
            what followed ``#k`` in the prompt rather than counting instructions. At
            most 16 stages. The same seed draws the same instructions either way.
    """

    min_stages: int = 3
    max_stages: int = 4
    stage_length: int = 48
    ramble_length: int | None = 96
    ops: tuple[str, ...] = OPS
    op_weights: tuple[float, ...] | None = None
    ramble_last: bool = False
    max_pattern: int = 4
    max_step: int = 3
    max_run: int = 3
    num_letters: int = 26
    tag_stages: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.op_weights is not None:
            object.__setattr__(self, "op_weights", tuple(float(w) for w in self.op_weights))

        def _int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"MultiStageConfig.{name} must be an int {rng}, got {v!r}")

        _int("min_stages", 1)
        _int("max_stages", self.min_stages)
        _int("stage_length", 1)
        if self.ramble_length is not None:
            _int("ramble_length", 1)
        _int("num_letters", 2, len(LETTERS))
        for name in ("ramble_last", "tag_stages"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MultiStageConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.tag_stages and self.max_stages > MAX_TAGGED_STAGES:
            raise ValueError(f"MultiStageConfig.max_stages must be <= {MAX_TAGGED_STAGES} with tag_stages, got {self.max_stages}")
        _int("max_pattern", 1, self.num_letters)
        _int("max_step", 1, len(LETTERS) - 1)  # letters wraps mod 26: a step of 26 is 0
        _int("max_run", 1, NUM_MODULUS - 1)
        if not self.ops:
            raise ValueError("MultiStageConfig.ops must name at least one operation")
        for op in self.ops:
            if op not in OPS:
                raise ValueError(f"MultiStageConfig.ops: unknown operation {op!r} (expected some of {', '.join(OPS)})")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"MultiStageConfig.ops has duplicates: {self.ops}")
        if self.op_weights is not None:
            if len(self.op_weights) != len(self.ops):
                raise ValueError(
                    f"MultiStageConfig.op_weights must have one weight per op ({len(self.ops)}), got {len(self.op_weights)}"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.op_weights) or not any(w > 0 for w in self.op_weights):
                raise ValueError(f"MultiStageConfig.op_weights must be finite, >= 0 and not all 0, got {self.op_weights}")
        if not self._final_ops()[0]:
            raise ValueError(
                "MultiStageConfig: no operation can be the final stage (only 'ramble' has weight and ramble_last=False)"
            )

    def weights(self) -> tuple[float, ...]:
        return self.op_weights if self.op_weights is not None else (1.0,) * len(self.ops)

    def _final_ops(self) -> tuple[list[str], list[float]]:
        pairs = [(o, w) for o, w in zip(self.ops, self.weights()) if w > 0 and (self.ramble_last or o != "ramble")]
        return [o for o, _ in pairs], [w for _, w in pairs]

    def length_of(self, op: str) -> int:
        """Output length of a stage of operation ``op``."""
        if op == "ramble" and self.ramble_length is not None:
            return self.ramble_length
        return self.stage_length

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ops"] = list(self.ops)
        d["op_weights"] = None if self.op_weights is None else list(self.op_weights)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> MultiStageConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MultiStageConfig: unknown field(s) {unknown}")
        return cls(**d)


#: Named settings of the benchmark (docs/benchmark.md): each is one MultiStageConfig,
#: the single description of a setting; ``--setting NAME`` of ``prosg pretrain``,
#: ``train``, ``eval`` and ``demo`` picks one (field flags then override its fields).
SETTINGS: dict[str, MultiStageConfig] = {
    # 3-4 stages of 12 tokens and a 48-token ramble: later stages start 20-100 tokens
    # after the prompt (the setting of the first bundled base model)
    "standard": MultiStageConfig(min_stages=3, max_stages=4, stage_length=12, ramble_length=48, max_pattern=3,
                                 max_step=2),
    # RWKV-4's setting (docs/base_model.md): one or two more stages and a ramble twice as
    # long, so later stages start 40-150 tokens after the prompt and five instructions
    # share the state; no ``count`` (its modular arithmetic fails at distance 0 too: a
    # skill, not a memory, test)
    "long": MultiStageConfig(min_stages=4, max_stages=5, stage_length=12, ramble_length=96,
                             ops=("repeat", "alternate", "bounce", "letters", "ramble"), max_pattern=3, max_step=2),
    # RWKV-7's setting: within its trained lengths distance cost it nothing and it kept
    # 12 instructions nearly as well as one (docs/base_model.md), so it is loaded with
    # instructions: 12-16 stages of 6 tokens, short rambles
    "many": MultiStageConfig(min_stages=12, max_stages=16, stage_length=6, ramble_length=12,
                             ops=("repeat", "alternate", "bounce", "letters", "ramble"), max_pattern=3, max_step=2),
}


def setting(name: str) -> MultiStageConfig:
    """The named setting ``name`` (ValueError listing the names otherwise)."""
    if name not in SETTINGS:
        raise ValueError(f"unknown benchmark setting {name!r}; known: {', '.join(SETTINGS)}")
    return SETTINGS[name]


def setting_name(config: MultiStageConfig) -> str | None:
    """The name of the setting ``config`` is, or None."""
    return next((n for n, c in SETTINGS.items() if c == config), None)


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class StageInfo:
    """Metadata of one stage of an example.

    ``distance``: tokens of the reference response before this stage's first token (its
    distance from the prompt's end). ``prompt_position``: index of its instruction's
    operation word in the prompt; the instruction sits ``len(prompt) - prompt_position +
    distance`` tokens before the stage starts.
    """

    op: str
    args: tuple[str, ...]
    length: int
    distance: int
    prompt_position: int

    @property
    def stage(self) -> Stage:
        return Stage(self.op, self.args)

    def to_dict(self) -> dict:
        return {
            "op": self.op,
            "args": list(self.args),
            "length": self.length,
            "distance": self.distance,
            "prompt_position": self.prompt_position,
        }


@dataclass(frozen=True)
class Example:
    """One benchmark example: prompt and reference response texts and their stages."""

    prompt: str
    response: str
    stages: tuple[StageInfo, ...]
    seed: int | None = None
    index: int | None = None

    @property
    def id(self) -> str:
        return f"ms-{self.seed}-{self.index}" if self.seed is not None and self.index is not None else ""

    @property
    def tagged(self) -> bool:
        """Whether the stages are numbered (``MultiStageConfig.tag_stages``)."""
        return prompt_is_tagged(self.prompt)

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.stages]

    def verify(self, response: str | Sequence[str]) -> Verification:
        """Score ``response`` against this example's prompt and stage lengths."""
        return verify(self.prompt, response, self.lengths)

    def to_dict(self) -> dict:
        d = {"prompt": self.prompt, "response": self.response, "stages": [s.to_dict() for s in self.stages]}
        if self.seed is not None:
            d = {"id": self.id, "seed": self.seed, "index": self.index, **d}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Example:
        """Rebuild and check an example: its stages must match its prompt and lengths."""
        for key, typ in (("prompt", str), ("response", str), ("stages", list)):
            if key not in d:
                raise ValueError(f"missing field {key!r}")
            if not isinstance(d[key], typ):
                raise ValueError(f"field {key!r} must be a {typ.__name__}, got {type(d[key]).__name__}")
        lengths = []
        for i, s in enumerate(d["stages"]):
            if not isinstance(s, Mapping) or not isinstance(s.get("length"), int) or isinstance(s["length"], bool):
                raise ValueError(f"stages[{i}] must be an object with an int 'length', got {s!r}")
            lengths.append(s["length"])
        stages, tagged = _parse(d["prompt"])
        rebuilt = _layout(stages, lengths, tagged)
        for i, (s, r) in enumerate(zip(d["stages"], rebuilt)):
            # op/args/distance/prompt_position are optional (derived from the prompt and
            # lengths); when present they must agree, so stale metadata cannot slip in.
            if ("op" in s and s["op"] != r.op) or ("args" in s and list(s["args"]) != list(r.args)):
                raise ValueError(f"stages[{i}] ({s.get('op')} {s.get('args')}) does not match the prompt ({r.op} {list(r.args)})")
            for key in ("distance", "prompt_position"):
                if key in s and s[key] != getattr(r, key):
                    raise ValueError(f"stages[{i}].{key} is {s[key]!r} but the prompt and lengths give {getattr(r, key)}")
        seed, index = d.get("seed"), d.get("index")
        for key, v in (("seed", seed), ("index", index)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"field {key!r} must be an int, got {v!r}")
        return cls(d["prompt"], d["response"], tuple(rebuilt), seed, index)


def parse_prompt(prompt: str | Sequence[str]) -> list[Stage]:
    """The stages of a benchmark prompt ``<bos> op args ; ... ; <sep>`` (or the tagged
    form ``<bos> #1 op args ; #2 ... ; <sep>``); ValueError if malformed."""
    return _parse(prompt)[0]


def prompt_is_tagged(prompt: str | Sequence[str]) -> bool:
    """Whether a (valid) prompt numbers its instructions ``#1 .. #K``."""
    return _parse(prompt)[1]


def _parse(prompt: str | Sequence[str]) -> tuple[list[Stage], bool]:
    toks = prompt.split() if isinstance(prompt, str) else list(prompt)
    if not toks:
        raise ValueError("empty prompt")
    if toks[0] != BOS or toks[-1] != SEP or len(toks) < 2:
        raise ValueError(f"a prompt must start with {BOS} and end with {SEP}, got {' '.join(toks[:3])} ... {' '.join(toks[-3:])}")
    body = toks[1:-1]
    if not body:
        raise ValueError("the prompt holds no instruction")
    if body[-1] != END:
        raise ValueError(f"every instruction must end with {END!r}; the last one does not: {' '.join(body[-6:])}")
    tagged = body[0] in _TAG_INDEX
    stages, current = [], []
    for tok in body:
        if tok == END:
            k = len(stages) + 1
            if tagged:
                if not current or current[0] != STAGE_TAGS[min(k, MAX_TAGGED_STAGES) - 1] or k > MAX_TAGGED_STAGES:
                    raise ValueError(
                        f"stage {k} must start with the tag #{k} (a tagged prompt numbers its stages #1, #2, ... "
                        f"in order, at most {MAX_TAGGED_STAGES}), got: {' '.join(current) or '(nothing)'}"
                    )
                current = current[1:]
            elif current and current[0] in _TAG_INDEX:
                raise ValueError(f"stage {k} is tagged {current[0]} but stage 1 is not: tag every stage or none")
            if not current:
                raise ValueError(f"empty instruction (two {END!r} in a row, or {END!r} first) in stage {k}")
            try:
                stages.append(Stage(current[0], tuple(current[1:])))
            except ValueError as e:
                raise ValueError(f"stage {len(stages) + 1} ({' '.join(current)}): {e}") from None
            current = []
        else:
            current.append(tok)
    return stages, tagged


def _layout(stages: Sequence[Stage], lengths: Sequence[int], tagged: bool) -> list[StageInfo]:
    """Where each stage sits: untagged ``span | span | ... span <eos>``, tagged
    ``#1 span #2 span ... #K span <eos>`` (each span after its own tag)."""
    if len(lengths) != len(stages):
        raise ValueError(f"{len(stages)} stage(s) in the prompt but {len(lengths)} stage length(s) given")
    tag = int(tagged)
    infos, distance, position = [], tag, 1  # position 0 is <bos>
    for k, (st, n) in enumerate(zip(stages, lengths), start=1):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"stage lengths must be ints >= 1, got {n!r}")
        infos.append(StageInfo(st.op, st.args, n, distance, position + tag))  # position of the op word
        distance += n + 1  # the span and the '|' / next tag / <eos> after it
        position += len(st.instruction(k if tagged else None))
    return infos


def generate_example(config: MultiStageConfig, seed: int, index: int) -> Example:
    """Example ``index`` of the dataset of ``seed`` (independent of every other index)."""
    for name, v in (("seed", seed), ("index", index)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"generate_example: {name} must be an int, got {v!r}")
    if index < 0:
        raise ValueError(f"generate_example: index must be >= 0, got {index}")
    rng = _Rng(seed, index)
    k = rng.randint(config.min_stages, config.max_stages)
    final_ops, final_w = config._final_ops()
    stages = []
    for i in range(k):
        op = rng.weighted(final_ops, final_w) if i == k - 1 else rng.weighted(config.ops, config.weights())
        stages.append(Stage(op, OPERATIONS[op].sample(rng, config)))
    lengths = [config.length_of(s.op) for s in stages]
    tagged = config.tag_stages
    prompt = [BOS] + [t for i, s in enumerate(stages) for t in s.instruction(i + 1 if tagged else None)] + [SEP]
    response: list[str] = []
    for i, (s, n) in enumerate(zip(stages, lengths)):
        out = s.expected(n)
        if out is None:  # ramble: random filler words ("story" text)
            out = [rng.choice(FILLER_WORDS) for _ in range(n)]
        if tagged:
            response.append(STAGE_TAGS[i])
        elif i > 0:
            response.append(STAGE)
        response += out
    response.append(EOS)
    return Example(" ".join(prompt), " ".join(response), tuple(_layout(stages, lengths, tagged)), seed, index)


def generate_examples(config: MultiStageConfig, n: int, seed: int, start: int = 0) -> list[Example]:
    """Examples ``start .. start+n-1`` of the dataset of ``seed``."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"generate_examples: n must be an int >= 0, got {n!r}")
    return [generate_example(config, seed, i) for i in range(start, start + n)]


def save_examples(path: str | os.PathLike, examples: Iterable[Example]) -> int:
    """Write examples as JSONL (atomically); returns the count."""
    return write_jsonl(path, (e.to_dict() for e in examples))


def load_examples(path: str | os.PathLike) -> list[Example]:
    """Read examples written by :func:`save_examples`; JSONLError names a bad line."""
    out = []
    for lineno, d in read_jsonl(path):
        try:
            out.append(Example.from_dict(d))
        except ValueError as e:
            raise JSONLError(path, lineno, str(e)) from None
    return out


def dataset_fingerprint(examples: Iterable[Example]) -> str:
    """sha256 of the canonical JSONL text of ``examples`` (what save_examples writes)."""
    import json

    h = hashlib.sha256()
    for e in examples:
        h.update((json.dumps(e.to_dict(), ensure_ascii=False, allow_nan=False) + "\n").encode())
    return h.hexdigest()


def encode_example(example: Example, tokenizer: SymbolTokenizer | None = None, *, max_prompt_len: int | None = None):
    """Token ids of an example as a :class:`prosg.data.batching.TokenizedPair`.

    ``response_stage[t]`` is the stage (0-based) of response token ``t``; the ``|`` or
    ``<eos>`` after a span belongs to that span's stage (predicting it is part of
    finishing the stage).
    """
    from prosg.data.batching import TokenizedPair

    tok = tokenizer or benchmark_tokenizer()
    prompt_ids = tok.encode(example.prompt)
    if max_prompt_len is not None and len(prompt_ids) > max_prompt_len:
        raise ValueError(f"example {example.id or '?'}: prompt has {len(prompt_ids)} tokens, over max_prompt_len={max_prompt_len}")
    response_ids = tok.encode(example.response)
    # untagged: span_0 | span_1 | ... span_K-1 <eos>; tagged: #1 span_0 #2 span_1 ... <eos>
    stage_of = [0] if example.tagged else []
    stage_of += [i for i, s in enumerate(example.stages) for _ in range(s.length + 1)]
    if len(stage_of) != len(response_ids):
        raise ValueError(
            f"example {example.id or '?'}: response has {len(response_ids)} tokens but its stages span {len(stage_of)}"
        )
    return TokenizedPair(prompt_ids, response_ids, response_stage=stage_of, meta={"id": example.id})


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class StageScore:
    """Score of one stage of a response.

    ``accuracy``: correct positions / max(expected length, produced length): position i
    of the span is compared with position i of the reference (for ``ramble``: is it a
    filler word), so a too-long or too-short span loses the missing or extra positions.
    ``exact``: the span is the reference exactly (compliance 0/1). ``prefix``: leading
    correct tokens, the part that needs the instruction recalled from the prompt.
    ``distance``: reference distance of the span's start from the prompt's end;
    ``actual_distance``: where the span starts in the scored response (None: the
    response has no such span). ``instruction_distance``: tokens from the instruction's
    operation word in the prompt to the span's start, in the reference layout.
    """

    index: int
    op: str
    args: tuple[str, ...]
    length: int
    produced: int
    correct: int
    prefix: int
    accuracy: float
    exact: bool
    distance: int
    actual_distance: int | None
    instruction_distance: int

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["args"] = list(self.args)
        return d


@dataclass(frozen=True)
class Verification:
    """Scores of every stage of one response, plus what lies outside the stages."""

    stages: tuple[StageScore, ...]
    extra_segments: int  # spans after the last stage ('|' too many)
    extra_tokens: int  # tokens in those spans
    terminated: bool  # the response ended with <eos>

    @property
    def accuracy(self) -> float:
        """Mean stage accuracy."""
        return sum(s.accuracy for s in self.stages) / len(self.stages)

    @property
    def exact(self) -> bool:
        """Every stage exact, nothing extra, and terminated by <eos>."""
        return all(s.exact for s in self.stages) and self.extra_segments == 0 and self.terminated

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "exact": self.exact,
            "extra_segments": self.extra_segments,
            "extra_tokens": self.extra_tokens,
            "terminated": self.terminated,
            "stages": [s.to_dict() for s in self.stages],
        }


def stage_lengths(stages: Sequence[Stage], config: MultiStageConfig) -> list[int]:
    """Output length of each stage under ``config``."""
    return [config.length_of(s.op) for s in stages]


def verify(
    prompt: str | Sequence[str],
    response: str | Sequence[str],
    lengths: int | Sequence[int] | MultiStageConfig,
) -> Verification:
    """Score each stage of ``response`` (any text: model output, garbage, empty) for ``prompt``.

    ``lengths``: the stages' output lengths: one int for all, one per stage, or a config
    (``config.length_of(op)``). The response is cut at its first ``<eos>`` (trailing
    ``<pad>`` are dropped when there is none) and split into spans: at ``|`` (span k is
    the k-th piece), or for a tagged prompt at the tags (stage k's span follows the
    first ``#k``; text before the first tag, repeated tags and tags beyond K are extra).
    Unknown symbols are just wrong tokens. A malformed *prompt* raises ValueError:
    prompts come from the benchmark, so that is a caller bug.
    """
    stages, tagged = _parse(prompt)
    prompt_len = len(prompt.split() if isinstance(prompt, str) else prompt)
    if isinstance(lengths, MultiStageConfig):
        lengths = stage_lengths(stages, lengths)
    elif isinstance(lengths, int) and not isinstance(lengths, bool):
        lengths = [lengths] * len(stages)
    layout = _layout(stages, list(lengths), tagged)

    toks = response.split() if isinstance(response, str) else [str(t) for t in response]
    terminated = EOS in toks
    if terminated:
        toks = toks[: toks.index(EOS)]
    else:
        while toks and toks[-1] == PAD:
            toks.pop()
    # spans[i] / starts[i]: tokens and start position of stage i's span, if the response has one
    spans: list[list[str] | None] = [None] * len(stages)
    starts: list[int | None] = [None] * len(stages)
    extra_segments = extra_tokens = 0
    if tagged:
        # Label-based: stage k's span follows the first '#k'. Tokens before the first tag,
        # after a repeated tag or a tag beyond K are extra, and so are those segments.
        current: list[str] | None = None
        for pos, t in enumerate(toks):
            k = _TAG_INDEX.get(t)
            if k is not None:
                if k <= len(stages) and spans[k - 1] is None:
                    current = spans[k - 1] = []
                    starts[k - 1] = pos + 1
                else:
                    current = None
                    extra_segments += 1
            elif current is not None:
                current.append(t)
            else:
                if pos == 0:
                    extra_segments += 1  # text before the first tag
                extra_tokens += 1
    else:
        # Ordinal: span i is the text between the i-th and (i+1)-th '|'.
        pieces, piece_starts = [[]], [0]
        for pos, t in enumerate(toks):
            if t == STAGE:
                pieces.append([])
                piece_starts.append(pos + 1)
            else:
                pieces[-1].append(t)
        for i in range(min(len(stages), len(pieces))):
            spans[i], starts[i] = pieces[i], piece_starts[i]
        extra = pieces[len(stages) :]
        extra_segments, extra_tokens = len(extra), sum(len(p) for p in extra)

    scores = []
    for i, (st, info) in enumerate(zip(stages, layout)):
        got = spans[i] or []
        correct, prefix = st.score(got, info.length)
        scores.append(
            StageScore(
                index=i,
                op=st.op,
                args=st.args,
                length=info.length,
                produced=len(got),
                correct=correct,
                prefix=prefix,
                accuracy=correct / max(info.length, len(got)),
                exact=correct == info.length and len(got) == info.length,
                distance=info.distance,
                actual_distance=starts[i],
                instruction_distance=prompt_len - info.prompt_position + info.distance,
            )
        )
    return Verification(tuple(scores), extra_segments, extra_tokens, terminated)


def mean_scores(scores: Iterable[StageScore]) -> dict:
    """``count``, mean ``accuracy``, ``exact`` rate, mean ``prefix`` and mean reference
    ``distance`` of a group of stage scores (None for the means of an empty group)."""
    scores = list(scores)
    n = len(scores)
    if n == 0:
        return {"count": 0, "accuracy": None, "exact": None, "prefix": None, "distance": None}
    return {
        "count": n,
        "accuracy": sum(s.accuracy for s in scores) / n,
        "exact": sum(s.exact for s in scores) / n,
        "prefix": sum(s.prefix for s in scores) / n,
        "distance": sum(s.distance for s in scores) / n,
    }


def summarize(verifications: Iterable[Verification]) -> dict:
    """Aggregate scores: overall, per stage position (1st, 2nd, ...) and per operation.

    Each group reports ``count``, mean ``accuracy``, ``exact`` rate, mean ``prefix`` and
    mean reference ``distance``; the per-position table is the forgetting curve.
    """
    verifications = list(verifications)
    by_stage: dict[int, list[StageScore]] = {}
    by_op: dict[str, list[StageScore]] = {}
    for v in verifications:
        for s in v.stages:
            by_stage.setdefault(s.index, []).append(s)
            by_op.setdefault(s.op, []).append(s)

    n = len(verifications)
    return {
        "examples": n,
        "accuracy": sum(v.accuracy for v in verifications) / n if n else float("nan"),
        "exact": sum(v.exact for v in verifications) / n if n else float("nan"),
        "by_stage": [mean_scores(by_stage[i]) for i in sorted(by_stage)],
        "by_op": {op: mean_scores(g) for op, g in sorted(by_op.items())},
    }


__all__ = [
    "OPS",
    "Example",
    "MultiStageConfig",
    "Stage",
    "StageInfo",
    "StageScore",
    "Verification",
    "dataset_fingerprint",
    "encode_example",
    "generate_example",
    "generate_examples",
    "load_examples",
    "parse_prompt",
    "prompt_is_tagged",
    "save_examples",
    "stage_lengths",
    "summarize",
    "verify",
]
