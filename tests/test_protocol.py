"""The model protocol (prosg.models.protocol): the generation loop and the ProSG method
use a model only through it.

``ProtocolOnly`` wraps a model and exposes the protocol's members (plus the few
``nn.Module`` basics the method needs: parameters, state_dict, train/eval) and nothing
else: reaching for a model's modules (``model.blocks``, ``model.head``) or private
helpers fails the test. Everything the method does on an RWKV-4 and an RWKV-7 model is
run through it and must give the results of the bare model.
"""

from __future__ import annotations

import typing

import pytest
import torch

from prosg.data import MultiStageConfig, benchmark_tokenizer, generate_examples
from prosg.method.evaluation import evaluate, generate_responses
from prosg.method.generator import GeneratorConfig, SyntheticGradientGenerator
from prosg.method.train import TrainConfig, make_batch, prefix_state, response_loss, train
from prosg.models import RWKV4LM, RWKV4State, RWKV7LM, RWKV7State
from prosg.models.generation import generate, stream_generate
from prosg.models.protocol import LayerInputs, RecurrentLM, RecurrentState
from prosg.models.testing import random_delta, random_model, random_rwkv7_model

TOK = benchmark_tokenizer()
DATA = dict(stage_length=5, ramble_length=5, min_stages=2, max_stages=3, num_letters=6)

#: The protocol's members, read from the class itself (so a member added there is
#: exposed here too) ...
PROTOCOL = {name for name in dir(RecurrentLM) if not name.startswith("_")} | set(
    typing.get_type_hints(RecurrentLM)) | {"__call__"}
#: ... and the nn.Module basics the method uses to freeze a model and identify it.
MODULE_BASICS = {"parameters", "named_parameters", "state_dict", "training", "train", "eval", "to"}


class ProtocolOnly:
    """A model seen through the protocol only."""

    def __init__(self, model):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "used", set())

    def __getattr__(self, name):
        if name not in PROTOCOL | MODULE_BASICS:
            raise AssertionError(f"the method reached past the model protocol for {name!r}")
        self.used.add(name)
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        self.used.add("__call__")
        return self._model(*args, **kwargs)


#: Small random models of every architecture, ``builder(**shape) -> model``; the tests
#: below run for each.
BUILDERS = {
    "rwkv4": lambda **kw: random_model(vocab_size=TOK.vocab_size, **kw),
    "rwkv7": lambda hidden_size=32, num_hidden_layers=3, intermediate_size=None: random_rwkv7_model(
        vocab_size=TOK.vocab_size, hidden_size=hidden_size, head_size=16, num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size or 2 * hidden_size),
}
SHAPES = {"rwkv4": dict(hidden_size=24, num_hidden_layers=2, intermediate_size=40),
          "rwkv7": dict(hidden_size=32, num_hidden_layers=2, intermediate_size=40)}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


def test_rwkv7_implements_the_protocol():
    model = BUILDERS["rwkv7"]()
    assert isinstance(model, RecurrentLM)
    assert isinstance(ProtocolOnly(model), RecurrentLM)
    assert isinstance(model.zero_state(2), RecurrentState)
    for name in PROTOCOL - {"config", "__call__"}:
        assert callable(getattr(RWKV7LM, name, None)) or isinstance(getattr(RWKV7LM, name), property), name
    for name in ("batch_size", "detach", "index_select", "index_copy_"):
        assert hasattr(RWKV7State, name), name


# The protocol's own methods must be visible to isinstance, or the generator's model
# check would let anything through.
def test_rwkv4_implements_the_protocol():
    model = random_model(vocab_size=TOK.vocab_size)
    assert isinstance(model, RecurrentLM)
    assert isinstance(ProtocolOnly(model), RecurrentLM)
    assert isinstance(model.zero_state(2), RecurrentState)
    assert not isinstance(torch.nn.Linear(2, 2), RecurrentLM)
    for name in PROTOCOL - {"config", "__call__"}:
        assert callable(getattr(RWKV4LM, name, None)) or isinstance(getattr(RWKV4LM, name), property), name
    for name in ("batch_size", "detach", "index_select", "index_copy_"):
        assert hasattr(RWKV4State, name), name


def test_generator_refuses_a_non_model():
    model = random_model(vocab_size=TOK.vocab_size)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(rank=2, hidden_size=8))
    with pytest.raises(TypeError, match="RecurrentLM"):
        gen(torch.nn.Linear(2, 2), torch.zeros(1, 3, dtype=torch.long))


def test_zero_state_is_the_state_none_means(arch):
    model = BUILDERS[arch]()
    ids = torch.randint(0, TOK.vocab_size, (3, 4), generator=torch.Generator().manual_seed(0))
    a, sa = model(ids)
    b, sb = model(ids, state=model.zero_state(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(sa.wkv, sb.wkv, rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch"):
        model.zero_state(-1)


def test_layer_inputs_and_delta_inputs_are_the_forwards_own(arch):
    """``layer_inputs`` at the last position are the token-shift state the forward
    returns; ``delta_input`` of a matrix fed to it gives that matrix's output."""
    model = BUILDERS[arch]()
    ids = torch.randint(0, TOK.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    inputs = model.layer_inputs(ids)
    assert isinstance(inputs, LayerInputs) and len(inputs.attention) == model.config.num_hidden_layers
    logits, state = model(ids)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(inputs.attention[layer][:, -1], state.att_shift[layer], rtol=0, atol=0)
        torch.testing.assert_close(inputs.feed_forward[layer][:, -1], state.ffn_shift[layer], rtol=0, atol=0)
    torch.testing.assert_close(inputs.final @ model.output_embeddings().t(), logits, rtol=1e-5, atol=1e-5)
    for name, (d_out, d_in) in model.delta_shapes().items():
        x = model.delta_input(name, inputs)
        assert (x is not None) == model.has_delta_input(name), name
        if x is not None:
            assert x.shape == (2, 6, d_in), name
    assert model.writes_residual("blocks.0.attention.output") and not model.writes_residual("blocks.0.attention.key")


def test_the_method_runs_through_the_protocol_alone(tmp_path, arch):
    """Generation, the generator, the training loss and loop, and the evaluation see
    the model only through the protocol, and compute what they compute on the bare
    model."""
    model = BUILDERS[arch](**SHAPES[arch])
    seen = ProtocolOnly(model)
    ids = torch.randint(0, TOK.vocab_size, (3, 5), generator=torch.Generator().manual_seed(2))
    delta = random_delta(model, batch=3, rank=2)
    torch.testing.assert_close(generate(seen, ids, 4, delta), model.generate(ids, 4, delta), rtol=0, atol=0)
    streamed = torch.stack(list(stream_generate(seen, ids, 4, delta, do_sample=True, top_k=5,
                                                generator=torch.Generator().manual_seed(0))), 1)
    expected = torch.stack(list(model.stream_generate(ids, 4, delta, do_sample=True, top_k=5,
                                                      generator=torch.Generator().manual_seed(0))), 1)
    torch.testing.assert_close(streamed, expected, rtol=0, atol=0)

    gen = SyntheticGradientGenerator(seen, GeneratorConfig(rank=2, hidden_size=8, input_mode="true"))
    batch = make_batch(MultiStageConfig(**DATA), seed=0, indices=range(4))
    ours = gen(seen, batch.prompt_ids, batch.prompt_mask)
    bare = gen(model, batch.prompt_ids, batch.prompt_mask)
    for name in bare.factors:
        for a, b in zip(ours.factors[name], bare.factors[name]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = prefix_state(seen, batch.prompt_ids, batch.prompt_lengths)
    assert isinstance(state, RecurrentState)
    with torch.no_grad():
        assert float(response_loss(seen, batch, ours)) == float(response_loss(model, batch, bare))

    examples = generate_examples(MultiStageConfig(**DATA), 4, seed=5)
    prompts = [TOK.encode(e.prompt) for e in examples]
    assert generate_responses(seen, prompts, 6) == generate_responses(model, prompts, 6)
    assert evaluate(seen, examples).summary() == evaluate(model, examples).summary()

    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=1, data=DATA,
                      generator=dict(rank=2, hidden_size=8))
    train(seen, cfg, tmp_path, progress=False, save_every=1000)
    assert {"start_decoding", "decode", "layer_inputs", "delta_input", "delta_shapes", "zero_state",
            "output_embeddings", "__call__"} <= seen.used


@pytest.mark.parametrize("build", ["rwkv4", "rwkv7"])
def test_load_model_picks_the_class_from_config_json(tmp_path, build):
    """``prosg.models.loading.load_model`` (what ``--base DIR``, the pipeline and
    ``prosg generate`` use) returns the architecture a directory holds, with its
    weights."""
    from prosg.models.loading import load_model
    from prosg.models.testing import random_rwkv7_model

    model = random_model(vocab_size=TOK.vocab_size) if build == "rwkv4" else random_rwkv7_model()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
