"""The synthetic-gradient generator (prosg.method.generator): shapes, zero start,
gradients through the fused kernels, padding invariance, input checks.

The generator reads a model only through prosg.models.protocol, so every test of its
behaviour on a model runs on both architectures (``arch``: RWKV-4 and RWKV-7)."""

from __future__ import annotations

import pytest
import torch

from prosg.method.generator import (
    GeneratorConfig,
    SyntheticGradientGenerator,
    prompt_features,
    resolve_targets,
    true_input,
)
from prosg.models import Delta
from prosg.models.testing import merged_weights, random_model, random_rwkv7_model, tiny_rwkv7_config

ALL = ("blocks.*.attention.*", "blocks.*.feed_forward.*")


#: The architectures the generator is tested on (``_frozen(arch)``).
ARCHS = ("rwkv4", "rwkv7")

#: The small RWKV-7 of these tests: 2 heads of 16, odd intermediate and LoRA widths;
#: vocabulary 41 as RWKV-4's (the tests use ids < 41).
RWKV7_SHAPE = dict(vocab_size=41, hidden_size=32, head_size=16, num_hidden_layers=2, intermediate_size=44,
                   decay_low_rank_dim=6, a_low_rank_dim=5, v_low_rank_dim=3, gate_low_rank_dim=7)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def _frozen(dtype=torch.float32, arch="rwkv4", **kw):
    if arch == "rwkv4":
        model = random_model(dtype=dtype, vocab_size=41, **kw)
    elif arch == "rwkv7":
        model = random_rwkv7_model(tiny_rwkv7_config(**{**RWKV7_SHAPE, **kw}), dtype=dtype)
    else:
        raise ValueError(f"unknown arch {arch!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _randomize_heads(gen: SyntheticGradientGenerator, seed: int = 1) -> None:
    """Non-zero delta and pooling heads, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in gen.heads.values():
            for lin in (head.delta, head.pool):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) * 0.3)
            if head.copy_gain is not None:
                head.copy_gain.fill_(0.5)


def _ids(B, P, vocab=41, seed=0):
    return torch.randint(0, vocab, (B, P), generator=torch.Generator().manual_seed(seed))


def test_output_shapes_every_module(arch):
    model = _frozen(arch=arch)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(targets=ALL, rank=3, hidden_size=16, scale=0.5))
    shapes = model.delta_shapes()
    assert gen.targets == list(shapes)
    ids = _ids(2, 7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    delta = gen(model, ids, mask)
    assert isinstance(delta, Delta) and delta.scale == 0.5
    assert list(delta.factors) == list(shapes)
    for name, (U, V) in delta.factors.items():
        d_out, d_in = shapes[name]
        assert U.shape == (2, d_out, 3) and V.shape == (2, d_in, 3), name
    # the model accepts it
    logits, _ = model(ids, delta=delta)
    assert torch.isfinite(logits).all()


def test_patterns_select_in_model_order(arch):
    model = _frozen(arch=arch)
    shapes, L = model.delta_shapes(), model.config.num_hidden_layers  # L = 3 (RWKV-4), 2 (RWKV-7)
    assert resolve_targets(["blocks.1.feed_forward.value", "blocks.0.attention.key"], shapes) == [
        "blocks.0.attention.key", "blocks.1.feed_forward.value"]
    assert resolve_targets(["blocks.*.attention.key"], shapes) == [f"blocks.{i}.attention.key" for i in range(L)]
    # state-dict spelling is accepted
    assert resolve_targets([f"rwkv.blocks.{L - 1}.attention.output.weight"], shapes) == [
        f"blocks.{L - 1}.attention.output"]
    # the ALL patterns select every matrix the model offers
    assert resolve_targets(ALL, shapes) == list(shapes)


def test_zero_init_gives_zero_delta_and_base_logits(arch):
    model = _frozen(arch=arch)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(targets=ALL, rank=2, hidden_size=8))
    ids = _ids(3, 6)
    delta = gen(model, ids)
    for U, V in delta.factors.values():
        assert torch.count_nonzero(U) == 0
        assert torch.isfinite(V).all()
    base, _ = model(ids)
    with_delta, _ = model(ids, delta=delta)
    torch.testing.assert_close(with_delta, base, rtol=0, atol=0)


def test_hooks_read_the_models_states(arch):
    """The hooked ln1/ln2 outputs of the last prompt token are the model's own token-shift
    state, and the summary is the final LayerNorm of each row's last real token."""
    model = _frozen(arch=arch)
    ids = _ids(2, 5)
    feats = prompt_features(model, ids)
    logits, state = model(ids)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(feats.ln1[layer][:, -1], state.att_shift[layer], rtol=0, atol=0)
        torch.testing.assert_close(feats.ln2[layer][:, -1], state.ffn_shift[layer], rtol=0, atol=0)
    torch.testing.assert_close(torch.nn.functional.linear(feats.summary, model.head.weight), logits[:, -1])
    # the rebuilt channel-mix value input is relu(key)^2 >= 0 of width intermediate_size
    x = true_input(model, feats, "blocks.1.feed_forward.value")
    assert x.shape == (2, 5, model.config.intermediate_size) and bool((x >= 0).all())  # 52 for RWKV-4
    assert true_input(model, feats, "blocks.1.attention.output") is None


#: Generator variants: per-layer features with true or learned inputs, and the shared
#: trunk over every layer with a bidirectional encoder.
VARIANTS = {
    "default": {},  # every layer's features, shared V, copy term
    "layer-true": {"features": "layer", "input_mode": "true", "copy_tokens": False},
    "layer-learned": {"features": "layer", "input_mode": "learned", "copy_tokens": False},
    "all-encoder": {"features": "all", "depth": 2, "encoder_layers": 1, "heads": 2, "input_mode": "true"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_reach_generator_through_fused_kernels(variant, arch):
    """The generator's gradients through the model's fused low-rank kernels equal those
    of a dense float64 reference (per-sample merged weights W + s U V^T)."""
    model = _frozen(torch.float64, arch=arch)
    cfg = GeneratorConfig(targets=ALL, rank=2, hidden_size=8, scale=0.7, **VARIANTS[variant])
    gen = SyntheticGradientGenerator(model, cfg).double()
    _randomize_heads(gen)
    ids = _ids(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    target = _ids(2, 6, seed=5)

    def loss_of(logits, b=None):
        t = target if b is None else target[b : b + 1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="sum")

    delta = gen(model, ids, mask)
    fused = loss_of(model(ids, delta=delta)[0])
    grads = torch.autograd.grad(fused, list(gen.parameters()), allow_unused=True)

    delta = gen(model, ids, mask)
    dense = sum(loss_of(torch.func.functional_call(model, merged_weights(model, delta, b), (ids[b : b + 1],))[0], b)
                for b in range(2))
    ref = torch.autograd.grad(dense, list(gen.parameters()), allow_unused=True)
    torch.testing.assert_close(fused, dense)
    nonzero = 0
    for (name, _), g, r in zip(gen.named_parameters(), grads, ref):
        assert (g is None) == (r is None), name
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, msg=name)
            nonzero += int(g.abs().sum() > 0)
    # every delta head and pooling head receives a gradient
    assert nonzero >= 2 * len(gen.targets)


@pytest.mark.parametrize("variant", ["default", "layer-true", "all-encoder"])
def test_padding_does_not_change_the_delta(variant, arch):
    model = _frozen(arch=arch)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(targets=ALL, rank=3, hidden_size=8, **VARIANTS[variant]))
    _randomize_heads(gen)
    short = _ids(1, 4, seed=2)
    alone = gen(model, short)
    # the same prompt padded to 9 (pad tokens are random ids) next to a longer one
    batch = _ids(2, 9, seed=3)
    batch[1, :4] = short[0]
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4:] = False
    padded = gen(model, batch, mask)
    batch2 = batch.clone()
    batch2[1, 4:] = 0
    padded2 = gen(model, batch2, mask)
    # left padding (prosg.data's default) gives the same delta
    left = torch.roll(batch, 5, dims=1)
    left_mask = torch.roll(mask, 5, dims=1)
    assert not left_mask[1, 0] and left_mask[1, 5:].all()
    padded3 = gen(model, left, left_mask)
    for name, (U, V) in alone.factors.items():
        for other in (padded, padded2, padded3):
            Ub, Vb = other.factors[name]
            torch.testing.assert_close(Ub[1], U[0], rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(Vb[1], V[0], rtol=1e-5, atol=1e-6, msg=name)


def test_single_token_prompt(arch):
    model = _frozen(arch=arch)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(rank=2, hidden_size=8))
    _randomize_heads(gen)
    delta = gen(model, _ids(2, 1))
    assert all(torch.isfinite(U).all() and torch.isfinite(V).all() for U, V in delta.factors.values())


def test_generate_with_delta(arch):
    model = _frozen(arch=arch)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(rank=2, hidden_size=8))
    _randomize_heads(gen)
    ids = _ids(2, 5)
    with torch.no_grad():
        out = model.generate(ids, 4, delta=gen(model, ids))
    assert out.shape == (2, 9)


def test_bad_inputs(arch):
    model = _frozen(arch=arch)
    with pytest.raises(ValueError, match="matches no module"):
        SyntheticGradientGenerator(model, GeneratorConfig(targets=("blocks.7.attention.key",)))
    with pytest.raises(ValueError, match="unknown module name"):
        SyntheticGradientGenerator(model, GeneratorConfig(targets=("blocks.0.attention.gate",)))
    with pytest.raises(ValueError, match="matches no module"):
        SyntheticGradientGenerator(model, GeneratorConfig(targets=("blocks.*.mlp.*",)))
    if arch == "rwkv7":  # RWKV-7's channel mix has no receptance (RWKV-4's has)
        with pytest.raises(ValueError, match=r"matches no module.*feed_forward\.\{key,value\}"):
            SyntheticGradientGenerator(model, GeneratorConfig(targets=("blocks.0.feed_forward.receptance",)))
    with pytest.raises(ValueError, match="rank"):
        GeneratorConfig(rank=0)
    with pytest.raises(ValueError, match="at least one module"):
        GeneratorConfig(targets=())
    with pytest.raises(ValueError, match="input_mode"):
        GeneratorConfig(input_mode="guess")
    with pytest.raises(ValueError, match="features must be 'layer' or 'all', got 'some'"):
        GeneratorConfig(features="some")
    with pytest.raises(ValueError, match="encoder_layers=1 needs features='all'"):
        GeneratorConfig(features="layer", encoder_layers=1)
    with pytest.raises(ValueError, match=r"hidden_size \(10\) must be divisible by heads \(4\)"):
        GeneratorConfig(features="all", encoder_layers=1, hidden_size=10, heads=4)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        GeneratorConfig(depth=0)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(rank=2, hidden_size=8))
    with pytest.raises(ValueError, match="at least one sample and one token"):
        gen(model, torch.zeros(2, 0, dtype=torch.long))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"empty prompt in row\(s\) \[1\]"):
        gen(model, _ids(2, 3), mask)
    with pytest.raises(ValueError, match="shape of prompt_ids"):
        gen(model, _ids(2, 3), torch.ones(2, 4, dtype=torch.bool))
    other = _frozen(arch=arch, hidden_size=16)
    with pytest.raises(ValueError, match="one model shape"):
        gen(other, _ids(2, 3))
    # nor the other architecture
    with pytest.raises(ValueError, match="one model shape"):
        gen(_frozen(arch=next(a for a in ARCHS if a != arch)), _ids(2, 3))


def test_config_round_trip():
    cfg = GeneratorConfig(targets="blocks.0.attention.key, blocks.*.feed_forward.value", rank=5, scale=0.25)
    assert cfg.targets == ("blocks.0.attention.key", "blocks.*.feed_forward.value")
    assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg
    assert GeneratorConfig.from_dict({"targets": "blocks.0.attention.key,blocks.1.attention.value"}).targets == (
        "blocks.0.attention.key", "blocks.1.attention.value")
    with pytest.raises(ValueError, match="unknown fields"):
        GeneratorConfig.from_dict({"rnak": 3})


def test_rank_components_are_distinct(arch):
    """The r pooled components start different (random pooling vectors), so the delta
    can use its whole rank: with equal pools they would stay equal through training."""
    model = _frozen(arch=arch)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(rank=3, hidden_size=8))
    with torch.no_grad():
        for head in gen.heads.values():
            head.delta.weight.normal_(0, 0.3)
    delta = gen(model, _ids(1, 6))
    for name, (U, V) in delta.factors.items():
        assert torch.linalg.matrix_rank(U[0].double()) == 3, name
        assert torch.linalg.matrix_rank(V[0].double()) == 3, name


def test_copy_term_adds_the_head_rows_of_the_pooled_prompt_tokens(arch):
    """With D = 0 and uniform pooling, U's columns are g times the mean LM-head row of the
    prompt's real tokens (attention.output and feed_forward.value only: the targets whose
    output is the residual stream the head reads); the other targets have no copy term."""
    model = _frozen(arch=arch)
    gen = SyntheticGradientGenerator(model, GeneratorConfig(targets=ALL, rank=3, hidden_size=8))
    ids = _ids(2, 6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        for name, head in zip(gen.targets, gen.heads.values()):
            head.pool.weight.zero_()  # alpha uniform over each row's real tokens
            if head.copy_gain is not None:
                head.copy_gain.fill_(2.0)
        delta = gen(model, ids, mask)
    residual = {n for n in gen.targets if n.endswith(("attention.output", "feed_forward.value"))}
    assert len(residual) == 2 * model.config.num_hidden_layers  # 6 for RWKV-4
    # the model's own word for it (what the generator reads)
    assert {n for n in gen.targets if model.writes_residual(n)} == residual
    for name, head in zip(gen.targets, gen.heads.values()):
        U, _ = delta.factors[name]
        assert (head.copy_gain is not None) == (name in residual), name
        if name in residual:
            for b, n in ((0, 6), (1, 4)):
                want = 2.0 * model.head.weight[ids[b, :n]].mean(0)
                for i in range(3):
                    torch.testing.assert_close(U[b, :, i], want, msg=name)
        else:
            assert torch.count_nonzero(U) == 0, name
