"""prosg.method.evaluation: batched greedy responses, verification and aggregation."""

from __future__ import annotations

import json

import pytest
import torch

from prosg.data import MultiStageConfig, benchmark_tokenizer, generate_examples
from prosg.method.evaluation import (
    EvalRecord,
    aggregate,
    evaluate,
    format_result,
    generate_responses,
    repeat_prompt,
)
from prosg.models import Delta
from prosg.models.testing import random_delta, random_model

TOK = benchmark_tokenizer()
SMALL = MultiStageConfig(min_stages=2, max_stages=4, stage_length=5, ramble_length=7)


@pytest.fixture(scope="module")
def model():
    return random_model(vocab_size=TOK.vocab_size, hidden_size=24, num_hidden_layers=2, intermediate_size=40)


@pytest.fixture(scope="module")
def examples():
    return generate_examples(SMALL, 12, seed=3)


def _reference_records(examples, responses=None):
    responses = responses or [e.response for e in examples]
    return [EvalRecord(e.id, e.prompt, e.prompt, r, e.verify(r)) for e, r in zip(examples, responses)]


def test_oracle_is_fully_compliant(examples):
    """The reference responses score 100% everywhere; ramble is not a compliance stage."""
    res = aggregate(_reference_records(examples))
    assert res.overall["compliance"] == 1.0 and res.overall["exact_response"] == 1.0
    assert all(g["compliance"] == 1.0 for g in res.by_stage + res.by_distance)
    assert res.last_stage["compliance"] == 1.0 and res.last_stage["count"] == len(examples)
    n_recall = sum(s.op != "ramble" for e in examples for s in e.stages)
    assert res.overall["count"] == n_recall == sum(g["count"] for g in res.by_stage)
    assert sum(g["count"] for g in res.by_distance) == n_recall
    assert res.by_stage[0]["distance"] == 0.0


def test_aggregate_counts_a_broken_last_stage(examples):
    """Dropping each example's final span makes exactly the last stages non-compliant."""
    truncated = [e.response.rsplit("|", 1)[0] + " <eos>" for e in examples]
    res = aggregate(_reference_records(examples, truncated))
    assert res.last_stage["compliance"] == 0.0
    assert res.overall["exact_response"] == 0.0
    n_recall = res.overall["count"]
    assert res.overall["compliance"] == pytest.approx((n_recall - len(examples)) / n_recall)
    with pytest.raises(ValueError, match="distance_bin"):
        aggregate(_reference_records(examples), distance_bin=0)


def test_generate_responses_mixed_prompt_lengths_equal_one_by_one(model, examples):
    """Grouped prefill + batched decode gives each prompt its own greedy response."""
    prompts = [TOK.encode(e.prompt) for e in examples]
    assert len({len(p) for p in prompts}) > 2, "the test needs prompts of several lengths"
    limits = [3 + i for i in range(len(prompts))]
    batched = generate_responses(model, prompts, limits)
    for p, lim, got in zip(prompts, limits, batched):
        ids = torch.tensor([p])
        alone = model.generate(ids, lim, stop_tokens=[TOK.eos_id])[0, len(p):].tolist()
        if TOK.eos_id in alone:
            alone = alone[: alone.index(TOK.eos_id) + 1]
        assert got == alone
        assert len(got) <= lim


def test_generate_responses_checks_arguments(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate_responses(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_responses(model, [[1, 2]], [4, 5])


def test_evaluate_shapes_determinism_and_json(model, examples):
    a = evaluate(model, examples, batch_size=5)
    b = evaluate(model, examples, batch_size=12)
    assert [r.response for r in a.records] == [r.response for r in b.records]
    assert a.summary() == b.summary()
    assert [r.id for r in a.records] == [e.id for e in examples]
    assert len(a.by_stage) == max(len(e.stages) for e in examples)
    for r, e in zip(a.records, examples):
        n = len(r.response.split())
        assert n <= len(e.response.split()) + 8  # reference length + default margin
        assert len(r.verification.stages) == len(e.stages)
    json.dumps(a.to_dict())  # JSON-serialisable
    assert "stage" in format_result(a)
    assert not model.training


def test_delta_fn_gets_prompt_batches_and_changes_generation(model, examples):
    seen = []

    def zero_delta(batch):
        seen.append(batch)
        return {name: (torch.zeros(len(batch), o, 2), torch.zeros(len(batch), i, 2))
                for name, (o, i) in model.delta_shapes().items()}

    plain = evaluate(model, examples, batch_size=5)
    zero = evaluate(model, examples, batch_size=5, delta_fn=zero_delta)
    assert [r.response for r in zero.records] == [r.response for r in plain.records]
    assert [len(b) for b in seen] == [5, 5, 2]
    ids = {m["id"] for b in seen for m in b.meta}
    assert ids == {e.id for e in examples}
    for batch in seen:  # left-padded prompts: every row ends with <sep> at the last column
        assert bool((batch.prompt_ids[:, -1] == TOK.sep_id).all())

    def strong(batch):
        return random_delta(model, len(batch), rank=4, strength=3.0, seed=len(seen))

    perturbed = evaluate(model, examples, batch_size=5, delta_fn=strong)
    assert [r.response for r in perturbed.records] != [r.response for r in plain.records]


def test_delta_applies_from_the_last_prompt_token(model, examples):
    """The delta changes the logits that predict the first response token (they come
    from the <sep> position) but not the reading of the rest of the prompt."""
    p = TOK.encode(examples[0].prompt)
    delta = random_delta(model, 1, rank=3, strength=3.0, seed=1)
    got = generate_responses(model, [p], 4, delta=delta)[0]
    _, state = model(torch.tensor([p[:-1]]))
    want = model.generate(torch.tensor([p[-1:]]), 4, delta, state=state, stop_tokens=[TOK.eos_id])[0, 1:].tolist()
    if TOK.eos_id in want:
        want = want[: want.index(TOK.eos_id) + 1]
    assert got == want


def test_repeat_prompt_is_read_but_not_scored(model, examples):
    e = examples[0]
    assert repeat_prompt(e) == f"{e.prompt} {e.prompt}"
    res = evaluate(model, examples[:3], prompt_fn=repeat_prompt)
    for r, ex in zip(res.records, examples[:3]):
        assert r.model_prompt == repeat_prompt(ex) and r.prompt == ex.prompt


def test_evaluate_rejects_bad_arguments(model, examples):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, examples, batch_size=0)
    with pytest.raises(ValueError, match="margin"):
        evaluate(model, examples, margin=-1)
    small = random_model(vocab_size=37)
    with pytest.raises(ValueError, match="vocab_size"):
        evaluate(small, examples)


def test_empty_delta_object_is_accepted(model, examples):
    res = evaluate(model, examples[:2], delta_fn=lambda b: Delta({}))
    assert res.overall["examples"] == 2


def _greedy_after(model, ids: list[int], delta_from: int, delta) -> int:
    """The greedy next token after reading ``ids``, the delta applied from position
    ``delta_from`` on (one pass; the reference for forced_free_form_response)."""
    _, state = model(torch.tensor([ids[:delta_from]]))
    logits, _ = model(torch.tensor([ids[delta_from:]]), state=state, delta=delta)
    return int(logits[0, -1].argmax())


@pytest.mark.parametrize("with_delta", [False, True])
def test_forced_rambles_are_read_and_the_rest_is_greedy(model, with_delta):
    """forced_free_form_response: every ramble span in the response is the reference's,
    each other token is the greedy choice after everything before it (prompt, generated
    spans and read rambles), and without rambles it is the plain greedy response."""
    from prosg.method.evaluation import forced_free_form_response

    bench = MultiStageConfig(min_stages=3, max_stages=4, stage_length=4, ramble_length=9, ops=("repeat", "ramble"),
                             op_weights=(1.0, 2.0))
    pool = generate_examples(bench, 20, seed=5)
    examples = [e for e in pool if any(s.op == "ramble" for s in e.stages)][:3]
    examples += [e for e in pool if all(s.op != "ramble" for s in e.stages)][:1]  # nothing forced: all greedy
    assert len(examples) == 4
    delta = random_delta(model, 1, rank=2, strength=3.0, seed=2) if with_delta else None
    sep = TOK.token_to_id("|")
    for e in examples:
        p = TOK.encode(e.prompt)
        out = forced_free_form_response(model, p, e, delta=delta, margin=2)
        ref = TOK.encode(e.response)
        ids = p + out
        forced = set()
        pos = 0  # where each span starts in `out`
        for k, st in enumerate(e.stages):
            if pos >= len(out) or (pos > 0 and out[pos - 1] == TOK.eos_id):
                break  # the model ended the response
            if st.op == "ramble":
                assert out[pos: pos + st.length] == ref[st.distance: st.distance + st.length]
                forced.update(range(pos, pos + st.length + 1))
                pos += st.length + 1
            else:
                span = out[pos: pos + st.length + 2]  # the span's budget: length + margin
                closed = [j for j, t in enumerate(span) if t in (sep, TOK.eos_id)]
                if closed:
                    pos += closed[0] + 1
                else:
                    pos += len(span)
                    if pos < len(out) and k + 1 < len(e.stages) and e.stages[k + 1].op == "ramble":
                        assert out[pos] == sep  # read, to keep the spans aligned
                        forced.add(pos)
                        pos += 1
        for j in range(len(out)):
            if j not in forced:
                assert out[j] == _greedy_after(model, ids[: len(p) + j], len(p) - 1, delta), (e.prompt, j)
    with pytest.raises(ValueError, match="tagged"):
        tagged = generate_examples(MultiStageConfig(min_stages=2, max_stages=2, stage_length=3, tag_stages=True), 1,
                                   seed=0)[0]
        forced_free_form_response(model, TOK.encode(tagged.prompt), tagged)
