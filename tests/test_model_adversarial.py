"""Adversarial inputs to the model layer (prosg.models): damaged checkpoints, unreadable
files, wrong arguments and non-finite numbers. Each case once gave a silently wrong
result or an error that named neither the file nor the argument; here every one must
raise an error that says what was expected and what came (or, where a value is
accepted, behave as documented). Tiny random models, nothing downloaded, seconds.

Sections follow the defect classes:
1. checkpoint structure checked against the config (layers, keys, shapes, dtypes);
2. unreadable files and bad load arguments name the file / argument;
3. forward / generate arguments (logits_to_keep, stop tokens, state, sampling, batch);
4. non-finite logits stop generation with the step and the batch rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prosg.models import RWKV4LM, Delta, NonFiniteLogitsError, RWKV4Config, RWKV4State
from prosg.models.testing import random_delta, random_model, to_blinkdl_state_dict
from tolerances import assert_close

SEED = 40  # tiny_config: vocab 37, hidden 24, 3 layers, intermediate 52, attention 24
V, H, L, F_ = 37, 24, 3, 52


@pytest.fixture
def model():
    return random_model(seed=SEED)


@contextlib.contextmanager
def _raises(error, *patterns: str):
    """``pytest.raises`` requiring every pattern (regex, in any order) in the message."""
    with pytest.raises(error) as info:
        yield info
    message = str(info.value)
    for p in patterns:
        assert re.search(p, message), f"{p!r} not in the error message:\n{message}"


# ----------------------------------------------------------- 1. checkpoint structure

def _drop(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


BLINK_CASES = [
    # (id, edit of the BlinkDL dict, from_blinkdl kwargs, error, patterns)
    ("last-block-missing-depth-given", lambda s: _drop(s, "blocks.2."), dict(num_hidden_layers=3), ValueError,
     [r"blocks \[2\] of the 3 layers are absent", r"'blocks\.2\.\*'", "num_hidden_layers as given"]),
    ("middle-block-missing", lambda s: _drop(s, "blocks.1."), {}, ValueError,
     [r"blocks \[1\] of the 3 layers are absent"]),
    ("extra-block-depth-given", lambda s: s, dict(num_hidden_layers=2), ValueError,
     [r"holds blocks \[2\] beyond the 2 layers", r"unexpected \['blocks\.2\.\*'\]"]),
    ("one-key-missing-last-block", lambda s: {k: v for k, v in s.items() if k != "blocks.2.att.output.weight"}, {},
     ValueError, [r"missing \['blocks\.2\.attention\.output\.weight'\]"]),
    ("two-mis-shaped", lambda s: {**s, "blocks.1.ffn.value.weight": s["blocks.1.ffn.value.weight"].t(),
                                  "ln_out.weight": s["ln_out.weight"][:-1]}, {}, ValueError,
     [r"blocks\.1\.feed_forward\.value\.weight: \[52, 24\] \(expected \[24, 52\]\)",
      r"ln_out\.weight: \[23\] \(expected \[24\]\)"]),
    ("integer-tensor", lambda s: {**s, "blocks.0.att.time_first": s["blocks.0.att.time_first"].long()}, {},
     ValueError, [r"not floating point: blocks\.0\.attention\.time_first: torch\.int64"]),
    ("embedding-not-a-matrix", lambda s: {**s, "emb.weight": s["emb.weight"].flatten()}, {}, ValueError,
     [r"embeddings\.weight must be a matrix, got shape \[888\]"]),
    ("hidden-size-given-wrong", lambda s: s, dict(hidden_size=8), ValueError,
     [r"hidden_size=8 was given, but the tensors say 24", "read from the checkpoint"]),
    ("depth-given-as-str", lambda s: s, dict(num_hidden_layers="3"), ValueError,
     [r"num_hidden_layers must be a positive int, got '3'"]),
]


@pytest.mark.parametrize("edit,kwargs,error,patterns", [c[1:] for c in BLINK_CASES],
                         ids=[c[0] for c in BLINK_CASES])
def test_blinkdl_structure_is_checked(model, tmp_path, edit, kwargs, error, patterns):
    path = tmp_path / "RWKV-4-tiny.pth"
    torch.save(edit(to_blinkdl_state_dict(model)), path)
    with _raises(error, re.escape(str(path)), *patterns):
        RWKV4LM.from_blinkdl(path, rescale_every=0, **kwargs)


def test_blinkdl_depth_given_and_right_loads(model, tmp_path):
    """The shape fields are checks, not overrides: the right values load the model."""
    torch.save(to_blinkdl_state_dict(model), tmp_path / "m.pth")
    loaded = RWKV4LM.from_blinkdl(tmp_path / "m.pth", num_hidden_layers=L, hidden_size=H, vocab_size=V,
                                  rescale_every=0)
    ids = torch.randint(0, V, (2, 5))
    assert loaded.config == model.config
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    # Without a depth to check against, a file that lost its last block is a valid
    # shallower model (the format has no config); the loaded depth says so.
    torch.save(_drop(to_blinkdl_state_dict(model), "blocks.2."), tmp_path / "short.pth")
    assert RWKV4LM.from_blinkdl(tmp_path / "short.pth").config.num_hidden_layers == L - 1


def _hf_dir(model, path):
    model.save_pretrained(path)
    return path, load_file(str(path / "model.safetensors"))


def _rewrite_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


_DELETE = object()

HF_CASES = [
    # (id, edit of the safetensors dict, config.json changes, patterns)
    ("last-block-missing", lambda s: _drop(s, "rwkv.blocks.2."), {},
     [r"blocks \[2\] of the 3 layers are absent", "config.json"]),
    ("config-says-fewer-layers", lambda s: s, dict(num_hidden_layers=2),
     [r"holds blocks \[2\] beyond the 2 layers"]),
    ("config-says-more-layers", lambda s: s, dict(num_hidden_layers=5),
     [r"blocks \[3, 4\] of the 5 layers are absent"]),
    ("config-lacks-depth", lambda s: s, dict(num_hidden_layers=_DELETE),
     [r"does not set \['num_hidden_layers'\] \(defaults used\)", r"blocks \[3-31\] of the 32 layers"]),
    ("head-missing", lambda s: {k: v for k, v in s.items() if k != "head.weight"}, {},
     [r"missing \['head\.weight'\]"]),
    ("mis-shaped", lambda s: {**s, "rwkv.blocks.0.attention.key.weight": torch.zeros(12, 24),
                              "rwkv.embeddings.weight": torch.zeros(36, 24)}, {},
     [r"blocks\.0\.attention\.key\.weight: \[12, 24\] \(expected \[24, 24\]\)",
      r"embeddings\.weight: \[36, 24\] \(expected \[37, 24\]\)"]),
    ("integer-tensor", lambda s: {**s, "rwkv.ln_out.bias": s["rwkv.ln_out.bias"].to(torch.int32)}, {},
     [r"not floating point: ln_out\.bias: torch\.int32"]),
]


@pytest.mark.parametrize("edit,config_changes,patterns", [c[1:] for c in HF_CASES], ids=[c[0] for c in HF_CASES])
def test_hf_structure_is_checked(model, tmp_path, edit, config_changes, patterns):
    path, state = _hf_dir(model, tmp_path / "m")
    save_file({k: v.contiguous() for k, v in edit(state).items()}, str(path / "model.safetensors"))
    _rewrite_config(path, **config_changes)
    with _raises(ValueError, re.escape(str(path / "model.safetensors")), *patterns):
        RWKV4LM.from_pretrained(path)


def _shard(model, path, drop_from_shard: str | None = None):
    path, state = _hf_dir(model, path)
    (path / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k].contiguous() for k in names if k != drop_from_shard}, str(path / name))
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path, shards


def test_sharded_checkpoint_names_the_shard(model, tmp_path):
    path, shards = _shard(model, tmp_path / "lost", drop_from_shard="rwkv.blocks.1.ln2.weight")
    shard = next(n for n, ks in shards.items() if "rwkv.blocks.1.ln2.weight" in ks)
    with _raises(ValueError, re.escape(str(path / "model.safetensors.index.json")), r"blocks\.1\.ln2\.weight",
                 shard, "do not hold them"):
        RWKV4LM.from_pretrained(path)
    path, _ = _shard(model, tmp_path / "gone")
    (path / "b.safetensors").unlink()
    with _raises(FileNotFoundError, re.escape(str(path / "b.safetensors")), "index.json"):
        RWKV4LM.from_pretrained(path)
    # A mis-shaped tensor names the shard holding it.
    path, shards = _shard(model, tmp_path / "shape")
    key = shards["b.safetensors"][0]
    tensors = load_file(str(path / "b.safetensors"))
    tensors[key] = torch.zeros(2, 2)
    save_file(tensors, str(path / "b.safetensors"))
    with _raises(ValueError, re.escape(key.removeprefix("rwkv.")) + r" in b\.safetensors: \[2, 2\]"):
        RWKV4LM.from_pretrained(path)


# ------------------------------------------------------ 2. unreadable files, bad arguments

def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "tail-cut":  # the header intact, the last tensor's bytes short
        path.write_bytes(data[:-7])


DAMAGE = ["truncated", "empty", "random", "tail-cut"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("layout", ["safetensors", "shard", "pytorch_model.bin", "blinkdl"])
def test_damaged_weight_file_is_named(model, tmp_path, layout, how):
    if layout == "safetensors":
        path, _ = _hf_dir(model, tmp_path / "m")
        bad, load = path / "model.safetensors", lambda: RWKV4LM.from_pretrained(path)
    elif layout == "shard":
        path, _ = _shard(model, tmp_path / "m")
        bad, load = path / "b.safetensors", lambda: RWKV4LM.from_pretrained(path)
    elif layout == "pytorch_model.bin":
        path, state = _hf_dir(model, tmp_path / "m")
        (path / "model.safetensors").unlink()
        bad = path / "pytorch_model.bin"
        torch.save(state, bad)
        load = lambda: RWKV4LM.from_pretrained(path)  # noqa: E731
    else:
        bad = tmp_path / "m.pth"
        torch.save(to_blinkdl_state_dict(model), bad)
        load = lambda: RWKV4LM.from_blinkdl(bad)  # noqa: E731
    _damage(bad, how)
    with _raises(ValueError, re.escape(str(bad)), r"cannot read it as", r"\d+ bytes") as info:
        load()
    assert info.value.__cause__ is not None, "the original error should be chained"


def test_pth_that_is_not_a_state_dict(model, tmp_path):
    import argparse

    cases = [
        ({"state_dict": to_blinkdl_state_dict(model), "epoch": 3}, ValueError, [r"not str -> Tensor", "state_dict"]),
        ([torch.zeros(2)], ValueError, [r"got a list"]),
        ({"emb.weight": torch.zeros(2, 2), "args": argparse.Namespace(lr=1)}, ValueError,
         [r"cannot read it as a torch\.save state dict", "UnpicklingError"]),
    ]
    for obj, error, patterns in cases:
        path = tmp_path / "x.pth"
        torch.save(obj, path)
        with _raises(error, re.escape(str(path)), *patterns):
            RWKV4LM.from_blinkdl(path)
    with _raises(FileNotFoundError, re.escape(str(tmp_path / "nope.pth"))):
        RWKV4LM.from_blinkdl(tmp_path / "nope.pth")
    with _raises(IsADirectoryError, re.escape(str(tmp_path))):
        RWKV4LM.from_blinkdl(tmp_path)


CONFIG_CASES = [
    # (id, config.json text, patterns)
    ("invalid-json", '{"hidden_size": 24,', [r"not valid JSON"]),
    ("not-an-object", "[1, 2]", [r"JSON object .* got list"]),
    ("size-as-str", dict(hidden_size="24"), [r"hidden_size must be a positive int, got '24'"]),
    ("epsilon-as-str", dict(layer_norm_epsilon="1e-5"), [r"layer_norm_epsilon must be a finite number > 0"]),
    ("epsilon-null", dict(layer_norm_epsilon=None), [r"layer_norm_epsilon .* got None"]),
    ("tie-as-str", dict(tie_word_embeddings="false"), [r"tie_word_embeddings must be true or false"]),
    ("rescale-null", dict(rescale_every=None), [r"rescale_every must be an int, got None"]),
    ("wrong-model-type", dict(model_type="rwkv5"), [r"model_type must be 'rwkv'"]),
]


@pytest.mark.parametrize("content,patterns", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_json_is_named(model, tmp_path, content, patterns):
    path, _ = _hf_dir(model, tmp_path / "m")
    if isinstance(content, str):
        (path / "config.json").write_text(content)
    else:
        _rewrite_config(path, **content)
    with _raises(ValueError, re.escape(str(path / "config.json")), *patterns):
        RWKV4LM.from_pretrained(path)


def test_bad_index_json_is_named(model, tmp_path):
    path, _ = _shard(model, tmp_path / "m")
    index = path / "model.safetensors.index.json"
    for text, pattern in (("{", "not valid JSON"), ('{"metadata": {}}', r"weight_map"),
                          ('{"weight_map": {"a": 1}}', r"weight_map")):
        index.write_text(text)
        with _raises(ValueError, re.escape(str(index)), pattern):
            RWKV4LM.from_pretrained(path)


def test_load_arguments_are_named(model, tmp_path):
    path, _ = _hf_dir(model, tmp_path / "m")
    torch.save(to_blinkdl_state_dict(model), tmp_path / "m.pth")
    for load in (lambda **kw: RWKV4LM.from_pretrained(path, **kw),
                 lambda **kw: RWKV4LM.from_blinkdl(tmp_path / "m.pth", **kw)):
        with _raises(TypeError, r"dtype must be a torch\.dtype", "'float16'", r"write torch\.float16"):
            load(dtype="float16")
        with _raises(ValueError, r"dtype must be one of", r"torch\.int8"):
            load(dtype=torch.int8)
        with _raises(ValueError, r"device 'gpu' is not a device"):
            load(device="gpu")
        with _raises(TypeError, r"device must be"):
            load(device=1.5)
    with _raises(TypeError, r"to_dtype: dtype must be a torch\.dtype", "'bfloat16'"):
        model.to_dtype("bfloat16")
    with _raises(NotADirectoryError, re.escape(str(path / "model.safetensors")), "from_blinkdl"):
        RWKV4LM.from_pretrained(path / "model.safetensors")
    # A stored dtype the model cannot run in names the file and the way out.
    state = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(path / "model.safetensors")).items()}
    save_file(state, str(path / "model.safetensors"))
    with _raises(ValueError, re.escape(str(path / "model.safetensors")), "float8_e4m3fn", "pass dtype="):
        RWKV4LM.from_pretrained(path)
    assert RWKV4LM.from_pretrained(path, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("bad", [V, V + 100, -1])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_out_of_range_token_ids_are_named(model, bad, dtype):
    ids = torch.randint(0, V, (2, 5), dtype=dtype)
    ids[1, 3] = bad
    for call in (lambda: model(ids), lambda: model.generate(ids, 2), lambda: model.stream_generate(ids, 2),
                 lambda: model(ids[:, 3:4], state=model(ids[:, :3])[1])):
        with _raises(ValueError, r"input_ids must be token ids in \[0, 37\)", rf"got values in \[.*{bad}.*\]",
                     rf"input_ids\[1, [03]\] = {bad}"):
            call()


# -------------------------------------------------------------- 3. arguments

@pytest.mark.parametrize("value,error", [(-1, ValueError), (-7, ValueError), (1.5, ValueError), (True, ValueError),
                                         ("2", ValueError), (None, ValueError)])
def test_logits_to_keep_refused(model, value, error):
    with _raises(error, "logits_to_keep", re.escape(repr(value)) if not isinstance(value, int) else str(value)):
        model(torch.randint(0, V, (2, 5)), logits_to_keep=value)


def test_logits_to_keep_accepted_values(model):
    ids = torch.randint(0, V, (2, 5))
    full = model(ids)[0]
    for n, expected in ((0, full), (1, full[:, -1:]), (5, full), (9, full), (np.int64(2), full[:, -2:])):
        # The head runs on fewer rows, so the GEMM may block differently: close, not equal.
        assert_close(model(ids, logits_to_keep=n)[0], expected, torch.float32, f"logits_to_keep={n}")
    assert model(ids[:, :1], logits_to_keep=4)[0].shape == (2, 1, V)


STOP_CASES = [2.7, [1, 2.5], torch.tensor([2.0]), True, [True], "a", torch.tensor([[1, 2]]), [None],
              torch.tensor([1.0, 2.0], dtype=torch.float64), np.array([2.5])]


@pytest.mark.parametrize("stop", STOP_CASES, ids=lambda s: type(s).__name__ + ":" + str(s).replace(" ", ""))
def test_non_integer_stop_tokens_refused(model, stop):
    ids = torch.randint(0, V, (2, 3))
    with _raises(ValueError, "stop_tokens"):
        model.generate(ids, 3, stop_tokens=stop)
    with _raises(ValueError, "stop_tokens"):
        model.stream_generate(ids, 3, stop_tokens=stop)


def test_integer_stop_tokens_of_every_kind_work(model):
    ids = torch.randint(0, V, (2, 3))
    out = model.generate(ids, 6)
    stop = int(out[0, 4])
    expected = model.generate(ids, 6, stop_tokens=[stop])
    for spelling in (stop, np.int64(stop), torch.tensor(stop), torch.tensor([stop], dtype=torch.int32),
                     np.array([stop]), (stop,), {stop}):
        assert torch.equal(model.generate(ids, 6, stop_tokens=spelling), expected), type(spelling)


def test_state_checked_on_construction(model):
    _, s = model(torch.randint(0, V, (2, 4)))
    cases = [
        (dict(att_shift=s.att_shift.long()), TypeError, r"RWKV4State\.att_shift must be a floating-point"),
        (dict(ffn_shift=s.ffn_shift.to(torch.int32)), TypeError, r"RWKV4State\.ffn_shift .*torch\.int32"),
        (dict(wkv=s.wkv.bool()), TypeError, r"RWKV4State\.wkv must be a floating-point"),
        (dict(wkv=s.wkv.half()), TypeError, r"RWKV4State\.wkv must be float32 .* got torch\.float16"),
        (dict(wkv=s.wkv.bfloat16()), TypeError, r"RWKV4State\.wkv must be float32"),
        (dict(att_shift=s.att_shift.tolist()), TypeError, r"RWKV4State\.att_shift must be a Tensor .* got list"),
        (dict(ffn_shift=s.ffn_shift[0]), ValueError, r"RWKV4State\.ffn_shift must be a 3-D tensor \[L, B, H\]"),
        (dict(wkv=s.wkv[:, :, :2]), ValueError, r"RWKV4State\.wkv must be \[L, B, 3, C\]"),
        (dict(wkv=s.wkv.flatten(2)), ValueError, r"RWKV4State\.wkv must be a 4-D tensor"),
    ]
    for change, error, pattern in cases:
        fields = dict(att_shift=s.att_shift, ffn_shift=s.ffn_shift, wkv=s.wkv, **{})
        fields.update(change)
        with _raises(error, pattern):
            RWKV4State(**fields)
    with _raises(TypeError, r"RWKV4State\.att_shift must be a floating-point .* torch\.int64"):
        s.to(torch.int64)
    # Fields reassigned after construction are caught by the model, naming the field.
    bad = s.clone()
    bad.att_shift = bad.att_shift.long()
    for call in (lambda: model(torch.randint(0, V, (2, 1)), state=bad),
                 lambda: model.generate(torch.randint(0, V, (2, 1)), 2, state=bad)):
        with _raises(TypeError, r"state\.att_shift must be floating point, got torch\.int64"):
            call()


@pytest.mark.cuda
def test_state_on_two_devices_refused(model):
    _, s = model(torch.randint(0, V, (2, 4)))
    with _raises(ValueError, r"one device", "wkv on cuda"):
        RWKV4State(s.att_shift, s.ffn_shift, s.wkv.cuda())


def test_floating_state_of_another_precision_is_cast_as_documented(model):
    ids = torch.randint(0, V, (2, 6))
    _, s = model(ids[:, :4])
    expected = model(ids[:, 4:], state=s)[0]
    wide = RWKV4State(s.att_shift.double(), s.ffn_shift.double(), s.wkv.double())
    assert torch.equal(model(ids[:, 4:], state=wide)[0], expected)


GENERATE_CASES = [
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 0, got 2.0"),
    (dict(max_new_tokens="3"), "max_new_tokens must be an int"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
    (dict(temperature="1"), "temperature must be a number, got '1'"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf"), do_sample=True), "temperature must be a finite number > 0"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0, got -1.0"),
    (dict(temperature=0.0, do_sample=True), "temperature"),
    (dict(top_k=2.5, do_sample=True), "top_k must be an int >= 0"),
    (dict(top_k=True, do_sample=True), "top_k must be an int >= 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_p="0.9", do_sample=True), "top_p must be a number, got '0.9'"),
    (dict(top_p=float("nan"), do_sample=True), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(do_sample="yes"), "do_sample must be True or False, got 'yes'"),
    (dict(do_sample=1), "do_sample must be True or False"),
    (dict(do_sample=True, generator="seed"), "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("kwargs,pattern", GENERATE_CASES, ids=[str(c[0]) for c in GENERATE_CASES])
def test_generate_arguments_refused(model, kwargs, pattern):
    ids = torch.randint(0, V, (2, 3))
    kwargs = {"max_new_tokens": 2, **kwargs}
    with _raises(ValueError, pattern):
        model.generate(ids, **kwargs)
    with _raises(ValueError, pattern):
        model.stream_generate(ids, **kwargs)  # at the call, before the first token


def test_batch_sizes_of_delta_and_state_name_input_ids(model):
    ids = torch.randint(0, V, (2, 3))
    one = random_delta(model, batch=1, rank=2, names=["blocks.1.feed_forward.key"])
    _, s3 = model(torch.randint(0, V, (3, 2)))
    for call in (lambda **kw: model(ids, **kw), lambda **kw: model.generate(ids, 2, **kw),
                 lambda **kw: model.stream_generate(ids, 2, **kw)):
        with _raises(ValueError, r"U must have shape \[B=2", "batch size 1, but input_ids has batch size 2"):
            call(delta=one)
        with _raises(ValueError, r"state\.att_shift .*batch size 3 != 2", r"input_ids' \(2\)"):
            call(state=s3)


def test_delta_scale_checked(model):
    U, V_ = random_delta(model, batch=2, rank=2, names=["blocks.0.attention.key"]).factors["blocks.0.attention.key"]
    for scale, error, pattern in ((float("nan"), ValueError, "Delta.scale must be finite"),
                                  (float("inf"), ValueError, "Delta.scale must be finite"),
                                  ("1", TypeError, "Delta.scale must be a float, got '1'"),
                                  (True, TypeError, "Delta.scale must be a float")):
        with _raises(error, pattern):
            Delta({"blocks.0.attention.key": (U, V_)}, scale)
    with _raises(TypeError, "Delta.factors must be a dict"):
        Delta([("blocks.0.attention.key", (U, V_))])


def test_sampling_settings_without_sampling_warn(model):
    ids = torch.randint(0, V, (2, 3))
    with pytest.warns(UserWarning, match=r"temperature=0\.5, top_p=0\.9 have no effect with do_sample=False"):
        out = model.generate(ids, 3, temperature=0.5, top_p=0.9)
    assert torch.equal(out, model.generate(ids, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, 3)
        model.generate(ids, 3, do_sample=True, temperature=0.5, generator=torch.Generator())


def test_config_fields_checked():
    for kwargs, pattern in ((dict(layer_norm_epsilon=True), "layer_norm_epsilon"),
                            (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon"),
                            (dict(context_length=1.5), "context_length must be an int"),
                            (dict(eos_token_id=[0, "x"]), "eos_token_id must be an int"),
                            (dict(tie_word_embeddings=1), "tie_word_embeddings")):
        with _raises(ValueError, pattern):
            RWKV4Config(**kwargs)
    with _raises(ValueError, "JSON object"):
        RWKV4Config.from_dict(["hidden_size", 8])


# ------------------------------------------------------------ 4. non-finite numbers

def _poison(model, name: str, index=(0, 0), value=float("nan")):
    with torch.no_grad():
        model.get_parameter(name)[index] = value
    return model


def _nonfinite(step: int, rows: list[int]):
    return _raises(NonFiniteLogitsError, rf"at step {step} \(0-based", re.escape(f"batch rows {rows} of"))


def test_nan_weight_stops_generation(device):
    m = _poison(random_model(seed=SEED), "blocks.1.attention.key.weight").to(device)
    ids = torch.randint(0, V, (3, 4), device=device)
    for kwargs in (dict(), dict(stop_tokens=[0]), dict(do_sample=True, generator=torch.Generator(device))):
        with _nonfinite(0, [0, 1, 2]) as info:
            m.generate(ids, 5, **kwargs)
        assert info.value.step == 0 and info.value.rows == [0, 1, 2]
        assert isinstance(info.value, FloatingPointError)
        with _nonfinite(0, [0, 1, 2]):
            next(iter(m.stream_generate(ids, 5, **kwargs)))


def test_nan_in_one_head_row_is_caught():
    """One vocabulary entry's logit NaN: argmax picks it (NaN compares greater)."""
    m = _poison(random_model(seed=SEED), "head.weight", (5, 3))
    with _nonfinite(0, [0, 1]):
        m.generate(torch.randint(0, V, (2, 3)), 4)


def test_inf_embedding_names_only_the_rows_that_read_it():
    m = _poison(random_model(seed=SEED), "embeddings.weight", (7, 2), float("inf"))
    ids = torch.tensor([[1, 2, 3], [4, 7, 5], [6, 8, 9]])
    with _nonfinite(0, [1]):
        m.generate(ids, 4)


def test_nan_state_or_delta_rows(model):
    ids = torch.randint(0, V, (3, 2))
    _, s = model(torch.randint(0, V, (3, 4)))
    s.wkv[1, 2, 0, 5] = float("nan")
    with _nonfinite(0, [2]):
        model.generate(ids, 4, state=s)
    delta = random_delta(model, batch=3, rank=2)
    delta.factors["blocks.0.feed_forward.value"][0][0, 3, 1] = float("inf")
    with _nonfinite(0, [0]):
        model.generate(ids, 4, delta)
    with _nonfinite(0, [0]):
        list(model.stream_generate(ids, 4, delta, do_sample=True, generator=torch.Generator()))


def test_logits_going_bad_midway_name_the_step(model, monkeypatch):
    """NaN that appears only at the fourth new token (an overflow building up) stops
    generation there: three good tokens are yielded first, none after."""
    ids = torch.randint(0, V, (3, 3))
    good = list(model.stream_generate(ids, 8))
    forward = model._forward
    calls = []

    def bad_forward(*args, **kwargs):
        logits, layers = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            logits = logits.clone()
            logits[1, -1, 2] = float("nan")
        return logits, layers

    monkeypatch.setattr(model, "_forward", bad_forward)
    stream = model.stream_generate(ids, 8)
    got = []
    with _nonfinite(3, [1]) as info:
        for token in stream:
            got.append(token)
    assert info.value.step == 3 and len(got) == 3
    assert all(torch.equal(a, b) for a, b in zip(got, good))
    calls.clear()
    with _nonfinite(3, [1]):
        model.generate(ids, 8)


def test_finite_extremes_are_not_flagged(model):
    """Huge but finite logits, and bfloat16, generate as before: the check only fires
    on NaN / inf."""
    ids = torch.randint(0, V, (2, 3))
    expected = model.generate(ids, 5)
    with torch.no_grad():
        model.head.weight.mul_(1e30)
    assert torch.equal(model.generate(ids, 5), expected)
    bf = random_model(seed=SEED).to_dtype(torch.bfloat16)
    assert bf.generate(ids, 5).shape == (2, 8)
    with torch.no_grad():
        assert math.isfinite(float(model(ids)[0].abs().max()))


@pytest.mark.parametrize("with_stops", [False, True])
def test_deferred_check_reports_the_first_bad_step(model, monkeypatch, with_stops):
    """The path greedy ``generate`` takes on CUDA (one check when generation ends, no
    per-step host sync), run on the CPU so that it is tested without a GPU: the error
    still names the first bad step and row, also when generation ends early because
    every row has stopped."""
    from prosg.models import generation

    ids = torch.randint(0, V, (3, 3))
    clean = model.generate(ids, 1)[:, -1].tolist()
    stop_tokens = None
    if with_stops:  # rows 0 and 2 stop at step 0; row 1 at step 1, on NaN's argmax 0
        stop_tokens = sorted({0, clean[0], clean[2]} - {clean[1]})
        assert 0 in stop_tokens and clean[1] not in stop_tokens
    forward = model._forward
    calls = []

    def bad_forward(*args, **kwargs):
        logits, layers = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:  # the logits of step 1 on, row 1 only
            logits = logits.clone()
            logits[1, -1] = float("nan")
        return logits, layers

    monkeypatch.setattr(model, "_forward", bad_forward)
    prepared = generation._prepare(model, ids, 6, None, None, False, 1.0, 0, 1.0, None, stop_tokens)
    with _raises(NonFiniteLogitsError, r"at step 1 \(0-based", r"batch rows \[1\] of 3",
                 "found when generation ended") as info:
        list(generation._steps(*prepared, defer_check=True))
    assert (info.value.step, info.value.rows) == (1, [1])
    assert len(calls) == (2 if with_stops else 6)  # early end: no forward after all stopped


def test_single_token_with_a_learned_state_keeps_its_gradient():
    """A frozen model, one token, and an initial state that requires grad (a learned
    state): the fused decode-step op has no backward, so the call takes the sequence
    path and every state tensor gets its gradient (it used to be dropped, then refused)."""
    model = random_model(seed=SEED)
    model.requires_grad_(False)
    with torch.no_grad():  # a reachable state (the empty one has zero gradients)
        _, prefix = model(torch.tensor([[1, 2, 4], [6, 7, 8]]))
    state = RWKV4State(*(t.detach().clone().requires_grad_(True)
                         for t in (prefix.att_shift, prefix.ffn_shift, prefix.wkv)))
    logits, _ = model(torch.tensor([[3], [5]]), state=state)
    logits.float().sum().backward()
    for name in ("att_shift", "ffn_shift", "wkv"):
        g = getattr(state, name).grad
        assert g is not None and g.abs().sum() > 0, name
