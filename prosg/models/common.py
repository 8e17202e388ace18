"""What the RWKV-4 and RWKV-7 model layers share: the token shift, projections that
carry a per-sample delta, the checking and sorting of a :class:`Delta` by layer, the
collection of the per-layer normalised inputs the ProSG generator reads, and the
model class they both derive from (:class:`RWKVLanguageModel`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.models.checks import check_count, check_input_ids, check_model_dtype
from prosg.models.protocol import LayerInputs
from prosg.models.state import Delta, parse_delta_name
from prosg.numerics import accumulation_dtype
from prosg.ops import lowrank_linear

LowRank = tuple[Tensor, Tensor]


#: Rows up to which the CPU's decoding projections run prosg's own kernel
#: (``lowrank_linear``'s small-batch path): must equal ``kBaseMaxRows`` in
#: csrc/lowrank_linear/lowrank_linear.h, or a projection without a delta and one with
#: a zero delta would take different GEMMs for the rows in between (no test can see
#: the C++ constant; keep the two in step by hand).
SMALL_BATCH_ROWS = 16


def runs_small_batch_kernel(x: Tensor) -> bool:
    """Whether ``x @ W^T`` over at most SMALL_BATCH_ROWS float32 rows on the CPU (a
    decoding step) runs through ``lowrank_linear``, which has its own kernel there:
    MKL's single-thread GEMV and small-M GEMM leave memory bandwidth unused on some
    CPUs (benchmarks/RESULTS.md). A projection without a delta then computes exactly
    what one with a zero delta does."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] > 0
            and x.numel() // x.shape[-1] <= SMALL_BATCH_ROWS)


def project(x: Tensor, weight: Tensor, uv: LowRank | None, scale: float) -> Tensor:
    """``x @ W^T``, plus ``scale * (x @ V_b) @ U_b^T`` when the module carries a delta."""
    if uv is None:
        return lowrank_linear(x, weight) if runs_small_batch_kernel(x) else F.linear(x, weight)
    return lowrank_linear(x, weight, None, uv[0], uv[1], scale)


def takes_fused_step(module: nn.Module, x: Tensor, delta: dict[str, LowRank], *states: Tensor | None) -> bool:
    """Whether a single token takes the fused decode-step op: it has no backward, so
    only when nothing needs a gradient (generation runs under no_grad): not x, the
    parameters, the deltas, nor the carried states (a learned initial state)."""
    if x.dim() != 2:
        return False
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or any(p.requires_grad for p in module.parameters())
                or any(t.requires_grad for uv in delta.values() for t in uv)
                or any(s is not None and s.requires_grad for s in states))


def batch_hint(t: Tensor, batch: int) -> str:
    if t.dim() == 3 and t.shape[0] != batch:
        return f" (batch size {t.shape[0]}, but input_ids has batch size {batch})"
    return ""


def last_token(x: Tensor, last: Tensor | None = None) -> Tensor:
    """The vector of each row's last token: ``x`` itself for one token (``[B, H]``),
    ``x[:, -1]`` for a sequence, or ``x[b, last[b]]`` with ``last`` (``[B]``)."""
    if x.dim() == 2:
        return x
    if last is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), last]


def token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """The previous token's vector at every position: ``[prev, x_0, ..., x_{T-2}]``
    (zeros before the first token of a sequence without state). A single token
    (``x`` of ``[B, H]``) needs no copy at all."""
    if x.dim() == 2:
        return prev if prev is not None else torch.zeros_like(x)
    if prev is None:
        return F.pad(x[:, :-1], (0, 0, 1, 0))
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], 1)


def resolve_delta(model: nn.Module, delta: Delta | dict | None, batch: int,
                  kinds: dict[str, tuple[str, ...]] | None = None) -> tuple[list[dict], list[dict], float] | None:
    """Validates ``delta`` for ``model`` (its ``blocks[i].<part>.<kind>.weight`` shapes,
    batch ``batch``, its device) and sorts its factors by layer: ``(attention deltas per
    layer, feed-forward deltas per layer, scale)`` in the activation dtype, or None for
    no delta. ``kinds``: the model's matrices by part (None: RWKV-4's, with its names in
    the messages)."""
    delta = Delta.coerce(delta)
    if delta is None or not delta.factors:
        return None
    if isinstance(delta.scale, bool) or not isinstance(delta.scale, (int, float)):
        raise TypeError(f"delta.scale must be a float, got {type(delta.scale)}")
    if not math.isfinite(delta.scale):
        raise ValueError(f"delta.scale must be finite, got {delta.scale}")
    L = model.config.num_hidden_layers
    per_layer: dict[str, list[dict]] = {"attention": [{} for _ in range(L)], "feed_forward": [{} for _ in range(L)]}
    act = model.dtype
    for name, uv in delta.factors.items():
        if not isinstance(name, str):
            raise TypeError(f"delta: module names must be str, got {name!r} ({type(name).__name__})")
        layer, part, kind = parse_delta_name(name, kinds)
        if layer >= L:
            raise ValueError(f"delta: module {name!r} refers to block {layer}, but the model has {L} blocks")
        if not isinstance(uv, (tuple, list)) or len(uv) != 2 or not all(isinstance(t, Tensor) for t in uv):
            raise TypeError(f"delta[{name!r}] must be a pair of tensors (U [B, Dout, r], V [B, Din, r])")
        U, V = uv
        d_out, d_in = getattr(getattr(model.blocks[layer], part), kind).weight.shape
        r = U.shape[-1] if U.dim() == 3 else -1
        # B is input_ids' batch size: one delta per sample, no broadcasting.
        if U.dim() != 3 or tuple(U.shape) != (batch, d_out, r):
            raise ValueError(f"delta[{name!r}]: U must have shape [B={batch}, Dout={d_out}, r], "
                             f"got {list(U.shape)}{batch_hint(U, batch)}")
        if tuple(V.shape) != (batch, d_in, r):
            raise ValueError(f"delta[{name!r}]: V must have shape [B={batch}, Din={d_in}, r={r}], "
                             f"got {list(V.shape)}{batch_hint(V, batch)}")
        for which, t in (("U", U), ("V", V)):
            if not t.is_floating_point():
                raise ValueError(f"delta[{name!r}]: {which} must be floating point, got {t.dtype}")
            if t.device != model.device:
                raise ValueError(f"delta[{name!r}]: {which} is on {t.device} but the model is on {model.device}")
        target = per_layer[part][layer]
        if kind in target:
            raise ValueError(f"delta: module {name!r} is given twice (under two spellings)")
        if r == 0:
            continue  # a rank-0 delta is no change at all
        # The kernels want the factors in the activation dtype; the cast is
        # differentiable, so gradients still reach float32 factors.
        target[kind] = (U.to(act), V.to(act))
    return per_layer["attention"], per_layer["feed_forward"], float(delta.scale)


@torch.no_grad()
def hooked_layer_inputs(model: nn.Module, input_ids: Tensor) -> LayerInputs:
    """Every block's ``ln1`` / ``ln2`` outputs and ``ln_out``'s, ``[B, T, H]`` each,
    over ``input_ids`` from the empty state, collected with forward hooks on those
    LayerNorms (removed afterwards), so the forward is the one the model runs."""
    ln1: dict[int, Tensor] = {}
    ln2: dict[int, Tensor] = {}
    final: list[Tensor] = []

    def keep(store, key):
        def hook(_module, _inputs, output):
            store[key] = output
        return hook

    handles = []
    try:
        for i, block in enumerate(model.blocks):
            handles.append(block.ln1.register_forward_hook(keep(ln1, i)))
            handles.append(block.ln2.register_forward_hook(keep(ln2, i)))
        handles.append(model.ln_out.register_forward_hook(lambda _m, _i, o: final.append(o)))
        model(input_ids)
    finally:
        for h in handles:
            h.remove()

    def as3(t: Tensor) -> Tensor:  # a one-token input runs on [B, H] tensors
        return t.unsqueeze(1) if t.dim() == 2 else t

    L = len(model.blocks)
    return LayerInputs([as3(ln1[i]) for i in range(L)], [as3(ln2[i]) for i in range(L)], as3(final[-1]))


@dataclass
class Carried:
    """What generation carries between tokens: the state as per-layer lists
    (``att_shift``, ``ffn_shift``, ``wkv``) and the delta sorted by layer."""

    layers: tuple[list, list, list] | None
    deltas: tuple[list[dict], list[dict], float] | None


class RWKVLanguageModel(nn.Module):
    """The part of :class:`prosg.models.RWKV4LM` and :class:`prosg.models.RWKV7LM` that
    does not depend on the generation: the basics, the checked forward, the generation
    seam of :class:`prosg.models.protocol.RecurrentLM` and the generation methods.

    A subclass has ``config``, ``embeddings``, ``blocks`` (each with ``ln1``, ``ln2``,
    ``attention``, ``feed_forward``), ``ln_out`` and ``head``, and provides
    ``_state_shapes(batch) -> {field: shape}``, ``_forward(input_ids, layers, deltas,
    logits_to_keep) -> (logits, layers)`` and the class attributes below."""

    #: The state class :meth:`forward` returns.
    STATE: type = None
    #: The matrices that can carry a delta, by part (None: RWKV-4's, see parse_delta_name).
    DELTA_KINDS: dict[str, tuple[str, ...]] | None = None
    #: Parameter names (last component) that :meth:`to_dtype` keeps in float32.
    FLOAT32_PARAMETERS: tuple[str, ...] = ()
    #: Appended to the error for a state of another type.
    _STATE_HINT = ""

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the embedding)."""
        return self.embeddings.weight.dtype

    def to_dtype(self, dtype: torch.dtype):
        """Casts the model to ``dtype``, keeping :attr:`FLOAT32_PARAMETERS` in float32
        for 16-bit dtypes (the decay compounds over every token; 8 mantissa bits are too
        few for it). ``model.to(dtype)`` casts everything."""
        check_model_dtype(dtype, "to_dtype: dtype")
        keep = dtype in (torch.float16, torch.bfloat16)
        for name, p in self.named_parameters():
            target = torch.float32 if keep and name.rsplit(".", 1)[-1] in self.FLOAT32_PARAMETERS else dtype
            p.data = p.data.to(target)
        return self

    # ------------------------------------------------------------------ forward

    def _check_lengths(self, input_ids: Tensor, lengths: list[int]) -> list[int]:
        lengths = [int(n) for n in lengths]
        if len(lengths) != input_ids.shape[0] or any(n < 1 or n > input_ids.shape[1] for n in lengths):
            raise ValueError(f"prefill_rows: lengths must be {input_ids.shape[0]} values in [1, "
                             f"{input_ids.shape[1]}], got {lengths}")
        return lengths

    @torch.no_grad()
    def prefill_rows(self, input_ids: Tensor, lengths: list[int]):
        """The state after the first ``lengths[b]`` tokens of each row of the
        right-padded ``input_ids [B, P]`` (the protocol's ``prefill_rows``): one forward
        per distinct length, the rows of that length as one batch."""
        lengths = self._check_lengths(input_ids, lengths)
        state = self.zero_state(len(lengths))
        for n in sorted(set(lengths)):
            rows = torch.tensor([b for b, m in enumerate(lengths) if m == n], dtype=torch.long, device=self.device)
            _, s = self(input_ids.index_select(0, rows)[:, :n], logits_to_keep=1)
            state.index_copy_(rows, s)
        return state

    def forward(self, input_ids: Tensor, state=None, delta: Delta | dict | None = None, *,
                logits_to_keep: int = 0):
        """Runs ``input_ids [B, T]`` after ``state`` (None: start of sequence).

        Args:
            input_ids: ``[B, T]`` token ids, ``T >= 1``.
            state: the state returned by an earlier call (:attr:`STATE`); the sequence
                continues from it exactly (a prompt run in chunks equals one call).
            delta: per-sample weight deltas (:class:`Delta` or ``{name: (U, V)}``) with
                batch ``B``; the result equals running sample ``b`` with the weights
                ``W + scale * U_b V_b^T``.
            logits_to_keep: an int ``>= 0``. 0 returns the logits of every position;
                ``n > 0`` only those of the last ``min(n, T)`` (what generation needs:
                the head over a large vocabulary dominates a long prefill otherwise).
                Negative values are refused (a slice ``-n:`` would silently drop the
                first ``n`` positions instead).

        Returns:
            ``(logits [B, T or n, vocab], state after the last token)``.
        """
        logits_to_keep = check_count(logits_to_keep, "logits_to_keep")
        self._check_input_ids(input_ids)
        batch = input_ids.shape[0]
        layers = self._check_state(state, batch)
        deltas = self._resolve_delta(delta, batch)
        logits, (att, ffn, wkv) = self._forward(input_ids, layers, deltas, logits_to_keep)
        return logits, self.STATE(torch.stack(att), torch.stack(ffn), torch.stack(wkv))

    def _check_input_ids(self, input_ids: Tensor) -> None:
        check_input_ids(input_ids, self.config.vocab_size, self.device)

    def _check_state(self, state, batch: int) -> tuple[list, list, list] | None:
        """Validates a state and splits it into per-layer lists. Shift vectors of
        another floating dtype are cast to the activation dtype and a float64 WKV state
        to float32 (as deltas are cast); a non-floating state never reaches here (the
        state classes refuse it)."""
        if state is None:
            return None
        if not isinstance(state, self.STATE):
            raise TypeError(f"state must be a prosg.models.{self.STATE.__name__} (as returned by the model), "
                            f"got {type(state)}{self._STATE_HINT}")
        for name, shape in self._state_shapes(batch).items():
            t = getattr(state, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"state.{name} must be a Tensor, got {type(t)}")
            if tuple(t.shape) != shape:
                what = {0: "layers", 1: "batch size"}
                hint = "".join(f" ({what[d]} {t.shape[d]} != {shape[d]})" for d in (0, 1)
                               if t.dim() > d and t.shape[d] != shape[d])
                if t.dim() > 1 and t.shape[1] != batch:
                    hint += f"; the batch size is input_ids' ({batch})"
                raise ValueError(f"state.{name} must have shape {list(shape)} (layers, batch, ...), "
                                 f"got {list(t.shape)}{hint}")
            if t.device != self.device:
                raise ValueError(f"state.{name} is on {t.device} but the model is on {self.device}")
            # Re-checked here: the fields of a dataclass can be reassigned after
            # construction, and an integer state would be cast to garbage silently.
            if not t.is_floating_point():
                raise TypeError(f"state.{name} must be floating point, got {t.dtype}")
        act = self.dtype
        return (list(state.att_shift.to(act).unbind(0)), list(state.ffn_shift.to(act).unbind(0)),
                list(state.wkv.to(accumulation_dtype(act)).unbind(0)))

    def _resolve_delta(self, delta: Delta | dict | None,
                       batch: int) -> tuple[list[dict], list[dict], float] | None:
        """Validates a delta and sorts its factors by layer: ``(attention deltas per
        layer, feed-forward deltas per layer, scale)``, or None for no delta."""
        return resolve_delta(self, delta, batch, self.DELTA_KINDS)

    def _logits(self, h: Tensor, single: bool, logits_to_keep: int) -> Tensor:
        """``ln_out`` and the head over the last block's output ``h`` (``[B, T, H]``, or
        ``[B, H]`` for one token): logits ``[B, T or logits_to_keep, V]``."""
        if logits_to_keep and not single:
            h = h[:, -logits_to_keep:]
        h = self.ln_out(h)
        if runs_small_batch_kernel(h):
            logits = lowrank_linear(h, self.head.weight)
        elif single and h.shape[0] > 1 and h.device.type == "cpu":
            # Decoding a batch the kernel above does not take (16-bit, or more rows):
            # MKL's sgemm runs the transposed problem W @ x^T of a tall head faster
            # than x [B, H] @ W^T (benchmarks/bench_design.py, RESULTS.md).
            logits = torch.mm(self.head.weight, h.t()).t()
        else:
            logits = F.linear(h, self.head.weight)
        return logits.unsqueeze(1) if single else logits

    # ------------------------------------------------------------------ the generation seam

    def start_decoding(self, input_ids: Tensor, state, delta: Delta | dict | None) -> Carried:
        """Checks the arguments of a generation once; :meth:`decode` then steps
        without re-checking (per token, the checks would cost more than the step)."""
        self._check_input_ids(input_ids)
        batch = input_ids.shape[0]
        return Carried(self._check_state(state, batch), self._resolve_delta(delta, batch))

    def decode(self, input_ids: Tensor, carried: Carried, *, logits_to_keep: int = 0) -> tuple[Tensor, Carried]:
        logits, layers = self._forward(input_ids, carried.layers, carried.deltas, logits_to_keep)
        return logits, Carried(layers, carried.deltas)

    # ------------------------------------------------------------------ what the method reads

    def layer_inputs(self, input_ids: Tensor) -> LayerInputs:
        """Every block's ``ln1`` / ``ln2`` outputs and ``ln_out``'s, ``[B, T, H]``
        each, over ``input_ids`` from the empty state (base weights)."""
        return hooked_layer_inputs(self, input_ids)

    def writes_residual(self, name: str) -> bool:
        _, part, kind = parse_delta_name(name, self.DELTA_KINDS)
        return (part, kind) in (("attention", "output"), ("feed_forward", "value"))

    def output_embeddings(self) -> Tensor:
        return self.head.weight

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids: Tensor, max_new_tokens: int, delta: Delta | dict | None = None, *,
                 state=None, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None,
                 stop_tokens: int | list[int] | Tensor | None = None) -> Tensor:
        """Generates ``max_new_tokens`` tokens after ``input_ids`` for the whole batch.

        Returns ``[B, T + max_new_tokens]`` ids, the prompt included (as transformers'
        ``generate``). Greedy unless ``do_sample``; sampling applies temperature, then
        top-k, then top-p (transformers' order and semantics). A sample that emits one of
        ``stop_tokens`` is finished: its remaining positions repeat that stop token,
        and generation ends early (same output shape) once every sample has finished.
        ``state`` continues an earlier call (``input_ids`` then follows it).

        Every argument is checked before the first forward: ``stop_tokens`` are int
        token ids (an int, a sequence of ints or an integer tensor; floats are refused,
        not truncated); temperature / top_k / top_p must be valid even when greedy (and
        warn that they have no effect then). Logits that turn NaN or infinite raise
        :class:`prosg.models.NonFiniteLogitsError` naming the step and the batch rows.
        See :func:`prosg.models.generation.stream_generate`.
        """
        from prosg.models.generation import generate

        return generate(self, input_ids, max_new_tokens, delta, state=state, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                        stop_tokens=stop_tokens)

    def stream_generate(self, input_ids: Tensor, max_new_tokens: int, delta: Delta | dict | None = None, *,
                        state=None, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, generator: torch.Generator | None = None,
                        stop_tokens: int | list[int] | Tensor | None = None) -> Iterator[Tensor]:
        """Like :meth:`generate`, yielding the ``[B]`` new tokens of each step as they
        are produced (the prompt is not yielded)."""
        from prosg.models.generation import stream_generate

        return stream_generate(self, input_ids, max_new_tokens, delta, state=state, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                               stop_tokens=stop_tokens)
