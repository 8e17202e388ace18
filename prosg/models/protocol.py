"""What the generation loop and the ProSG method need from a model, written down once.

:func:`prosg.models.generation.generate` and everything in :mod:`prosg.method` (the
generator, its training, the evaluation) use a model only through
:class:`RecurrentLM`; :class:`prosg.models.RWKV4LM` implements it, and a model of
another RNN-like architecture that implements it runs under the same loop and method.
Nothing here is RWKV-4-specific: names of target matrices are the model's own
(``blocks.<i>.<part>.<kind>``), states are opaque objects with batch operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from prosg.models.state import Delta


@dataclass
class LayerInputs:
    """The normalised per-token inputs of every layer over a batch of sequences, with
    base weights (no delta), from the start of the sequence.

    Attributes:
        attention: ``[B, T, H]`` per layer: the input of layer ``l``'s token mixing
            (RWKV: the ``ln1`` output, before the token shift).
        feed_forward: ``[B, T, H]`` per layer: the input of its channel mixing (``ln2``).
        final: ``[B, T, H]``: the normalised hidden state the LM head reads (``ln_out``).
    """

    attention: list[Tensor]
    feed_forward: list[Tensor]
    final: Tensor


@runtime_checkable
class RecurrentState(Protocol):
    """A model's recurrent state after some tokens, for a batch: what the method
    gathers and scatters by sample. Concrete types (:class:`prosg.models.RWKV4State`)
    hold tensors whose second dimension is the batch."""

    @property
    def batch_size(self) -> int: ...

    def detach(self) -> "RecurrentState": ...

    def index_select(self, index: Tensor | list[int]) -> "RecurrentState": ...

    def index_copy_(self, index: Tensor, source: "RecurrentState") -> "RecurrentState": ...


@runtime_checkable
class RecurrentLM(Protocol):
    """An RNN-like language model with per-sample low-rank weight deltas.

    ``config`` has at least ``vocab_size``, ``hidden_size``, ``num_hidden_layers`` and
    ``to_dict()``; the model is an ``nn.Module`` (``parameters``, ``state_dict``,
    ``eval``). Every method checks its arguments with messages that name them.
    """

    config: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def __call__(self, input_ids: Tensor, state: RecurrentState | None = None, delta: Delta | dict | None = None,
                 *, logits_to_keep: int = 0) -> tuple[Tensor, RecurrentState]:
        """``(logits [B, T or logits_to_keep, V], state after the last token)``;
        continuing from a returned state equals one call over the concatenation."""
        ...

    def zero_state(self, batch: int) -> RecurrentState:
        """The state before any token (what ``state=None`` means)."""
        ...

    def prefill_rows(self, input_ids: Tensor, lengths: list[int]) -> RecurrentState:
        """The state after the first ``lengths[b]`` tokens (``1 <= lengths[b] <= P``)
        of each row of the right-padded ``input_ids [B, P]``, base weights, no delta,
        no gradient; no token past a row's length changes its state."""
        ...

    # The generation loop: checked once, then one unchecked step per token.

    def start_decoding(self, input_ids: Tensor, state: RecurrentState | None,
                       delta: Delta | dict | None) -> Any:
        """Checks ``input_ids [B, T]``, ``state`` and ``delta`` (batch B) and returns
        the model's own carried form of (state, delta) for :meth:`decode`."""
        ...

    def decode(self, input_ids: Tensor, carried: Any, *, logits_to_keep: int = 0) -> tuple[Tensor, Any]:
        """The forward of ``input_ids`` after ``carried`` (from :meth:`start_decoding`
        or an earlier :meth:`decode`) without re-checking it: ``(logits, carried)``."""
        ...

    # The ProSG method: the target matrices and what the generator reads.

    def delta_shapes(self) -> dict[str, tuple[int, int]]:
        """Every matrix a :class:`Delta` may modify, by name, with its ``(Dout, Din)``."""
        ...

    def layer_inputs(self, input_ids: Tensor) -> LayerInputs:
        """The normalised inputs of every layer at every position of ``input_ids``
        (from the empty state, base weights, no gradient to the model)."""
        ...

    def has_delta_input(self, name: str) -> bool:
        """Whether :meth:`delta_input` can rebuild the input of matrix ``name``."""
        ...

    def delta_input(self, name: str, inputs: LayerInputs) -> Tensor | None:
        """The input ``x_t [B, T, Din]`` of matrix ``name`` at every position, rebuilt
        from :meth:`layer_inputs` exactly as the forward computes it (base weights);
        None where it is not rebuilt (see :meth:`has_delta_input`)."""
        ...

    def writes_residual(self, name: str) -> bool:
        """Whether matrix ``name``'s output is added to the residual stream (its
        ``Dout`` is the hidden size and the LM head reads it directly)."""
        ...

    def output_embeddings(self) -> Tensor:
        """The LM head's weight ``[V, H]``: row ``v`` is what raises token ``v``'s logit."""
        ...
