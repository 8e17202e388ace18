"""prosg.data: benchmark generator and verifiers, tokenizers, JSONL, HF loader, collation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from prosg.data import (
    IGNORE_INDEX,
    VOCAB,
    Collator,
    Example,
    JSONLError,
    MultiStageConfig,
    PairEncoder,
    Stage,
    SymbolTokenizer,
    TokenizedPair,
    UnknownTokenError,
    benchmark_tokenizer,
    collate,
    dataset_fingerprint,
    encode_example,
    generate_example,
    generate_examples,
    load_examples,
    load_pairs,
    load_tokenizer,
    parse_prompt,
    prompt_is_tagged,
    read_jsonl,
    save_examples,
    summarize,
    verify,
    write_jsonl,
)
from prosg.data.__main__ import main as data_cli

# sha256 of the JSONL of examples 0..99 of seed 0 under the default config. The dataset
# must regenerate bit-identically (docs/benchmark.md quotes this value); a change to the
# generator that alters it is a new benchmark version, not a refactor.
GOLDEN_SEED0_N100 = "3b53937487c9766335335933ac2a8e169f4a231edacf082241d73d387dae6b65"

PROMPT = "<bos> repeat A B C ; count 30 up 3 ; ramble ; bounce D E F ; <sep>"
LENGTHS = [5, 4, 3, 6]
REF = "A B C A B | 30 1 4 7 | the cat sat | D E F E D E <eos>"


def spans(text: str) -> list[list[str]]:
    return [s.split() for s in text.replace("<eos>", "").split("|")]


def join(parts: list[list[str]], eos: bool = True) -> str:
    return " | ".join(" ".join(p) for p in parts) + (" <eos>" if eos else "")


# --------------------------------------------------------------------------- vocabulary


def test_vocab_ids_and_round_trip():
    tok = benchmark_tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.stage_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == len(VOCAB) == len(set(VOCAB)) == 104
    assert tok.token_to_id("#1") == 88 and tok.token_to_id("#16") == 103
    text = "<bos> count 7 up 3 ; ramble ; <sep>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text.split()) == ids
    assert tok.decode(torch.tensor(ids + [0, 0]), skip_pad=True) == text
    assert [tok.id_to_token(i) for i in ids] == text.split()
    every = " ".join(VOCAB)
    assert tok.decode(tok.encode(every)) == every


def test_vocab_errors():
    tok = benchmark_tokenizer()
    with pytest.raises(UnknownTokenError, match=r"'zebra' at position 2"):
        tok.encode("<bos> repeat zebra")
    with pytest.raises(UnknownTokenError, match="'a'"):
        tok.token_to_id("a")  # letters are upper-case; lower-case 'a' is not a token
    with pytest.raises(ValueError, match=r"id 104 at position 1"):
        tok.decode([1, 104])
    with pytest.raises(ValueError, match="appears twice"):
        SymbolTokenizer(["<pad>", "<bos>", "<eos>", "<sep>", "x", "x"])
    with pytest.raises(ValueError, match="must contain '<eos>'"):
        SymbolTokenizer(["<pad>", "<bos>", "<sep>"])
    with pytest.raises(ValueError, match="without whitespace"):
        SymbolTokenizer(["<pad>", "<bos>", "<eos>", "<sep>", "a b"])


# --------------------------------------------------------------------------- operations


@pytest.mark.parametrize(
    "op,args,n,expected",
    [
        ("repeat", "A B C", 7, "A B C A B C A"),
        ("repeat", "Q", 3, "Q Q Q"),
        ("count", "30 up 3", 4, "30 1 4 7"),  # wraps mod 32
        ("count", "1 down 2", 3, "1 31 29"),
        ("alternate", "A B 2", 7, "A A B B A A B"),
        ("alternate", "X Y 1", 4, "X Y X Y"),
        ("bounce", "A B C", 8, "A B C B A B C B"),
        ("bounce", "A B", 4, "A B A B"),
        ("letters", "Y 3", 4, "Y B E H"),  # wraps mod 26
    ],
)
def test_operation_outputs(op, args, n, expected):
    assert Stage(op, tuple(args.split())).expected(n) == expected.split()


def test_parse_prompt_and_bad_prompts():
    stages = parse_prompt(PROMPT)
    assert [(s.op, s.args) for s in stages] == [
        ("repeat", ("A", "B", "C")),
        ("count", ("30", "up", "3")),
        ("ramble", ()),
        ("bounce", ("D", "E", "F")),
    ]
    bad = {
        "": "empty prompt",
        "repeat A ; <sep>": "must start with <bos>",
        "<bos> repeat A ;": "end with <sep>",
        "<bos> <sep>": "no instruction",
        "<bos> repeat A <sep>": "must end with ';'",
        "<bos> repeat A ; ; <sep>": "empty instruction",
        "<bos> jump A ; <sep>": "stage 1 .*unknown operation 'jump'",
        "<bos> repeat A ; count 3 sideways 1 ; <sep>": "stage 2 .*'up' or 'down'",
        "<bos> count 3 up 0 ; <sep>": "count step: expected a number 1-31",
        "<bos> alternate A A 2 ; <sep>": "must differ",
        "<bos> letters A 26 ; <sep>": "letters step",
        "<bos> bounce A ; <sep>": "2 to 26 argument",
        "<bos> ramble B ; <sep>": "takes 0 argument",
        "<bos> repeat 7 ; <sep>": "expected a letter",
    }
    for prompt, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            parse_prompt(prompt)


# --------------------------------------------------------------------------- verifier


def test_verify_correct_response_and_distances():
    v = verify(PROMPT, REF, LENGTHS)
    assert v.exact and v.terminated and v.accuracy == 1.0
    assert [s.exact for s in v.stages] == [True] * 4
    assert [s.prefix for s in v.stages] == LENGTHS
    # stage k starts after the earlier spans and their '|': 0, 5+1, 6+4+1, 11+3+1
    assert [s.distance for s in v.stages] == [0, 6, 11, 15]
    assert [s.actual_distance for s in v.stages] == [0, 6, 11, 15]
    # prompt: 19 tokens; instructions start at 1 (repeat), 6 (count), 11 (ramble), 13 (bounce)
    assert [s.instruction_distance for s in v.stages] == [19 - 1 + 0, 19 - 6 + 6, 19 - 11 + 11, 19 - 13 + 15]
    # the reference span of each stage sits exactly at its distance
    toks = REF.split()
    assert [toks[s.distance] for s in v.stages] == ["A", "30", "the", "D"]
    # a list of symbols scores the same as the text; ramble accepts any filler words
    assert verify(PROMPT.split(), toks, LENGTHS) == v
    assert verify(PROMPT, REF.replace("the cat sat", "sky sky old"), LENGTHS).exact


def test_verify_wrong_and_partial_stages():
    parts = spans(REF)
    # stage 2 forgotten: the model keeps repeating stage 1's pattern
    wrong = [parts[0], ["C", "A", "B", "C"], parts[2], parts[3]]
    v = verify(PROMPT, join(wrong), LENGTHS)
    assert [s.accuracy for s in v.stages] == [1.0, 0.0, 1.0, 1.0]
    assert not v.stages[1].exact and v.stages[1].prefix == 0 and not v.exact
    assert v.accuracy == pytest.approx(0.75)
    # stage 4 right after its start then wrong: partial credit and prefix
    partial = parts[:3] + [["D", "E", "F", "X", "X", "E"]]
    s4 = verify(PROMPT, join(partial), LENGTHS).stages[3]
    assert (s4.correct, s4.prefix, s4.exact) == (4, 3, False)
    assert s4.accuracy == pytest.approx(4 / 6)
    # too long and too short spans lose the extra / missing positions; alignment is per span
    long_, short = list(parts[0]) + ["C", "A"], parts[1][:2]
    v = verify(PROMPT, join([long_, short, parts[2], parts[3]]), LENGTHS)
    assert v.stages[0].accuracy == pytest.approx(5 / 7) and v.stages[0].produced == 7
    assert v.stages[1].accuracy == pytest.approx(2 / 4) and v.stages[1].prefix == 2
    assert v.stages[2].actual_distance == 7 + 1 + 2 + 1 and v.stages[2].exact
    # a ramble span with a non-filler word
    r = verify(PROMPT, join(parts[:2] + [["the", "Q", "sat"]] + parts[3:]), LENGTHS).stages[2]
    assert (r.correct, r.prefix, r.exact) == (2, 1, False)


def test_verify_missing_extra_empty_and_garbage():
    parts = spans(REF)
    # a missing '|': stage 2's span swallows stage 3's, stage 4 is absent
    v = verify(PROMPT, join([parts[0], parts[1] + parts[2], parts[3]]), LENGTHS)
    assert v.stages[1].produced == 7 and v.stages[1].accuracy == pytest.approx(4 / 7)
    assert v.stages[3].actual_distance is None and v.stages[3].produced == 0 and v.stages[3].accuracy == 0.0
    # extra spans after the last stage
    v = verify(PROMPT, join(parts + [["A", "B"], []]), LENGTHS)
    assert all(s.exact for s in v.stages) and (v.extra_segments, v.extra_tokens) == (2, 2) and not v.exact
    # no <eos>: stages still scored, not terminated; trailing pads dropped
    v = verify(PROMPT, join(parts, eos=False) + " <pad> <pad>", LENGTHS)
    assert all(s.exact for s in v.stages) and not v.terminated and not v.exact
    # everything after <eos> is ignored
    assert verify(PROMPT, REF + " junk | more", LENGTHS).exact
    for empty in ("", "<eos>", [], "   "):
        v = verify(PROMPT, empty, LENGTHS)
        assert v.accuracy == 0.0 and not v.exact
        assert [s.produced for s in v.stages] == [0, 0, 0, 0]
        assert v.stages[0].actual_distance == 0 and v.stages[1].actual_distance is None
    for garbage in ("zebra %% 17 <bos> ; ; |", "| | | | | |", "A " * 1000, "<sep> <pad> x"):
        v = verify(PROMPT, garbage, LENGTHS)
        assert 0.0 <= v.accuracy < 1.0 and not v.exact
    # lengths as one int or a config
    assert verify(PROMPT, "A B C | 30 1 4 | the cat sat | D E F <eos>", 3).exact
    cfg = MultiStageConfig(stage_length=2, ramble_length=4)
    assert verify(PROMPT, "A B | 30 1 | the the the the | D E <eos>", cfg).exact
    with pytest.raises(ValueError, match="4 stage"):
        verify(PROMPT, REF, [5, 4])
    with pytest.raises(ValueError, match="must start with <bos>"):
        verify("repeat A ;", REF, 3)


TAGGED = "<bos> #1 repeat A B ; #2 ramble ; #3 count 3 down 1 ; <sep>"
TAGGED_REF = "#1 A B A B #2 the sun #3 3 2 1 <eos>"


def test_tagged_prompts_and_verify():
    assert [s.op for s in parse_prompt(TAGGED)] == ["repeat", "ramble", "count"]
    assert prompt_is_tagged(TAGGED) and not prompt_is_tagged(PROMPT)
    v = verify(TAGGED, TAGGED_REF, [4, 2, 3])
    assert v.exact
    # each span starts after its own tag
    assert [s.distance for s in v.stages] == [s.actual_distance for s in v.stages] == [1, 6, 9]
    # prompt: 16 tokens; op words at 2, 7, 10
    assert [s.instruction_distance for s in v.stages] == [16 - 2 + 1, 16 - 7 + 6, 16 - 10 + 9]
    # stages are found by their tag, so a skipped stage costs only itself
    v = verify(TAGGED, "#1 A B A B #3 3 2 1 <eos>", [4, 2, 3])
    assert [s.exact for s in v.stages] == [True, False, True] and v.stages[1].actual_distance is None
    # text before the first tag, a repeated tag and a tag beyond K are extra segments
    v = verify(TAGGED, "B B #1 A B A B #2 the sun #1 A #3 3 2 1 #4 C <eos>", [4, 2, 3])
    assert [s.exact for s in v.stages] == [True, True, True]
    assert (v.extra_segments, v.extra_tokens, v.exact) == (3, 4, False)
    # an untagged response to a tagged prompt: everything is extra
    v = verify(TAGGED, "A B A B | the sun | 3 2 1 <eos>", [4, 2, 3])
    assert v.accuracy == 0.0 and v.extra_segments == 1 and v.extra_tokens == 11
    # '|' inside a tagged span is a wrong token
    assert verify(TAGGED, "#1 A B | B #2 the sun #3 3 2 1 <eos>", [4, 2, 3]).stages[0].correct == 3
    bad = {
        "<bos> #1 repeat A ; #3 repeat B ; <sep>": "stage 2 must start with the tag #2",
        "<bos> #1 repeat A ; repeat B ; <sep>": "stage 2 must start with the tag #2",
        "<bos> repeat A ; #2 repeat B ; <sep>": "stage 2 is tagged #2 but stage 1 is not",
        "<bos> #1 ; <sep>": "empty instruction",
        "<bos> #1 repeat #2 ; <sep>": "expected a letter",
    }
    for prompt, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            parse_prompt(prompt)
    seventeen = "<bos> " + " ".join(f"#{k} ramble ;" for k in range(1, 18)) + " <sep>"
    with pytest.raises(ValueError, match="stage 17 must start with the tag #17 .*at most 16"):
        parse_prompt(seventeen)


def test_tagged_generation_matches_untagged():
    plain = MultiStageConfig(stage_length=6, ramble_length=9)
    tagged = MultiStageConfig(stage_length=6, ramble_length=9, tag_stages=True)
    for a, b in zip(generate_examples(plain, 30, seed=7), generate_examples(tagged, 30, seed=7)):
        # same seed, same instructions and ramble text; only the tags differ
        assert [(s.op, s.args) for s in a.stages] == [(s.op, s.args) for s in b.stages]
        assert [t for t in b.prompt.split() if not t.startswith("#")] == a.prompt.split()
        strip = [t for t in b.response.split() if not t.startswith("#")]
        assert strip == [t for t in a.response.split() if t != "|"]
        assert b.tagged and not a.tagged and b.verify(b.response).exact
        assert [s.distance for s in b.stages] == [s.distance + 1 for s in a.stages]
        v = b.verify(b.response)
        assert [s.actual_distance for s in v.stages] == [s.distance for s in b.stages]
        ptoks = b.prompt.split()
        assert [ptoks[s.prompt_position] for s in b.stages] == [s.op for s in b.stages]
        assert [ptoks[s.prompt_position - 1] for s in b.stages] == [f"#{k}" for k in range(1, len(b.stages) + 1)]
        pair = encode_example(b)
        tags = [i for i, t in enumerate(b.response.split()) if t.startswith("#")]
        # '#k+1' closes stage k, like '|' does untagged; '#1' opens stage 0
        assert [pair.response_stage[i] for i in tags] == [0] + list(range(len(b.stages) - 1))
        assert Example.from_dict(b.to_dict()) == b
    with pytest.raises(ValueError, match="max_stages must be <= 16 with tag_stages"):
        MultiStageConfig(max_stages=17, tag_stages=True)
    with pytest.raises(ValueError, match="tag_stages must be a bool"):
        MultiStageConfig(tag_stages=1)


# --------------------------------------------------------------------------- generator


#: Datasets of settings away from the default (tagged, every argument range widened,
#: weighted ops with a final ramble), pinned when the operations became one table
#: (prosg.data.multistage.OPERATIONS): examples 0..299 of seed 7.
GOLDEN_OTHER_SETTINGS = [
    (dict(tag_stages=True, max_stages=8, num_letters=6, max_pattern=5, max_step=7, max_run=5),
     "559c3ebabc7d4a94e815a51227fc564787d4a988437d90d65421f609079f850a"),
    (dict(ramble_last=True, ops=("ramble", "count", "bounce"), op_weights=(1, 2, 3)),
     "7d07b09eab56889eca3017d6a2823b51e96d73762b1be58844c1ad957823bec9"),
]


@pytest.mark.parametrize("fields,golden", GOLDEN_OTHER_SETTINGS)
def test_generation_of_other_settings_is_pinned(fields, golden):
    assert dataset_fingerprint(generate_examples(MultiStageConfig(**fields), 300, seed=7)) == golden


def test_generation_is_deterministic_and_well_formed():
    cfg = MultiStageConfig()
    a = generate_examples(cfg, 60, seed=0)
    assert a == generate_examples(cfg, 60, seed=0)
    assert dataset_fingerprint(generate_examples(cfg, 100, seed=0)) == GOLDEN_SEED0_N100
    # example i does not depend on how many are generated nor where generation starts
    assert generate_examples(cfg, 10, seed=0, start=25) == a[25:35]
    assert generate_example(cfg, 0, 59) == a[59]
    b = generate_examples(cfg, 60, seed=1)
    assert sum(x.prompt != y.prompt for x, y in zip(a, b)) > 50
    ops_seen = set()
    for e in a:
        assert e.id.startswith("ms-0-")
        assert cfg.min_stages <= len(e.stages) <= cfg.max_stages
        assert e.stages[-1].op != "ramble"  # the farthest stage always tests recall
        assert [s.length for s in e.stages] == [cfg.length_of(s.op) for s in e.stages]
        v = e.verify(e.response)
        assert v.exact
        assert [s.actual_distance for s in v.stages] == [s.distance for s in e.stages]
        ptoks = e.prompt.split()
        assert [ptoks[s.prompt_position] for s in e.stages] == [s.op for s in e.stages]
        ops_seen.update(s.op for s in e.stages)
    assert ops_seen == {"repeat", "count", "alternate", "bounce", "letters", "ramble"}
    # 4 stages of the default lengths put the last stage hundreds of tokens out
    assert max(e.stages[-1].distance for e in a) >= 190


def test_generation_config_options_and_errors():
    cfg = MultiStageConfig(
        min_stages=5, max_stages=5, stage_length=7, ramble_length=None, ops=("count", "ramble"),
        op_weights=(1.0, 3.0), max_step=1,
    )
    for e in generate_examples(cfg, 20, seed=3):
        assert len(e.stages) == 5 and all(s.length == 7 for s in e.stages)
        for s in e.stages:
            assert s.op in ("count", "ramble") and (s.op == "ramble" or s.args[2] == "1")
        assert e.verify(e.response).exact
    assert MultiStageConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    small = MultiStageConfig(num_letters=3, max_pattern=3, ops=("repeat", "alternate", "bounce", "letters"))
    for e in generate_examples(small, 30, seed=0):
        assert all(a in ("A", "B", "C") for s in e.stages for a in s.args if a.isalpha())
    only_ramble = MultiStageConfig(ops=("ramble",), ramble_last=True, min_stages=3, max_stages=3)
    assert all(s.op == "ramble" for s in generate_example(only_ramble, 0, 0).stages)
    bad = [
        (dict(min_stages=0), "min_stages"),
        (dict(min_stages=4, max_stages=3), "max_stages"),
        (dict(stage_length=0), "stage_length"),
        (dict(ops=("repeat", "fly")), "unknown operation 'fly'"),
        (dict(ops=()), "at least one"),
        (dict(ops=("repeat", "count"), op_weights=(1.0,)), "one weight per op"),
        (dict(ops=("repeat", "count"), op_weights=(0.0, -1.0)), "op_weights"),
        (dict(ops=("ramble",)), "final stage"),
        (dict(max_step=26), "max_step"),
        (dict(max_pattern=True), "max_pattern"),
        (dict(num_letters=1), "num_letters"),
        (dict(num_letters=3, max_pattern=4), "max_pattern"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            MultiStageConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown field"):
        MultiStageConfig.from_dict({"stages": 3})
    with pytest.raises(TypeError, match="seed"):
        generate_example(MultiStageConfig(), "0", 0)


def test_summarize_is_a_forgetting_curve():
    ex = generate_examples(MultiStageConfig(min_stages=3, max_stages=3, stage_length=8, ramble_length=8), 20, seed=5)
    # a model that does stage 1 right and forgets everything after it
    preds = [" | ".join([e.response.split(" | ")[0], "A", "A"]) + " <eos>" for e in ex]
    s = summarize(e.verify(p) for e, p in zip(ex, preds))
    assert s["examples"] == 20 and s["exact"] == 0.0
    assert s["by_stage"][0]["accuracy"] == 1.0 and s["by_stage"][0]["distance"] == 0.0
    assert s["by_stage"][2]["accuracy"] < 0.2 and s["by_stage"][2]["distance"] == 18.0
    assert sum(g["count"] for g in s["by_op"].values()) == 60


# --------------------------------------------------------------------------- JSONL


def test_examples_jsonl_round_trip(tmp_path):
    ex = generate_examples(MultiStageConfig(), 25, seed=2)
    path = tmp_path / "ms.jsonl"
    assert save_examples(path, ex) == 25
    assert load_examples(path) == ex
    assert dataset_fingerprint(ex) == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    # blank lines are fine; hand-written examples without seed/index are fine
    hand = Example.from_dict({"prompt": PROMPT, "response": REF, "stages": [{"length": n} for n in LENGTHS]})
    hand = Example.from_dict({**hand.to_dict(), "stages": [s.to_dict() for s in hand.stages]})
    path.write_text("\n" + json.dumps(hand.to_dict()) + "\n\n")
    (loaded,) = load_examples(path)
    assert loaded == hand and loaded.id == "" and loaded.verify(REF).exact


def test_jsonl_malformed_lines_name_the_line(tmp_path):
    good = json.dumps(generate_example(MultiStageConfig(), 0, 0).to_dict())
    path = tmp_path / "bad.jsonl"
    cases = {
        '{"prompt": "<bos> repeat A ;': "invalid JSON",
        "[1, 2]": "expected a JSON object, got list",
        json.dumps({"prompt": PROMPT, "response": REF}): "missing field 'stages'",
        json.dumps({"prompt": 3, "response": REF, "stages": []}): "'prompt' must be a str",
        json.dumps({"prompt": PROMPT, "response": REF, "stages": [{"length": 5}]}): "4 stage",
        json.dumps({"prompt": PROMPT, "response": REF, "stages": [{"length": "5"}] * 4}): "int 'length'",
        json.dumps({"prompt": "<bos> fly ; <sep>", "response": "", "stages": [{"length": 1}]}): "unknown operation",
        json.dumps({"prompt": PROMPT, "response": REF,
                    "stages": [{"op": "repeat", "args": ["A"], "length": n} for n in LENGTHS]}): "does not match",
        json.dumps({"prompt": PROMPT, "response": REF,
                    "stages": [{"length": n, "distance": 0} for n in LENGTHS]}): r"stages\[1\].distance",
    }
    for line, msg in cases.items():
        path.write_text(good + "\n\n" + line + "\n" + good + "\n")
        with pytest.raises(JSONLError, match=rf"bad.jsonl:3: .*{msg}") as info:
            load_examples(path)
        assert info.value.lineno == 3
    path.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(JSONLError, match=r":2: not valid UTF-8"):
        list(read_jsonl(path))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"a": 1}, {"b": "é"}])
    before = path.read_bytes()
    assert [d for _, d in read_jsonl(path)] == [{"a": 1}, {"b": "é"}]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    for bad in ([{"a": 1}, {"x": object()}], [{"a": float("nan")}], [{"a": 1}, [1]]):
        with pytest.raises((TypeError, ValueError)):
            write_jsonl(path, bad)
        assert path.read_bytes() == before  # the old file survives a failed write
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl"]  # and no temp file is left
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_jsonl(tmp_path / "missing" / "x.jsonl", [])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- collation


def test_encode_example_and_stage_ids():
    e = Example.from_dict({"prompt": PROMPT, "response": REF, "stages": [{"length": n} for n in LENGTHS]})
    pair = encode_example(e)
    tok = benchmark_tokenizer()
    assert tok.decode(pair.prompt_ids) == PROMPT and tok.decode(pair.response_ids) == REF
    # each span and the '|' / <eos> closing it belong to its stage
    assert pair.response_stage == [0] * 6 + [1] * 5 + [2] * 4 + [3] * 7
    with pytest.raises(ValueError, match="19 tokens, over max_prompt_len=18"):
        encode_example(e, max_prompt_len=18)


def test_collate_left_padding():
    pairs = [
        TokenizedPair([1, 5, 6], [7, 8], response_stage=[0, 1], meta={"id": "a"}),
        TokenizedPair([1, 9], [10, 11, 12, 2], response_stage=[0, 0, 1, 1]),
        ([1, 13, 14, 15, 16], []),  # prompt only: allowed
    ]
    b = Collator(0)(pairs)
    P, R = 5, 4
    assert b.input_ids.shape == b.attention_mask.shape == b.labels.shape == b.stage_ids.shape == (3, P + R)
    assert b.input_ids.dtype == torch.long and b.attention_mask.dtype == torch.bool
    assert b.input_ids.tolist() == [
        [0, 0, 1, 5, 6, 7, 8, 0, 0],
        [0, 0, 0, 1, 9, 10, 11, 12, 2],
        [1, 13, 14, 15, 16, 0, 0, 0, 0],
    ]
    assert b.attention_mask.tolist() == (b.input_ids != 0).tolist()
    X = IGNORE_INDEX
    assert b.labels.tolist() == [
        [X, X, X, X, X, 7, 8, X, X],
        [X, X, X, X, X, 10, 11, 12, 2],
        [X] * 9,
    ]
    assert b.stage_ids.tolist() == [
        [-1] * 5 + [0, 1, -1, -1],
        [-1] * 5 + [0, 0, 1, 1],
        [-1] * 9,
    ]
    # every prompt ends at column P, every response starts there
    assert b.response_start.tolist() == [P, P, P]
    assert b.prompt_ids.tolist() == [[0, 0, 1, 5, 6], [0, 0, 0, 1, 9], [1, 13, 14, 15, 16]]
    assert b.prompt_mask.tolist() == (b.prompt_ids != 0).tolist()
    assert b.response_ids.tolist() == [[7, 8, 0, 0], [10, 11, 12, 2], [0, 0, 0, 0]]
    assert b.response_mask.sum(1).tolist() == b.response_lengths.tolist() == [2, 4, 0]
    assert b.prompt_lengths.tolist() == [3, 2, 5]
    assert b.meta == [{"id": "a"}, None, None] and len(b) == 3
    assert torch.equal(b.input_ids[:, :P], b.prompt_ids) and torch.equal(b.input_ids[:, P:], b.response_ids)


def test_collate_right_padding_and_train_on_prompt():
    pairs = [([1, 5, 6], [7, 8]), ([1, 9], [10, 11, 12, 2])]
    b = collate(pairs, pad_id=0, prompt_padding="right", train_on_prompt=True)
    X = IGNORE_INDEX
    assert b.input_ids.tolist() == [[1, 5, 6, 7, 8, 0], [1, 9, 10, 11, 12, 2]]
    assert b.labels.tolist() == [[X, 5, 6, 7, 8, X], [X, 9, 10, 11, 12, 2]]  # not the first token
    assert b.response_start.tolist() == [3, 2]
    assert b.prompt_ids.tolist() == [[1, 5, 6], [1, 9, 0]] and b.stage_ids is None
    left = collate(pairs, pad_id=0, train_on_prompt=True)
    assert left.labels.tolist() == [[X, 5, 6, 7, 8, X, X], [X, X, 9, 10, 11, 12, 2]]
    # the response block is the same either way; the loss covers the same tokens
    assert torch.equal(b.response_ids, left.response_ids)
    assert sorted(b.labels[b.labels != X].tolist()) == sorted(left.labels[left.labels != X].tolist())
    assert b.to("cpu").input_ids.tolist() == b.input_ids.tolist()


def test_collate_errors():
    c = Collator(0, max_prompt_len=3, max_response_len=4, vocab_size=20)
    with pytest.raises(ValueError, match="empty batch"):
        c([])
    with pytest.raises(ValueError, match=r"row 1 \(x\): empty prompt"):
        c([([1], [2]), TokenizedPair([], [2], meta={"id": "x"})])
    with pytest.raises(ValueError, match="4 tokens, over max_prompt_len=3"):
        c([([1, 2, 3, 4], [2])])
    with pytest.raises(ValueError, match="5 tokens, over max_response_len=4"):
        c([([1], [2] * 5)])
    with pytest.raises(ValueError, match=r"response_ids\[1\] = 20 is not a valid token id \(expected \[0, 20\)\)"):
        c([([1], [2, 20])])
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] = -1"):
        c([([-1], [2])])
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] must be an int"):
        c([([1.0], [2])])
    with pytest.raises(ValueError, match="response_stage has 1 entries for 2"):
        c([TokenizedPair([1], [2, 3], response_stage=[0])])
    with pytest.raises(TypeError, match="row 0 must be a TokenizedPair"):
        c(["abc"])
    with pytest.raises(ValueError, match="prompt_padding"):
        Collator(0, prompt_padding="middle")
    with pytest.raises(ValueError, match="pad_id"):
        Collator(30, vocab_size=20)
    # tensors are accepted as id sequences
    assert c([(torch.tensor([1, 2]), torch.tensor([3]))]).input_ids.tolist() == [[1, 2, 3]]


def test_benchmark_through_dataloader():
    tok = benchmark_tokenizer()
    cfg = MultiStageConfig(stage_length=6, ramble_length=10)
    pairs = [encode_example(e) for e in generate_examples(cfg, 10, seed=4)]
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, collate_fn=Collator(tok.pad_id, vocab_size=tok.vocab_size))
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 2]
    for b in batches:
        # responses decode back to verifiable text at the shared start column
        for row in range(len(b)):
            assert b.input_ids[row, b.response_start[row] - 1].item() == tok.sep_id
            resp = tok.decode(b.response_ids[row], skip_pad=True)
            meta_id = b.meta[row]["id"]
            e = generate_example(cfg, 4, int(meta_id.split("-")[-1]))
            assert e.verify(resp).exact
            # stage_ids of the '|' closing a stage name that stage
            sid = b.stage_ids[row][b.input_ids[row] == tok.stage_id].tolist()
            assert sid == list(range(len(e.stages) - 1))


# --------------------------------------------------------------------------- HF tokenizers loader


@pytest.fixture
def hf_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<|endoftext|>", "<unk>", "<s>", "write", "a", "story", "about", "tom", "once", "upon", "time", "."]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def _write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def test_hf_loader(tmp_path, hf_tokenizer_file):
    data = tmp_path / "pairs.jsonl"
    _write_lines(data, [
        {"prompt": "write a story about tom", "response": "once upon a time .", "id": "s1"},
        "",
        {"prompt": "write a story", "response": "once .", "extra": 1},
    ])
    pairs = load_pairs(data, hf_tokenizer_file, eos_token="<|endoftext|>", bos_token="<s>")
    assert [(p.prompt_ids, p.response_ids) for p in pairs] == [
        ([2, 3, 4, 5, 6, 7], [8, 9, 4, 10, 11, 0]),
        ([2, 3, 4, 5], [8, 11, 0]),
    ]
    assert [p.meta for p in pairs] == [{"line": 1, "id": "s1"}, {"line": 3}]
    b = Collator(0, vocab_size=12)(pairs)
    assert b.input_ids.shape == (2, 12) and b.response_start.tolist() == [6, 6]
    assert b.labels[1].tolist() == [IGNORE_INDEX] * 6 + [8, 11, 0] + [IGNORE_INDEX] * 3
    # prompt-only files, custom keys, ids for specials, a ready Tokenizer or PairEncoder
    _write_lines(data, [{"q": "write a story"}])
    only = load_pairs(data, load_tokenizer(hf_tokenizer_file), prompt_key="q", response_key=None, bos_token=2)
    assert (only[0].prompt_ids, only[0].response_ids) == ([2, 3, 4, 5], [])
    enc = PairEncoder(hf_tokenizer_file, eos_token=0)
    assert load_pairs(data, enc, prompt_key="q", response_key=None)[0].prompt_ids == [3, 4, 5]
    assert enc.vocab_size == 12 and enc.encode("tom", "time").response_ids == [10, 0]


def test_hf_loader_errors(tmp_path, hf_tokenizer_file):
    data = tmp_path / "pairs.jsonl"
    ok = {"prompt": "write a story", "response": "once ."}
    cases = [
        ({"prompt": "", "response": "once ."}, {}, "empty prompt"),
        ({"prompt": "  ", "response": "once ."}, {}, "empty prompt"),
        ({"prompt": "write", "response": ""}, {}, "empty response"),
        ({"prompt": "write a dragon story", "response": "once ."}, {}, r"unknown token in the prompt: 'dragon' at character 8"),
        ({"prompt": "write", "response": "once upon a zebra"}, {}, "unknown token in the response: 'zebra'"),
        ({"prompt": "write a story about tom", "response": "once ."}, {"max_prompt_len": 4}, "5 tokens, over max_prompt_len=4"),
        ({"prompt": "write", "response": "once upon a time ."}, {"max_response_len": 5, "eos_token": 0}, "6 tokens, over max_response_len=5"),
        ({"prompt": "write"}, {}, "missing field 'response' \\(fields: prompt\\)"),
        ({"prompt": ["write"], "response": "once"}, {}, "prompt must be a string"),
        ({"prompt": "write", "response": 3}, {}, "response must be a string"),
        ('{"prompt": "write", "response": once}', {}, "invalid JSON"),
    ]
    for line, kwargs, msg in cases:
        _write_lines(data, [ok, ok, line])
        with pytest.raises(JSONLError, match=rf"pairs.jsonl:3: .*{msg}"):
            load_pairs(data, hf_tokenizer_file, **kwargs)
    _write_lines(data, [{"prompt": "write a dragon", "response": "once"}])
    assert load_pairs(data, hf_tokenizer_file, allow_unk=True)[0].prompt_ids == [3, 4, 1]
    with pytest.raises(ValueError, match="eos_token '</s>' is not in the tokenizer's vocabulary"):
        PairEncoder(hf_tokenizer_file, eos_token="</s>")
    with pytest.raises(ValueError, match="bos_token id 99"):
        PairEncoder(hf_tokenizer_file, bos_token=99)
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "none.json")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load tokenizer file"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(TypeError, match="options to the PairEncoder"):
        load_pairs(data, PairEncoder(hf_tokenizer_file), eos_token=0)


def test_hf_tokenizer_without_unk_and_benchmark_vocab(tmp_path):
    pytest.importorskip("tokenizers")
    # the benchmark vocabulary as a HF tokenizer: same ids; it has no <unk>, so an
    # unknown symbol is an error from the tokenizer itself, still named by line
    path = tmp_path / "bench.json"
    benchmark_tokenizer().to_hf_tokenizer().save(str(path))
    e = generate_example(MultiStageConfig(), 9, 0)
    data = tmp_path / "bench.jsonl"
    _write_lines(data, [{"prompt": e.prompt, "response": e.response}, {"prompt": "<bos> fly ; <sep>", "response": "A"}])
    with pytest.raises(JSONLError, match=r"bench.jsonl:2: cannot tokenize the prompt"):
        load_pairs(data, path)
    _write_lines(data, [{"prompt": e.prompt, "response": e.response}])
    (pair,) = load_pairs(data, path)
    ref = encode_example(e)
    assert (pair.prompt_ids, pair.response_ids) == (ref.prompt_ids, ref.response_ids)


# --------------------------------------------------------------------------- command line


def test_cli_generate_and_score(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    assert data_cli(["generate", "--seed", "0", "--n", "100", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == GOLDEN_SEED0_N100 and info["config"] == MultiStageConfig().to_dict()
    assert data_cli(["score", "--data", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["exact"] == 1.0
    preds = tmp_path / "p.jsonl"
    write_jsonl(preds, [{"id": e.id, "text": ""} for e in load_examples(out)])
    assert data_cli(["score", "--data", str(out), "--predictions", str(preds), "--key", "text"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.0
    write_jsonl(preds, [{"id": "ms-0-0", "text": ""}])
    assert data_cli(["score", "--data", str(out), "--predictions", str(preds), "--key", "text"]) == 2
    assert "no prediction for 99" in capsys.readouterr().err
    assert data_cli(["generate", "--seed", "0", "--n", "3", "--out", str(out), "--ops", "ramble"]) == 2
    assert "final stage" in capsys.readouterr().err
    assert load_examples(out) != [] and len(load_examples(out)) == 100  # the failed run left the file alone
    assert data_cli(["generate", "--seed", "1", "--n", "3", "--out", str(out), "--stage-length", "5",
                     "--ramble-length", "0", "--max-stages", "5", "--ramble-last", "--tag-stages",
                     "--num-letters", "4"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["ramble_length"] is None and info["config"]["ramble_last"] is True
    assert info["config"]["tag_stages"] is True and info["config"]["num_letters"] == 4
    assert all(s.length == 5 and e.tagged for e in load_examples(out) for s in e.stages)
