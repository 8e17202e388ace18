"""The batched-prefill check shared by both architectures' model tests."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

STATE_PARTS = ("wkv", "att_shift", "ffn_shift")


def check_prefill_rows(model, ids: torch.Tensor, lengths: list[int], nxt: torch.Tensor, dtype) -> None:
    """``prosg.models.generation.prefill`` (so ``model.prefill_rows``) of the rows of
    ``ids`` padded past ``lengths`` runs one forward and equals every row run alone over
    exactly its tokens: each state part, and the next token's (``nxt``) logits from that
    state. The pad value never matters (one outside the vocabulary, then a valid one), a
    length of 0 gets the empty state beside the others, and a bad length is refused."""
    from prosg.models.generation import prefill

    ids = ids.clone()
    for b, n in enumerate(lengths):
        ids[b, n:] = -1  # a pad id outside the vocabulary: never read into a state
    calls = []
    handle = model.blocks[0].attention.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        batched = prefill(model, ids, lengths)
    finally:
        handle.remove()
    assert len(calls) == 1, "one batched forward for all rows"
    assert all(bool(torch.isfinite(getattr(batched, n)).all()) for n in STATE_PARTS)
    with torch.no_grad():
        got_next, _ = model(nxt, state=batched)
        for b, n in enumerate(lengths):
            _, alone = model(ids[b:b + 1, :n])
            want_next, _ = model(nxt[b:b + 1], state=alone)
            for name in STATE_PARTS:
                assert_close(getattr(batched, name)[:, b], getattr(alone, name)[:, 0], dtype, f"row {b} {name}")
            assert_close(got_next[b], want_next[0], dtype, f"row {b} next logits")
    bad = [0] + list(lengths[1:])
    with pytest.raises(ValueError, match=f"lengths must be {len(lengths)} values in"):
        model.prefill_rows(ids, bad)
    ids[ids < 0] = 5
    mixed = prefill(model, ids, [lengths[0], 0] + list(lengths[2:]))
    empty = model.zero_state(1)
    for name in STATE_PARTS:
        torch.testing.assert_close(getattr(mixed, name)[:, 1], getattr(empty, name)[:, 0], rtol=0, atol=0)
    for b in [0] + list(range(2, len(lengths))):
        for name in STATE_PARTS:
            assert_close(getattr(mixed, name)[:, b], getattr(batched, name)[:, b], dtype, f"row {b} {name} beside "
                         "an empty row")
