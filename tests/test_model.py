"""prosg.models.RWKV4LM against transformers' RwkvForCausalLM and against dense
merged-weight references. Tiny random models (``prosg.models.testing``), seconds each.

transformers quirks the tests work around (not bugs of ours):
* it cannot build a 1-layer RWKV (``_init_weights`` divides by ``num_layers - 1``), so
  1-layer models are only checked against our own dense references;
* with ``use_cache=True`` it sizes the WKV state by ``hidden_size``, so models with
  ``attention_hidden_size != hidden_size`` are compared with ``use_cache=False``;
* its CPU recurrence runs in float32 whatever the model dtype, so float64 comparisons
  use our own float64 references;
* its single-token step with a state is wrong for batch > 1 (transformers 5.24: the
  ``[B, H]`` shift state broadcasts against the ``[B, 1, H]`` input into ``[B, B, H]``
  logits), so single-token continuations and ``generate`` (which decodes with it) are
  compared against transformers one sample at a time.
"""

from __future__ import annotations

import pytest
import torch
from prefill_check import check_prefill_rows
from tolerances import assert_close
from torch.func import functional_call

from prosg.models import RWKV4LM, Delta, RWKV4Config, RWKV4State
from prosg.models.testing import merged_weights, random_delta, random_model, tiny_config, to_blinkdl_state_dict

transformers = pytest.importorskip("transformers")
from transformers import RwkvConfig, RwkvForCausalLM  # noqa: E402

F32 = torch.float32
F64 = torch.float64


def hf_from_ours(model: RWKV4LM, tmp_path) -> RwkvForCausalLM:
    """transformers' model on the same weights, loaded from files we wrote (eval mode)."""
    path = tmp_path / "hf_from_ours"
    model.save_pretrained(path)
    return RwkvForCausalLM.from_pretrained(path).eval()


def hf_logits(hf: RwkvForCausalLM, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids, **kwargs).logits


# Shapes: odd vocabularies, attention width != hidden, intermediate not 4H, and
# rescale_every 0 / dividing / not dividing the layer count.
HF_CONFIGS = [
    pytest.param(dict(num_hidden_layers=2, hidden_size=8, vocab_size=11, intermediate_size=20), id="L2-H8"),
    pytest.param(dict(num_hidden_layers=3, hidden_size=24, vocab_size=37, attention_hidden_size=12,
                      intermediate_size=52), id="L3-H24-C12"),
    pytest.param(dict(num_hidden_layers=4, hidden_size=16, vocab_size=53, rescale_every=2), id="L4-rescale2"),
    pytest.param(dict(num_hidden_layers=5, hidden_size=32, vocab_size=101, intermediate_size=72, rescale_every=3),
                 id="L5-rescale3"),
]


def test_reference_switch_is_off():
    """The development route through the float64 reference must not ship."""


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("cfg", HF_CONFIGS)
def test_logits_match_transformers(cfg, tmp_path):
    model = random_model(**cfg, seed=1)
    hf = hf_from_ours(model, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    expected = hf_logits(hf, ids, use_cache=False)
    logits, state = model(ids)
    assert_close(logits, expected, F32, "eval logits vs transformers")
    assert state.wkv.dtype == F32 and state.att_shift.shape == (cfg["num_hidden_layers"], 3, cfg["hidden_size"])
    # Training mode: transformers multiplies its rescaled weights back and stops
    # halving the residual stream; so must we.
    hf.train()
    model.train()
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        assert_close(model(ids)[0], expected, F32, "train-mode logits vs transformers")


def test_rescale_changes_logits_like_transformers(tmp_path):
    """Rescaling is not a no-op (LayerNorm's epsilon sees the halved stream); the
    parity above is meaningful only if both rescaled and unrescaled runs differ."""
    model = random_model(num_hidden_layers=4, hidden_size=16, rescale_every=1, seed=3)
    with torch.no_grad():
        for p in model.parameters():  # tiny activations make the epsilon matter
            if p.dim() == 2 and p is not model.head.weight:
                p.mul_(0.05)
    ids = torch.randint(0, 37, (2, 6))
    eval_logits = model(ids)[0]
    train_logits = model.train()(ids)[0]
    assert (eval_logits - train_logits).abs().max() > 1e-4
    hf = hf_from_ours(model.eval(), tmp_path)
    assert_close(eval_logits, hf_logits(hf, ids, use_cache=False), F32, "rescaled eval logits")


@pytest.mark.parametrize("rescale_every", [0, 2])
def test_state_matches_transformers(rescale_every, tmp_path):
    """Our state equals transformers' (``use_cache=True``), and both continue alike,
    through the multi-token and the single-token paths."""
    model = random_model(num_hidden_layers=4, hidden_size=16, vocab_size=29, rescale_every=rescale_every, seed=2)
    hf = hf_from_ours(model, tmp_path)
    first, second, third = torch.randint(0, 29, (2, 5)), torch.randint(0, 29, (2, 4)), torch.randint(0, 29, (2, 1))
    with torch.no_grad():
        out = hf(first, use_cache=True)
        hf_state = out.state
        logits, state = model(first)
        assert_close(logits, out.logits, F32, "prefill logits")
        for ours, theirs, what in zip(state.to_hf(), hf_state, ("ffn shift", "att shift", "num", "den", "max")):
            assert_close(ours, theirs, F32, f"state {what}")
        out = hf(second, state=[s.clone() for s in hf_state], use_cache=True)
        hf_state = out.state
        logits, state = model(second, state=state)
        assert_close(logits, out.logits, F32, "continued logits (T=4)")
        # transformers' state fed to our model continues the same way.
        logits, _ = model(second, state=RWKV4State.from_hf(hf_state))
        assert_close(logits, hf_logits(hf, second, state=[s.clone() for s in hf_state], use_cache=True), F32,
                     "continuation from transformers' state")
        # Single-token step: transformers one sample at a time (see the module docstring).
        logits, state = model(third, state=state)
        for b in range(2):
            out = hf(third[b:b + 1], state=[s[b:b + 1].clone() for s in hf_state], use_cache=True)
            assert_close(logits[b:b + 1], out.logits, F32, f"single-token step, sample {b}")
            for ours, theirs in zip(state.index_select([b]).to_hf(), out.state):
                assert_close(ours, theirs, F32, f"state after single-token step, sample {b}")


def test_checkpoint_written_by_transformers_loads(tmp_path):
    """A directory transformers wrote itself (from a model it built) loads into ours."""
    config = RwkvConfig(vocab_size=41, hidden_size=16, num_hidden_layers=3, intermediate_size=36, rescale_every=2)
    hf = RwkvForCausalLM(config)
    source = random_model(num_hidden_layers=3, hidden_size=16, vocab_size=41, intermediate_size=36, seed=4)
    state = {("head.weight" if k == "head.weight" else "rwkv." + k): v for k, v in source.state_dict().items()}
    hf.load_state_dict(state)
    hf.save_pretrained(tmp_path / "hf")  # before any eval forward rescales its weights
    model = RWKV4LM.from_pretrained(tmp_path / "hf")
    assert not model.training and model.config.rescale_every == 2
    ids = torch.randint(0, 41, (2, 7))
    assert_close(model(ids)[0], hf_logits(hf.eval(), ids, use_cache=False), F32, "logits after loading")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ------------------------------------------------------------------------- continuation


def test_chunked_prefill_equals_single_prefill():
    model = random_model(num_hidden_layers=3, rescale_every=2, seed=5)
    ids = torch.randint(0, 37, (2, 11))
    full, full_state = model(ids)
    pieces, state = [], None
    for lo, hi in ((0, 4), (4, 5), (5, 6), (6, 11)):  # multi-token and single-token chunks
        logits, state = model(ids[:, lo:hi], state=state)
        pieces.append(logits)
    assert_close(torch.cat(pieces, 1), full, F32, "chunked logits")
    for name in ("att_shift", "ffn_shift", "wkv"):
        assert_close(getattr(state, name), getattr(full_state, name), F32, f"chunked state.{name}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("rescale_every", [0, 2])
def test_batched_prefill_equals_one_forward_per_row(dtype, rescale_every):
    """prefill_rows (one forward of the rows moved right, a pad's key -inf, no shift
    read from a pad) equals every row run alone over exactly its tokens: the wkv state,
    both token shifts, and the next token's logits from that state; the pads' values
    never matter; prosg.models.generation.prefill takes it."""
    model = random_model(num_hidden_layers=3, rescale_every=rescale_every, seed=8, dtype=dtype)
    lengths = [7, 1, 12, 4, 7]
    ids = torch.randint(0, 37, (len(lengths), 13), generator=torch.Generator().manual_seed(3))
    nxt = torch.randint(0, 37, (len(lengths), 1), generator=torch.Generator().manual_seed(4))
    check_prefill_rows(model, ids, lengths, nxt, dtype)


def test_logits_to_keep():
    model = random_model(seed=6)
    ids = torch.randint(0, 37, (2, 7))
    full, state = model(ids)
    last, state_last = model(ids, logits_to_keep=2)
    assert torch.equal(last, full[:, -2:])
    assert torch.equal(state_last.wkv, state.wkv)


def test_state_helpers():
    model = random_model(seed=7)
    prompt = torch.randint(0, 37, (1, 6))
    _, state = model(prompt)
    # One prefill continued by three samples = three prefills of the same prompt.
    cont = torch.randint(0, 37, (3, 4))
    logits, _ = model(cont, state=state.repeat(3))
    expected, _ = model(torch.cat([prompt.expand(3, -1), cont], 1))
    assert_close(logits, expected[:, -4:], F32, "repeated state")
    picked = state.repeat(3).index_select([2, 0])
    assert picked.batch_size == 2 and picked.num_layers == 3
    back = RWKV4State.from_hf(state.to_hf())
    assert all(torch.equal(getattr(back, n), getattr(state, n)) for n in ("att_shift", "ffn_shift", "wkv"))
    moved = state.to(torch.float64)
    assert moved.att_shift.dtype == F64 and moved.wkv.dtype == F64
    moved = state.to(torch.bfloat16)
    assert moved.att_shift.dtype == torch.bfloat16 and moved.wkv.dtype == F32
    zero = RWKV4State.zeros(3, 2, 24, 24)
    assert_close(model(cont[:2], state=zero)[0], model(cont[:2])[0], F32, "explicit zero state")


# ------------------------------------------------------------------------------ deltas


def _merged_logits(model, delta, ids, state=None):
    """Sample by sample, the model with that sample's delta merged into its weights."""
    rows = []
    for b in range(ids.shape[0]):
        s = state.index_select([b]) if state is not None else None
        rows.append(functional_call(model, merged_weights(model, delta, b), (ids[b:b + 1], s))[0])
    return torch.cat(rows)


@pytest.mark.parametrize("layers,rescale_every", [(1, 0), (3, 2)])
def test_delta_equals_merged_weights(layers, rescale_every):
    """Every sample carries its own deltas on all 7 matrix kinds of every layer, with
    per-module ranks and a non-unit scale; after a carried state and through the
    single-token path too."""
    model = random_model(num_hidden_layers=layers, hidden_size=20, attention_hidden_size=14, intermediate_size=44,
                         vocab_size=31, rescale_every=rescale_every, seed=8).to(F64)
    ranks = {name: 1 + i % 3 for i, name in enumerate(model.delta_shapes())}
    delta = random_delta(model, batch=3, rank=ranks, scale=0.7, seed=9)
    assert len(delta.factors) == 7 * layers
    ids = torch.randint(0, 31, (3, 6))
    with torch.no_grad():
        logits, state = model(ids, delta=delta)
        assert_close(logits, _merged_logits(model, delta, ids), F64, "delta logits (float64)")
        plain = model(ids)[0]
        assert (logits - plain).abs().max() > 0.05, "the delta should change the logits"
        for nxt in (torch.randint(0, 31, (3, 3)), torch.randint(0, 31, (3, 1))):
            expected = _merged_logits(model, delta, nxt, state)
            logits, state = model(nxt, state=state, delta=delta)
            assert_close(logits, expected, F64, f"delta logits after state (T={nxt.shape[1]})")
        # float32 run against the float64 dense reference.
        model32 = model.to(F32)
        delta32 = delta.to(F32)
        assert_close(model32(ids, delta=delta32)[0], _merged_logits(model, delta, ids), F32, "delta logits (float32)")


def test_delta_single_module_each_kind():
    """Each kind alone (so one kind's error cannot hide behind another's)."""
    model = random_model(num_hidden_layers=2, seed=10).to(F64)
    ids = torch.randint(0, 37, (2, 5))
    for name in model.delta_shapes():
        if not name.startswith("blocks.1."):
            continue
        delta = random_delta(model, batch=2, rank=3, names=[name], seed=11)
        with torch.no_grad():
            assert_close(model(ids, delta=delta)[0], _merged_logits(model, delta, ids), F64, f"delta on {name}")


def test_zero_delta_equals_no_delta():
    model = random_model(seed=12)
    ids = torch.randint(0, 37, (2, 6))
    delta = random_delta(model, batch=2, rank=2)
    zero = Delta({k: (torch.zeros_like(u), v) for k, (u, v) in delta.factors.items()})
    with torch.no_grad():
        assert_close(model(ids, delta=zero)[0], model(ids)[0], F32, "zero delta")
        assert_close(model(ids, delta={})[0], model(ids)[0], F32, "empty delta")
        rank0 = {k: (u[..., :0], v[..., :0]) for k, (u, v) in delta.factors.items()}
        assert_close(model(ids, delta=rank0)[0], model(ids)[0], F32, "rank-0 delta")


def test_plain_dict_delta_and_spellings():
    model = random_model(seed=13)
    ids = torch.randint(0, 37, (2, 4))
    delta = random_delta(model, batch=2, rank=2, names=["blocks.0.attention.key", "blocks.2.feed_forward.value"])
    as_dict = {"rwkv.blocks.0.attention.key.weight": delta.factors["blocks.0.attention.key"],
               "blocks.2.feed_forward.value": delta.factors["blocks.2.feed_forward.value"]}
    with torch.no_grad():
        assert torch.equal(model(ids, delta=as_dict)[0], model(ids, delta=delta)[0])


def test_delta_gradients_match_merged_reference():
    """Gradients reach U and V of every module through the fused paths and equal those
    of the dense merged-weight computation (float64); the initial state gets its own."""
    model = random_model(num_hidden_layers=2, hidden_size=12, intermediate_size=20, vocab_size=19,
                         rescale_every=1, seed=14).to(F64)
    delta = random_delta(model, batch=2, rank=2, scale=1.3, seed=15, requires_grad=True)
    ids = torch.randint(0, 19, (2, 5))
    _, state = model(torch.randint(0, 19, (2, 3)))
    state = RWKV4State(*(t.detach().requires_grad_() for t in (state.att_shift, state.ffn_shift, state.wkv)))
    weights = torch.randn(2, 5, 19, dtype=F64)

    logits, out_state = model(ids, state=state, delta=delta)
    loss = (logits * weights).sum() + out_state.wkv[:, :, :2].sum()
    params = delta.parameters() + [state.att_shift, state.ffn_shift, state.wkv]
    grads = torch.autograd.grad(loss, params)
    ref_loss = 0
    for b in range(2):
        sb = RWKV4State(state.att_shift[:, b:b + 1], state.ffn_shift[:, b:b + 1], state.wkv[:, b:b + 1])
        lb, stb = functional_call(model, merged_weights(model, delta, b), (ids[b:b + 1], sb))
        ref_loss = ref_loss + (lb * weights[b:b + 1]).sum() + stb.wkv[:, :, :2].sum()
    ref_grads = torch.autograd.grad(ref_loss, params)
    names = [f"{n}.{w}" for n in delta.factors for w in "UV"] + ["state.att_shift", "state.ffn_shift", "state.wkv"]
    for g, rg, name in zip(grads, ref_grads, names):
        assert g is not None and bool(g.abs().max() > 0), f"no gradient reached {name}"
        assert_close(g, rg, F64, f"grad {name}", atol=1e-9, rtol=1e-9)


def test_gradients_flow_in_float32_training_mode():
    model = random_model(seed=16).train()
    delta = random_delta(model, batch=2, rank=4, seed=17, requires_grad=True)
    logits, _ = model(torch.randint(0, 37, (2, 6)), delta=delta)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 37, (12,))).backward()
    for name, (U, V) in delta.factors.items():
        for which, t in (("U", U), ("V", V)):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().max() > 0, f"{name}.{which}"
    assert model.blocks[0].attention.time_decay.grad is not None


def test_device_matches_cpu_float64(device):
    """The whole model on ``device`` (float32 and bfloat16; CUDA has no float64 wkv4)
    against the CPU float64 dense reference: deltas, carried state, single-token step,
    greedy generation."""
    ref = random_model(num_hidden_layers=3, hidden_size=32, intermediate_size=72, vocab_size=61,
                       rescale_every=2, seed=33).to(F64)
    delta = random_delta(ref, batch=3, rank=4, scale=0.8, seed=34)
    ids, nxt = torch.randint(0, 61, (3, 7)), torch.randint(0, 61, (3, 1))
    with torch.no_grad():
        expected = _merged_logits(ref, delta, ids)
        _, ref_state = ref(ids, delta=delta)
        expected_next = _merged_logits(ref, delta, nxt, ref_state)
        for dtype in (F32, torch.bfloat16):
            model = random_model(num_hidden_layers=3, hidden_size=32, intermediate_size=72, vocab_size=61,
                                 rescale_every=2, seed=33).to_dtype(dtype).to(device)
            d = delta.to(device)
            tol = dict(atol=0.08, rtol=0.05) if dtype == torch.bfloat16 else {}
            logits, state = model(ids.to(device), delta=d)
            assert logits.device.type == device and state.wkv.dtype == F32
            assert_close(logits, expected, dtype, f"{device} {dtype} logits", **tol)
            logits, _ = model(nxt.to(device), state=state, delta=d)
            assert_close(logits, expected_next, dtype, f"{device} {dtype} single-token step", **tol)
        model = random_model(num_hidden_layers=3, hidden_size=32, intermediate_size=72, vocab_size=61,
                             rescale_every=2, seed=33).to(device)
        out = model.generate(ids.to(device), 6, delta.to(device, F32))
        assert torch.equal(out.cpu(), model.cpu().generate(ids, 6, delta.to("cpu", F32)))


# -------------------------------------------------------------------------- precision


def test_bfloat16_close_to_float32():
    """bfloat16 (time_decay/time_first kept float32 by to_dtype) against float32.
    Documented tolerance: |logits_bf16 - logits_f32| <= 0.08 + 0.05 |logits_f32| on
    unit-scale logits of a 4-layer model; the bf16 rounding of every activation
    (u = 2^-8) compounds over ~10 roundings per layer."""
    model = random_model(num_hidden_layers=4, hidden_size=64, intermediate_size=160, vocab_size=97,
                         rescale_every=2, seed=18)
    ids = torch.randint(0, 97, (2, 16))
    delta = random_delta(model, batch=2, rank=4, seed=19)
    with torch.no_grad():
        ref, ref_state = model(ids, delta=delta)
        bf = RWKV4LM.to_dtype(model, torch.bfloat16)
        assert bf.blocks[0].attention.time_decay.dtype == F32
        logits, state = bf(ids, delta=delta)  # float32 factors are cast on entry
        assert logits.dtype == torch.bfloat16 and state.wkv.dtype == F32
        assert_close(logits, ref, torch.bfloat16, "bf16 logits", atol=0.08, rtol=0.05)
        nxt = torch.randint(0, 97, (2, 1))
        assert_close(bf(nxt, state=state, delta=delta)[0], model.to(F32)(nxt, state=ref_state, delta=delta)[0],
                     torch.bfloat16, "bf16 decode step", atol=0.08, rtol=0.05)


# ------------------------------------------------------------------------- generation


def test_greedy_generate_matches_transformers(tmp_path):
    model = random_model(num_hidden_layers=3, hidden_size=16, vocab_size=43, rescale_every=2, seed=20)
    hf = hf_from_ours(model, tmp_path)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = torch.randint(0, 43, (3, 5))
    out = model.generate(prompt, max_new_tokens=12)  # the whole batch at once
    assert out.shape == (3, 17)
    for b in range(3):  # transformers one sample at a time (see the module docstring)
        with torch.no_grad():
            expected = hf.generate(prompt[b:b + 1], max_new_tokens=12, do_sample=False)
        assert torch.equal(out[b:b + 1], expected), f"sample {b}"


def test_stream_generate_equals_generate_and_stops():
    model = random_model(seed=21)
    prompt = torch.randint(0, 37, (3, 4))
    out = model.generate(prompt, max_new_tokens=10)
    steps = list(model.stream_generate(prompt, max_new_tokens=10))
    assert len(steps) == 10 and all(s.shape == (3,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), out[:, 4:])
    # Sample 0 stops at its third token; the others go on untouched.
    stop = int(out[0, 6])
    stopped = model.generate(prompt, max_new_tokens=10, stop_tokens=[stop])
    for b in range(3):
        row, ref = stopped[b, 4:], out[b, 4:]
        hits = (ref == stop).nonzero()
        if len(hits) == 0:
            assert torch.equal(row, ref)
        else:
            first = int(hits[0])
            assert torch.equal(row[: first + 1], ref[: first + 1]) and bool((row[first:] == stop).all())
    # Everyone stops: the rest is filled without further forwards.
    everything = list(range(37))
    filled = model.generate(prompt, max_new_tokens=6, stop_tokens=everything)
    assert torch.equal(filled[:, 4:], out[:, 4:5].expand(-1, 6))
    assert model.generate(prompt, max_new_tokens=0).shape == (3, 4)


def test_generate_with_per_sample_deltas_equals_merged():
    model = random_model(num_hidden_layers=2, seed=22)
    prompt = torch.randint(0, 37, (3, 5))
    delta = random_delta(model, batch=3, rank=2, strength=1.0, seed=23)
    out = model.generate(prompt, max_new_tokens=8, delta=delta)
    plain = model.generate(prompt, max_new_tokens=8)
    assert not torch.equal(out, plain), "the deltas should change some continuation"
    for b in range(3):
        single = random_model(num_hidden_layers=2, seed=22)
        with torch.no_grad():
            for key, value in merged_weights(model, delta, b).items():
                single.get_parameter(key).copy_(value)
        assert torch.equal(out[b:b + 1], single.generate(prompt[b:b + 1], max_new_tokens=8)), f"sample {b}"


def test_generate_continues_from_state():
    model = random_model(seed=24)
    prompt = torch.randint(0, 37, (2, 7))
    _, state = model(prompt[:, :4])
    assert torch.equal(model.generate(prompt[:, 4:], 5, state=state)[:, 3:], model.generate(prompt, 5)[:, 7:])


def test_sampling_filters_match_transformers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    from prosg.models import filter_logits

    logits = torch.randn(4, 50) * 3
    logits[0, :5] = 7.0  # ties at the k-th score
    for temperature, top_k, top_p in ((0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 7, 0.6), (1.0, 3, 0.01)):
        expected = logits.clone()
        if temperature != 1.0:
            expected = TemperatureLogitsWarper(temperature)(None, expected)
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(None, expected)
        ours = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(expected)), (temperature, top_k, top_p)
        finite = torch.isfinite(expected)
        assert_close(ours[finite], expected[finite], F32, "filtered scores")


def test_sampling_reproducible_and_degenerate_cases():
    model = random_model(seed=25)
    prompt = torch.randint(0, 37, (4, 3))
    a = model.generate(prompt, 8, do_sample=True, temperature=0.9, top_k=10, top_p=0.9,
                       generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, do_sample=True, temperature=0.9, top_k=10, top_p=0.9,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 8)
    assert torch.equal(model.generate(prompt, 8, do_sample=True, top_k=1, generator=torch.Generator()), greedy)
    assert torch.equal(model.generate(prompt, 8, do_sample=True, top_p=1e-6, generator=torch.Generator()), greedy)


# ------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_through_transformers(tmp_path):
    """ours -> files -> transformers (same logits) -> files -> ours (same weights)."""
    model = random_model(num_hidden_layers=3, hidden_size=16, vocab_size=23, rescale_every=2, seed=26)
    hf = hf_from_ours(model, tmp_path)
    # Saved before any eval forward: that forward divides transformers' weights in place.
    hf.save_pretrained(tmp_path / "back")
    ids = torch.randint(0, 23, (2, 6))
    assert_close(hf_logits(hf, ids), model(ids)[0], F32, "transformers on our files")
    again = RWKV4LM.from_pretrained(tmp_path / "back")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert again.config == model.config


def test_tied_embeddings_round_trip(tmp_path):
    model = random_model(tie_word_embeddings=True, seed=27)
    assert model.head.weight is model.embeddings.weight
    model.save_pretrained(tmp_path / "tied")
    again = RWKV4LM.from_pretrained(tmp_path / "tied")
    assert again.head.weight is again.embeddings.weight
    ids = torch.randint(0, 37, (1, 5))
    assert torch.equal(again(ids)[0], model(ids)[0])
    hf = RwkvForCausalLM.from_pretrained(tmp_path / "tied").eval()
    assert_close(hf_logits(hf, ids), model(ids)[0], F32, "tied: transformers on our files")


def test_pytorch_bin_and_dtype(tmp_path):
    model = random_model(seed=28)
    path = tmp_path / "bin"
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    state = {("head.weight" if k == "head.weight" else "rwkv." + k): v for k, v in model.state_dict().items()}
    torch.save(state, path / "pytorch_model.bin")
    again = RWKV4LM.from_pretrained(path, dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16 and again.blocks[1].attention.time_first.dtype == F32


def test_sharded_safetensors(tmp_path):
    import json

    from safetensors.torch import save_file

    model = random_model(seed=32)
    path = tmp_path / "sharded"
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    state = {("head.weight" if k == "head.weight" else "rwkv." + k): v.contiguous()
             for k, v in model.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(path / name), metadata={"format": "pt"})
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    again = RWKV4LM.from_pretrained(path)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_blinkdl_checkpoint_loads(tmp_path):
    model = random_model(num_hidden_layers=3, hidden_size=16, attention_hidden_size=12, intermediate_size=40,
                         vocab_size=29, rescale_every=6, seed=29)
    blink = to_blinkdl_state_dict(model)
    assert "blocks.1.att.time_mix_k" in blink and "blocks.0.ln0.weight" in blink and "emb.weight" in blink
    blink["blocks.1.att.time_decay"] = blink["blocks.1.att.time_decay"].reshape(1, 1, -1)  # squeezed/unsqueezed
    torch.save(blink, tmp_path / "RWKV-4-test.pth")
    loaded = RWKV4LM.from_blinkdl(tmp_path / "RWKV-4-test.pth")
    assert loaded.config == model.config
    ids = torch.randint(0, 29, (2, 5))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    # ... and on to transformers through our writer.
    loaded.save_pretrained(tmp_path / "converted")
    hf = RwkvForCausalLM.from_pretrained(tmp_path / "converted").eval()
    assert_close(hf_logits(hf, ids, use_cache=False), model(ids)[0], F32, "BlinkDL -> ours -> transformers")
    with pytest.raises(ValueError, match="read from the checkpoint"):
        RWKV4LM.from_blinkdl(tmp_path / "RWKV-4-test.pth", hidden_size=8)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        RWKV4LM.from_pretrained(tmp_path)
    model = random_model(seed=30)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        RWKV4LM.from_pretrained(tmp_path / "m")
    blink = to_blinkdl_state_dict(model)
    del blink["blocks.2.ffn.value.weight"]
    blink["blocks.2.extra"] = torch.zeros(3)
    torch.save(blink, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \['blocks.2.feed_forward.value.weight'\].*blocks.2.extra"):
        RWKV4LM.from_blinkdl(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="model_type"):
        RWKV4Config.from_dict({"model_type": "rwkv5"})


# -------------------------------------------------------------------------- bad input


def test_bad_inputs_have_clear_errors():
    model = random_model(seed=31)
    ids = torch.randint(0, 37, (2, 4))
    _, state = model(ids)
    delta = random_delta(model, batch=2, rank=2, names=["blocks.0.attention.key"])
    U, V = delta.factors["blocks.0.attention.key"]
    cases = [
        (dict(input_ids=ids[0]), ValueError, r"input_ids must have shape \[B, T\]"),
        (dict(input_ids=ids[:, :0]), ValueError, "T >= 1"),
        (dict(input_ids=ids.float()), ValueError, "token ids"),
        (dict(state=state.index_select([0])), ValueError, r"state.att_shift .*batch size 1 != 2"),
        (dict(state=RWKV4State(state.att_shift[:2], state.ffn_shift, state.wkv)), ValueError, "layers 2 != 3"),
        (dict(state=RWKV4State(state.att_shift, state.ffn_shift, state.wkv[..., :5])), ValueError,
         r"state.wkv must have shape \[3, 2, 3, 24\]"),
        (dict(state=state.to_hf()), TypeError, "RWKV4State.from_hf"),
        (dict(delta={"blocks.0.attention.query": (U, V)}), ValueError, "unknown module name 'blocks.0.attention.query'"),
        (dict(delta={"blocks.0.feed_forward.output": (U, V)}), ValueError, "unknown module name"),
        (dict(delta={"blocks.7.attention.key": (U, V)}), ValueError, "block 7, but the model has 3 blocks"),
        (dict(delta={"blocks.0.attention.key": (U[:1], V[:1])}), ValueError, r"U must have shape \[B=2, Dout=24"),
        (dict(delta={"blocks.0.attention.key": (U, V[:, :5])}), ValueError, r"V must have shape \[B=2, Din=24, r=2\]"),
        (dict(delta={"blocks.0.attention.key": (U, V[..., :1])}), ValueError, "V must have shape"),
        (dict(delta={"blocks.0.attention.key": U}), TypeError, "pair of tensors"),
        (dict(delta={"blocks.0.attention.key": (U, V), "rwkv.blocks.0.attention.key.weight": (U, V)}), ValueError,
         "given twice"),
        (dict(delta=[(U, V)]), TypeError, "delta must be"),
    ]
    for kwargs, error, match in cases:
        call = dict(input_ids=ids, **{k: v for k, v in kwargs.items() if k != "input_ids"})
        if "input_ids" in kwargs:
            call["input_ids"] = kwargs["input_ids"]
        with pytest.raises(error, match=match):
            model(**call)
    for kwargs, match in ((dict(max_new_tokens=-1), "max_new_tokens"),
                          (dict(max_new_tokens=2, do_sample=True, temperature=0.0), "temperature"),
                          (dict(max_new_tokens=2, do_sample=True, top_p=0.0), "top_p"),
                          (dict(max_new_tokens=2, do_sample=True, top_k=-1), "top_k"),
                          (dict(max_new_tokens=2, stop_tokens=[37]), "stop_tokens")):
        with pytest.raises(ValueError, match=match):
            model.generate(ids, **kwargs)
    with pytest.raises(ValueError, match="positive int"):
        RWKV4Config(hidden_size=0)


def test_fresh_initialisation_runs():
    config = tiny_config(num_hidden_layers=1, vocab_size=50)
    model = RWKV4LM(config).eval()
    logits, _ = model(torch.randint(0, 50, (2, 3)))
    assert torch.isfinite(logits).all()
    assert model.generate(torch.zeros(1, 1, dtype=torch.long), 3).shape == (1, 4)
