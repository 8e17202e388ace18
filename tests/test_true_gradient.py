"""The true-gradient baseline (prosg.method.true_gradient): per-prompt gradients equal a
dense autograd computation on each prompt alone, the rank-r delta is the truncated SVD
of the accumulated steps, padding does not change it, and evaluation runs it."""

from __future__ import annotations

import copy

import pytest
import torch

from prosg.method.true_gradient import (
    TrueGradientConfig,
    low_rank,
    prompt_gradients,
    prompt_loss,
    true_gradient_delta,
)
from prosg.models.testing import random_model, random_rwkv7_model, tiny_config, tiny_rwkv7_config

MODELS = {
    "rwkv4": lambda: random_model(tiny_config(vocab_size=41), dtype=torch.float64),
    "rwkv7": lambda: random_rwkv7_model(tiny_rwkv7_config(vocab_size=41), dtype=torch.float64),
}


def _prompts():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 41, (3, 7), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    mask[2, :6] = False  # one token: no target, zero gradient
    return ids, mask


def _dense_gradient(model, tokens: torch.Tensor, names: list[str], dense: dict | None = None) -> dict:
    """d loss / d W of one prompt by plain autograd on a copy whose target weights are
    leaves (with the per-prompt change ``dense`` added to them)."""
    copy_ = copy.deepcopy(model)
    for p in copy_.parameters():
        p.requires_grad_(False)
    weights = []
    for name in names:
        w = copy_.get_submodule(name).weight
        if dense is not None:
            w.add_(dense[name])
        w.requires_grad_(True)
        weights.append(w)
    loss = prompt_loss(copy_, tokens[None], torch.ones(1, len(tokens), dtype=torch.bool))[0]
    return dict(zip(names, torch.autograd.grad(loss, weights)))


@pytest.mark.parametrize("arch", list(MODELS))
def test_per_prompt_gradients_equal_dense_autograd(arch):
    model = MODELS[arch]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = _prompts()
    names = list(model.delta_shapes())
    grads = prompt_gradients(model, ids, mask, names)
    for b in range(2):
        ref = _dense_gradient(model, ids[b][mask[b]], names)
        for name in names:
            assert grads[name][b].abs().max() > 0, name
            torch.testing.assert_close(grads[name][b], ref[name], rtol=1e-9, atol=1e-12, msg=name)
    for name in names:  # a one-token prompt predicts nothing
        assert torch.equal(grads[name][2], torch.zeros_like(grads[name][2]))
    # the model is unchanged and got no .grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", list(MODELS))
def test_steps_and_truncation_match_a_dense_computation(arch):
    model = MODELS[arch]()
    ids, mask = _prompts()
    names = ["blocks.0.attention.key", "blocks.1.feed_forward.value"]
    cfg = TrueGradientConfig(lr=0.3, steps=2, rank=3, targets=tuple(names))
    delta = true_gradient_delta(model, ids, mask, cfg)
    assert delta.scale == 1.0 and list(delta.factors) == names
    for b in range(2):
        tokens = ids[b][mask[b]]
        g1 = _dense_gradient(model, tokens, names)
        step1 = {n: -0.3 * g1[n] for n in names}
        g2 = _dense_gradient(model, tokens, names, step1)
        for n in names:
            total = step1[n] - 0.3 * g2[n]
            P, S, Qh = torch.linalg.svd(total)
            best = (P[:, :3] * S[:3]) @ Qh[:3]
            U, V = delta.factors[n]
            torch.testing.assert_close(U[b] @ V[b].T, best, rtol=1e-7, atol=1e-10, msg=n)
            assert U.shape[-1] == V.shape[-1] == 3


def test_low_rank_is_the_truncated_svd():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    U, V = low_rank(dense, 2)
    assert U.shape == (2, 9, 2) and V.shape == (2, 5, 2)
    torch.testing.assert_close(V.transpose(-1, -2) @ V, torch.eye(2, dtype=torch.float64).expand(2, 2, 2))
    for b in range(2):
        P, S, Qh = torch.linalg.svd(dense[b])
        torch.testing.assert_close(U[b] @ V[b].T, (P[:, :2] * S[:2]) @ Qh[:2])
    # a rank above min(Dout, Din) is the whole matrix
    U, V = low_rank(dense, 8)
    torch.testing.assert_close(U @ V.transpose(-1, -2), dense)


def test_padding_does_not_change_the_delta():
    model = random_model(tiny_config(vocab_size=41), dtype=torch.float64)
    cfg = TrueGradientConfig(lr=0.1, rank=2)
    short = torch.tensor([[3, 9, 4, 17]])
    alone = true_gradient_delta(model, short, None, cfg)
    batch = torch.tensor([[0, 0, 0, 3, 9, 4, 17], [5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[0, :3] = False
    padded = true_gradient_delta(model, batch, mask, cfg)
    for name, (U, V) in alone.factors.items():
        Ub, Vb = padded.factors[name]
        torch.testing.assert_close(Ub[0] @ Vb[0].T, U[0] @ V[0].T, rtol=1e-8, atol=1e-12, msg=name)


def test_config_is_checked():
    with pytest.raises(ValueError, match="steps"):
        TrueGradientConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrueGradientConfig(lr=-1.0)
    with pytest.raises(ValueError, match="learning rate"):
        model = random_model(tiny_config(vocab_size=41))
        true_gradient_delta(model, torch.tensor([[1, 2, 3]]), None, TrueGradientConfig())


def test_evaluation_runs_the_baseline_with_its_cost():
    """run_seeds tunes the step size on seed 0, then scores the rows with their costs."""
    from prosg.data import MultiStageConfig
    from prosg.data.vocab import benchmark_tokenizer
    from prosg.method import demo
    from prosg.method.true_gradient import LR_GRID

    model = random_model(tiny_config(vocab_size=benchmark_tokenizer().vocab_size))
    bench = MultiStageConfig(min_stages=2, max_stages=2, stage_length=3, ramble_length=3)
    info: dict = {}
    old = demo.TUNE_EXAMPLES
    demo.TUNE_EXAMPLES = 4
    try:
        pooled, per_seed = demo.run_seeds(model, bench, [1], 4, None, ("baseline", "true_gradient",
                                                                       "true_gradient_multi"),
                                          true_gradient=TrueGradientConfig(rank=2, multi_steps=2), info=info)
    finally:
        demo.TUNE_EXAMPLES = old
    for name in ("true_gradient", "true_gradient_multi"):
        assert info["true_gradient"][name]["lr"] in LR_GRID and info["true_gradient"][name]["tuned"]
        assert len(info["true_gradient"][name]["grid"]) == len(LR_GRID)
        cost = pooled[name].cost
        assert cost["delta_ms_per_prompt"] > 0 and cost["prompt_tokens"] > 0
    assert info["true_gradient"]["true_gradient_multi"]["steps"] == 2
    assert pooled["baseline"].cost["delta_ms_per_prompt"] == 0.0
    assert "cost" in pooled["true_gradient"].summary()
