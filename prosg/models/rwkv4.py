"""RWKV-4 language model with per-sample low-rank weight deltas.

The arithmetic is transformers' ``RwkvForCausalLM`` (``modeling_rwkv.py``) step for
step: embedding, ``pre_ln`` on block 0, then per block a time-mix (token shift,
key/value/receptance projections, the WKV recurrence, the receptance gate, the
output projection) and a channel-mix (token shift, squared-ReLU key, value, receptance
gate), ``ln_out`` and the head. Parameter names are transformers' without the
``rwkv.`` prefix, so state dicts map one to one.

What differs is how a batch can carry per-sample weight deltas (see :class:`Delta`):
the key and value deltas of the time-mix are fused into the WKV kernel
(``prosg.ops.wkv4`` forms ``k + z @ U^T`` on the fly from ``z = x @ V``), every other
delta goes through ``prosg.ops.lowrank_linear``; no per-sample weight is ever formed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.models.checks import check_count, check_model_dtype
from prosg.models.config import RWKV4Config
from prosg.models.protocol import LayerInputs
from prosg.models.state import ATTENTION_KINDS, FEED_FORWARD_KINDS, Delta, RWKV4State, parse_delta_name
from prosg.numerics import EMPTY_MAX, accumulation_dtype
from prosg.ops import lowrank_linear, rwkv4_channel_mix_step, rwkv4_time_mix_step, wkv4

LowRank = tuple[Tensor, Tensor]

def _wkv(time_decay: Tensor, time_first: Tensor, key: Tensor, value: Tensor, state: Tensor | None,
         key_lowrank: LowRank | None, value_lowrank: LowRank | None) -> tuple[Tensor, Tensor]:
    return wkv4(time_decay, time_first, key, value, state, key_lowrank, value_lowrank)


def _project(x: Tensor, weight: Tensor, uv: LowRank | None, scale: float) -> Tensor:
    """``x @ W^T``, plus ``scale * (x @ V_b) @ U_b^T`` when the module carries a delta."""
    if uv is None:
        return F.linear(x, weight)
    return lowrank_linear(x, weight, None, uv[0], uv[1], scale)


def _fused_factor(x: Tensor, uv: LowRank | None, scale: float) -> LowRank | None:
    """``(scale * x @ V_b, U_b)``: the delta's contribution ``(x @ V_b) @ U_b^T`` to a
    key or value projection, in the form prosg.ops.wkv4 adds inside the recurrence, so
    the perturbed key/value is never written. ``x`` is ``[B, T, Din]`` or ``[B, Din]``."""
    if uv is None:
        return None
    U, V = uv
    z = torch.bmm(x if x.dim() == 3 else x.unsqueeze(1), V)
    return (z if scale == 1.0 else z * scale), U


def _fused_step(module: nn.Module, x: Tensor, delta: dict[str, LowRank], *states: Tensor | None) -> bool:
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


def _batch_hint(t: Tensor, batch: int) -> str:
    if t.dim() == 3 and t.shape[0] != batch:
        return f" (batch size {t.shape[0]}, but input_ids has batch size {batch})"
    return ""


def token_shift(x: Tensor, prev: Tensor | None) -> Tensor:
    """The previous token's vector at every position: ``[prev, x_0, ..., x_{T-2}]``
    (zeros before the first token of a sequence without state). A single token
    (``x`` of ``[B, H]``) needs no copy at all."""
    if x.dim() == 2:
        return prev if prev is not None else torch.zeros_like(x)
    if prev is None:
        return F.pad(x[:, :-1], (0, 0, 1, 0))
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], 1)


class RWKV4TimeMix(nn.Module):
    """Time-mixing (transformers' ``RwkvSelfAttention``)."""

    def __init__(self, config: RWKV4Config, layer_id: int):
        super().__init__()
        H, C = config.hidden_size, config.attention_hidden_size
        self.layer_id = layer_id
        self.time_decay = nn.Parameter(torch.empty(C))
        self.time_first = nn.Parameter(torch.empty(C))
        self.time_mix_key = nn.Parameter(torch.empty(1, 1, H))
        self.time_mix_value = nn.Parameter(torch.empty(1, 1, H))
        self.time_mix_receptance = nn.Parameter(torch.empty(1, 1, H))
        self.key = nn.Linear(H, C, bias=False)
        self.value = nn.Linear(H, C, bias=False)
        self.receptance = nn.Linear(H, C, bias=False)
        self.output = nn.Linear(C, H, bias=False)

    def forward(self, x: Tensor, prev: Tensor | None, wkv_state: Tensor | None, delta: dict[str, LowRank],
                scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """``x``: the ``ln1`` output, ``[B, T, H]`` or ``[B, H]`` for one token.
        Returns ``(output, x of the last token, WKV state)``."""
        if _fused_step(self, x, delta, prev, wkv_state):
            if wkv_state is None:
                wkv_state = torch.zeros(x.shape[0], 3, self.time_decay.shape[0], dtype=accumulation_dtype(x.dtype),
                                        device=x.device)
                wkv_state[:, 2] = EMPTY_MAX
            out, wkv_state = rwkv4_time_mix_step(
                x, prev if prev is not None else torch.zeros_like(x), wkv_state, self.time_mix_key,
                self.time_mix_value, self.time_mix_receptance, self.time_decay, self.time_first, self.key.weight,
                self.value.weight, self.receptance.weight, self.output.weight,
                [delta.get(kind) for kind in ATTENTION_KINDS], scale)
            return out, x, wkv_state
        shifted = token_shift(x, prev)
        # lerp(a, b, m) = a + m (b - a): HF's x m + shifted (1 - m) in one kernel.
        xk = torch.lerp(shifted, x, self.time_mix_key.view(-1))
        xv = torch.lerp(shifted, x, self.time_mix_value.view(-1))
        xr = torch.lerp(shifted, x, self.time_mix_receptance.view(-1))
        key = F.linear(xk, self.key.weight)
        value = F.linear(xv, self.value.weight)
        receptance = torch.sigmoid(_project(xr, self.receptance.weight, delta.get("receptance"), scale))
        single = x.dim() == 2
        if single:
            key, value = key.unsqueeze(1), value.unsqueeze(1)
        out, wkv_state = _wkv(self.time_decay, self.time_first, key, value, wkv_state,
                              _fused_factor(xk, delta.get("key"), scale), _fused_factor(xv, delta.get("value"), scale))
        if single:
            out = out.squeeze(1)
        out = _project(receptance * out, self.output.weight, delta.get("output"), scale)
        return out, (x if single else x[:, -1]), wkv_state


class RWKV4ChannelMix(nn.Module):
    """Channel-mixing (transformers' ``RwkvFeedForward``)."""

    def __init__(self, config: RWKV4Config, layer_id: int):
        super().__init__()
        H, F_ = config.hidden_size, config.intermediate_size
        self.layer_id = layer_id
        self.time_mix_key = nn.Parameter(torch.empty(1, 1, H))
        self.time_mix_receptance = nn.Parameter(torch.empty(1, 1, H))
        self.key = nn.Linear(H, F_, bias=False)
        self.receptance = nn.Linear(H, H, bias=False)
        self.value = nn.Linear(F_, H, bias=False)

    def forward(self, x: Tensor, prev: Tensor | None, delta: dict[str, LowRank],
                scale: float) -> tuple[Tensor, Tensor]:
        """``x``: the ``ln2`` output. Returns ``(output, x of the last token)``."""
        if _fused_step(self, x, delta, prev):
            out = rwkv4_channel_mix_step(
                x, prev if prev is not None else torch.zeros_like(x), self.time_mix_key, self.time_mix_receptance,
                self.key.weight, self.receptance.weight, self.value.weight,
                [delta.get(kind) for kind in FEED_FORWARD_KINDS], scale)
            return out, x
        shifted = token_shift(x, prev)
        xk = torch.lerp(shifted, x, self.time_mix_key.view(-1))
        xr = torch.lerp(shifted, x, self.time_mix_receptance.view(-1))
        key = torch.square(torch.relu(_project(xk, self.key.weight, delta.get("key"), scale)))
        value = _project(key, self.value.weight, delta.get("value"), scale)
        receptance = torch.sigmoid(_project(xr, self.receptance.weight, delta.get("receptance"), scale))
        return receptance * value, (x if x.dim() == 2 else x[:, -1])


class RWKV4Block(nn.Module):
    def __init__(self, config: RWKV4Config, layer_id: int):
        super().__init__()
        H, eps = config.hidden_size, config.layer_norm_epsilon
        self.layer_id = layer_id
        if layer_id == 0:
            self.pre_ln = nn.LayerNorm(H, eps=eps)
        self.ln1 = nn.LayerNorm(H, eps=eps)
        self.ln2 = nn.LayerNorm(H, eps=eps)
        self.attention = RWKV4TimeMix(config, layer_id)
        self.feed_forward = RWKV4ChannelMix(config, layer_id)


@dataclass
class _Carried:
    """What generation carries between tokens: the state as per-layer lists
    (``att_shift``, ``ffn_shift``, ``wkv``) and the delta sorted by layer."""

    layers: tuple[list, list, list] | None
    deltas: tuple[list[dict], list[dict], float] | None


class RWKV4LM(nn.Module):
    """RWKV-4 causal language model: ``model(input_ids, state, delta) -> (logits, state)``.

    Load weights with :meth:`from_pretrained` (a transformers checkpoint directory) or
    :meth:`from_blinkdl` (a BlinkDL ``.pth``); write them with :meth:`save_pretrained`.
    ``RWKV4LM(config)`` initialises fresh weights the way RWKV-4 training does;
    ``init=False`` leaves them uninitialised (for loaders that assign every tensor).

    Rescaling: as in transformers, eval mode with ``config.rescale_every > 0`` halves
    the residual stream after every ``rescale_every`` blocks and scales the attention
    output and feed-forward value of block ``i`` by ``2 ** -(i // rescale_every)``.
    transformers divides those weights in place when switching to eval; here the
    weights are never touched and the (exact, power-of-two) factor is applied to the
    projection's output, so the stored weights and every delta refer to the checkpoint's
    weights in either mode. The logits equal transformers' in the same mode.

    Precision: float32 and float64 (CPU) follow transformers to float32 rounding.
    bfloat16 (via :meth:`to_dtype`, which keeps ``time_decay``/``time_first`` float32;
    the WKV state is always float32) stays within ``0.08 + 0.05 |logit|`` of float32 on
    unit-scale logits (measured max 0.05 on a 4-layer model; tests/test_model.py).
    """

    def __init__(self, config: RWKV4Config, *, init: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(RWKV4Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embeddings.weight
        if init:
            self.reset_parameters()

    # ------------------------------------------------------------------ basics

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the embedding)."""
        return self.embeddings.weight.dtype

    def to_dtype(self, dtype: torch.dtype) -> "RWKV4LM":
        """Casts the model to ``dtype`` keeping ``time_decay`` and ``time_first`` in
        float32 for 16-bit dtypes (transformers' ``_keep_in_fp32_modules``): the decay
        ``exp(-exp(w))`` is too sensitive for 8 mantissa bits. ``model.to(dtype)``
        casts everything."""
        check_model_dtype(dtype, "to_dtype: dtype")
        keep = dtype in (torch.float16, torch.bfloat16)
        for name, p in self.named_parameters():
            target = torch.float32 if keep and name.rsplit(".", 1)[-1] in ("time_decay", "time_first") else dtype
            p.data = p.data.to(target)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-4's initialisation (transformers' ``_init_weights``, with BlinkDL's
        ``time_first = log(0.3) + zigzag`` and a single-layer model allowed)."""
        cfg = self.config
        L, H = cfg.num_hidden_layers, cfg.hidden_size
        position = torch.arange(H, dtype=torch.float64) / H
        for block in self.blocks:
            i = block.layer_id
            ratio_0_to_1 = i / max(L - 1, 1)
            ratio_1_to_almost0 = 1.0 - i / L
            att, ffn = block.attention, block.feed_forward
            C = att.time_decay.numel()
            h = torch.arange(C, dtype=torch.float64)
            att.time_decay.copy_(-5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))
            zigzag = ((h + 1) % 3 - 1) * 0.5
            att.time_first.copy_(math.log(0.3) + zigzag)
            att.time_mix_key.copy_(position.pow(ratio_1_to_almost0).view(1, 1, H))
            att.time_mix_value.copy_((position.pow(ratio_1_to_almost0) + 0.3 * ratio_0_to_1).view(1, 1, H))
            att.time_mix_receptance.copy_(position.pow(0.5 * ratio_1_to_almost0).view(1, 1, H))
            ffn.time_mix_key.copy_(position.pow(ratio_1_to_almost0).view(1, 1, H))
            ffn.time_mix_receptance.copy_(position.pow(ratio_1_to_almost0).view(1, 1, H))
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and module is not self.head:
                rows, cols = module.weight.shape
                nn.init.orthogonal_(module.weight, gain=math.sqrt(rows / cols) if rows > cols else 1.0)
        nn.init.uniform_(self.embeddings.weight, -1e-4, 1e-4)
        if not self.config.tie_word_embeddings:
            V = cfg.vocab_size
            nn.init.orthogonal_(self.head.weight, gain=0.5 * (math.sqrt(V / H) if V > H else 1.0))

    def delta_shapes(self) -> dict[str, tuple[int, int]]:
        """Every module a :class:`Delta` may modify, with its weight's ``(Dout, Din)``:
        ``U`` is ``[B, Dout, r]`` and ``V`` is ``[B, Din, r]``."""
        shapes = {}
        for i, block in enumerate(self.blocks):
            for part, kinds in (("attention", ATTENTION_KINDS), ("feed_forward", FEED_FORWARD_KINDS)):
                for kind in kinds:
                    shapes[f"blocks.{i}.{part}.{kind}"] = tuple(getattr(getattr(block, part), kind).weight.shape)
        return shapes

    def zero_state(self, batch: int) -> RWKV4State:
        """The state before any token for ``batch`` samples (what ``state=None`` means)."""
        batch = check_count(batch, "batch")
        cfg = self.config
        return RWKV4State.zeros(cfg.num_hidden_layers, batch, cfg.hidden_size, cfg.attention_hidden_size,
                                dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ what the method reads
    # (prosg.models.protocol.RecurrentLM: the generator depends on these, not on the modules)

    @torch.no_grad()
    def layer_inputs(self, input_ids: Tensor) -> LayerInputs:
        """Every block's ``ln1`` / ``ln2`` outputs and ``ln_out``'s, ``[B, T, H]``
        each, over ``input_ids`` from the empty state (base weights). Collected with
        forward hooks, so the forward is the one :meth:`forward` runs."""
        ln1: dict[int, Tensor] = {}
        ln2: dict[int, Tensor] = {}
        final: list[Tensor] = []

        def keep(store, key):
            def hook(_module, _inputs, output):
                store[key] = output
            return hook

        handles = []
        try:
            for i, block in enumerate(self.blocks):
                handles.append(block.ln1.register_forward_hook(keep(ln1, i)))
                handles.append(block.ln2.register_forward_hook(keep(ln2, i)))
            handles.append(self.ln_out.register_forward_hook(lambda _m, _i, o: final.append(o)))
            self(input_ids)
        finally:
            for h in handles:
                h.remove()

        def as3(t: Tensor) -> Tensor:  # a one-token input runs on [B, H] tensors
            return t.unsqueeze(1) if t.dim() == 2 else t

        L = len(self.blocks)
        return LayerInputs([as3(ln1[i]) for i in range(L)], [as3(ln2[i]) for i in range(L)], as3(final[-1]))

    def has_delta_input(self, name: str) -> bool:
        """Every matrix but ``attention.output``, whose input (receptance * WKV) needs
        the recurrence itself."""
        _, part, kind = parse_delta_name(name)
        return (part, kind) != ("attention", "output")

    @torch.no_grad()
    def delta_input(self, name: str, inputs: LayerInputs) -> Tensor | None:
        """The token-shift mix of the ``ln1`` (time mix) or ``ln2`` (channel mix)
        output, and for ``feed_forward.value`` the squared-ReLU channel-mix key, at
        every position of a sequence that started from the empty state."""
        if not self.has_delta_input(name):
            return None
        layer, part, kind = parse_delta_name(name)
        module = getattr(self.blocks[layer], part)
        a = (inputs.attention if part == "attention" else inputs.feed_forward)[layer]
        shifted = token_shift(a, None)
        if part == "feed_forward" and kind == "value":
            xk = torch.lerp(shifted, a, module.time_mix_key.view(-1))
            return torch.square(torch.relu(F.linear(xk, module.key.weight)))
        return torch.lerp(shifted, a, getattr(module, f"time_mix_{kind}").view(-1))

    def writes_residual(self, name: str) -> bool:
        _, part, kind = parse_delta_name(name)
        return (part, kind) in (("attention", "output"), ("feed_forward", "value"))

    def output_embeddings(self) -> Tensor:
        return self.head.weight

    # ------------------------------------------------------------------ checks

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a LongTensor [B, T], got {type(input_ids)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token per sample (T >= 1), got T = 0")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}")
        # One reduction (one host sync on CUDA) per call, not per token: F.embedding's
        # own error names neither the tensor nor the value, and on CUDA it is a
        # device-side assert that ruins the context.
        if input_ids.numel() == 0:  # B = 0: aminmax refuses empty tensors
            return
        lo, hi = torch.aminmax(input_ids)
        lo, hi = torch.stack([lo, hi]).tolist()
        V = self.config.vocab_size
        if lo < 0 or hi >= V:
            bad = ((input_ids < 0) | (input_ids >= V)).nonzero()[0].tolist()
            raise ValueError(f"input_ids must be token ids in [0, {V}) (the model's vocab_size), got values in "
                             f"[{lo}, {hi}]; first bad: input_ids[{bad[0]}, {bad[1]}] = "
                             f"{int(input_ids[bad[0], bad[1]])}")

    def _check_state(self, state: RWKV4State | None, batch: int) -> tuple[list, list, list] | None:
        """Validates a state and splits it into per-layer lists. Shift vectors of
        another floating dtype are cast to the activation dtype and a float64 WKV state
        to float32 (as deltas are cast); a non-floating state never reaches here
        (:class:`RWKV4State` refuses it)."""
        if state is None:
            return None
        if not isinstance(state, RWKV4State):
            raise TypeError(f"state must be a prosg.models.RWKV4State (as returned by the model), got {type(state)}; "
                            "transformers' 5-tensor list converts with RWKV4State.from_hf")
        cfg = self.config
        L, H, C = cfg.num_hidden_layers, cfg.hidden_size, cfg.attention_hidden_size
        expected = {"att_shift": (L, batch, H), "ffn_shift": (L, batch, H), "wkv": (L, batch, 3, C)}
        for name, shape in expected.items():
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
        delta = Delta.coerce(delta)
        if delta is None or not delta.factors:
            return None
        if isinstance(delta.scale, bool) or not isinstance(delta.scale, (int, float)):
            raise TypeError(f"delta.scale must be a float, got {type(delta.scale)}")
        if not math.isfinite(delta.scale):
            raise ValueError(f"delta.scale must be finite, got {delta.scale}")
        L = self.config.num_hidden_layers
        per_layer: dict[str, list[dict]] = {"attention": [{} for _ in range(L)],
                                             "feed_forward": [{} for _ in range(L)]}
        act = self.dtype
        for name, uv in delta.factors.items():
            layer, part, kind = parse_delta_name(name)
            if layer >= L:
                raise ValueError(f"delta: module {name!r} refers to block {layer}, but the model has {L} blocks")
            if not isinstance(uv, (tuple, list)) or len(uv) != 2 or not all(isinstance(t, Tensor) for t in uv):
                raise TypeError(f"delta[{name!r}] must be a pair of tensors (U [B, Dout, r], V [B, Din, r])")
            U, V = uv
            d_out, d_in = getattr(getattr(self.blocks[layer], part), kind).weight.shape
            r = U.shape[-1] if U.dim() == 3 else -1
            # B is input_ids' batch size: one delta per sample, no broadcasting.
            if U.dim() != 3 or tuple(U.shape) != (batch, d_out, r):
                raise ValueError(f"delta[{name!r}]: U must have shape [B={batch}, Dout={d_out}, r], "
                                 f"got {list(U.shape)}{_batch_hint(U, batch)}")
            if tuple(V.shape) != (batch, d_in, r):
                raise ValueError(f"delta[{name!r}]: V must have shape [B={batch}, Din={d_in}, r={r}], "
                                 f"got {list(V.shape)}{_batch_hint(V, batch)}")
            for which, t in (("U", U), ("V", V)):
                if not t.is_floating_point():
                    raise ValueError(f"delta[{name!r}]: {which} must be floating point, got {t.dtype}")
                if t.device != self.device:
                    raise ValueError(f"delta[{name!r}]: {which} is on {t.device} but the model is on {self.device}")
            target = per_layer[part][layer]
            if kind in target:
                raise ValueError(f"delta: module {name!r} is given twice (under two spellings)")
            if r == 0:
                continue  # a rank-0 delta is no change at all
            # The kernels want the factors in the activation dtype; the cast is
            # differentiable, so gradients still reach float32 factors.
            target[kind] = (U.to(act), V.to(act))
        return per_layer["attention"], per_layer["feed_forward"], float(delta.scale)

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids: Tensor, state: RWKV4State | None = None, delta: Delta | dict | None = None,
                *, logits_to_keep: int = 0) -> tuple[Tensor, RWKV4State]:
        """Runs ``input_ids [B, T]`` after ``state`` (None: start of sequence).

        Args:
            input_ids: ``[B, T]`` token ids, ``T >= 1``.
            state: the :class:`RWKV4State` returned by an earlier call; the sequence
                continues from it exactly.
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
        return logits, RWKV4State(torch.stack(att), torch.stack(ffn), torch.stack(wkv))

    def start_decoding(self, input_ids: Tensor, state: RWKV4State | None,
                       delta: Delta | dict | None) -> "_Carried":
        """Checks the arguments of a generation once; :meth:`decode` then steps
        without re-checking (per token, the checks would cost more than the step)."""
        self._check_input_ids(input_ids)
        batch = input_ids.shape[0]
        return _Carried(self._check_state(state, batch), self._resolve_delta(delta, batch))

    def decode(self, input_ids: Tensor, carried: "_Carried", *, logits_to_keep: int = 0) -> tuple[Tensor, "_Carried"]:
        logits, layers = self._forward(input_ids, carried.layers, carried.deltas, logits_to_keep)
        return logits, _Carried(layers, carried.deltas)

    def _forward(self, input_ids: Tensor, layers: tuple[list, list, list] | None,
                 deltas: tuple[list[dict], list[dict], float] | None,
                 logits_to_keep: int = 0) -> tuple[Tensor, tuple[list, list, list]]:
        """The unchecked forward on per-layer state lists (generation calls this once
        per token). One token runs on ``[B, H]`` tensors throughout: no token-shift
        copies, 2-D GEMMs."""
        cfg = self.config
        single = input_ids.shape[1] == 1
        h = F.embedding(input_ids[:, 0] if single else input_ids, self.embeddings.weight)
        rescale = cfg.rescale_every if (cfg.rescale_every > 0 and not self.training) else 0
        no_delta: dict = {}
        att_deltas, ffn_deltas, scale = deltas if deltas is not None else (None, None, 1.0)
        new_att, new_ffn, new_wkv = [], [], []
        for i, block in enumerate(self.blocks):
            if i == 0:
                h = block.pre_ln(h)
            att_out, att_shift, wkv_state = block.attention(
                block.ln1(h), layers[0][i] if layers else None, layers[2][i] if layers else None,
                att_deltas[i] if att_deltas else no_delta, scale)
            # transformers divides these two weights by 2^(i // rescale_every) in eval;
            # scaling the product by a power of two is bit-for-bit the same.
            out_scale = 2.0 ** -(i // rescale) if rescale else 1.0
            h = torch.add(h, att_out, alpha=out_scale) if out_scale != 1.0 else h + att_out
            ffn_out, ffn_shift = block.feed_forward(
                block.ln2(h), layers[1][i] if layers else None, ffn_deltas[i] if ffn_deltas else no_delta, scale)
            h = torch.add(h, ffn_out, alpha=out_scale) if out_scale != 1.0 else h + ffn_out
            if rescale and (i + 1) % rescale == 0:
                h = h * 0.5
            new_att.append(att_shift)
            new_ffn.append(ffn_shift)
            new_wkv.append(wkv_state)
        if logits_to_keep and not single:
            h = h[:, -logits_to_keep:]
        h = self.ln_out(h)
        if single and h.shape[0] > 1 and h.device.type == "cpu":
            # Decoding a batch: MKL's sgemm runs the transposed problem W @ x^T of a tall
            # head faster than x [B, H] @ W^T (benchmarks/bench_design.py, RESULTS.md);
            # the result is the same.
            logits = torch.mm(self.head.weight, h.t()).t()
        else:
            logits = F.linear(h, self.head.weight)
        if single:
            logits = logits.unsqueeze(1)
        return logits, (new_att, new_ffn, new_wkv)

    # ------------------------------------------------------------------ generation

    def generate(self, input_ids: Tensor, max_new_tokens: int, delta: Delta | dict | None = None, *,
                 state: RWKV4State | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
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
                        state: RWKV4State | None = None, do_sample: bool = False, temperature: float = 1.0,
                        top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                        stop_tokens: int | list[int] | Tensor | None = None) -> Iterator[Tensor]:
        """Like :meth:`generate`, yielding the ``[B]`` new tokens of each step as they
        are produced (the prompt is not yielded)."""
        from prosg.models.generation import stream_generate

        return stream_generate(self, input_ids, max_new_tokens, delta, state=state, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                               stop_tokens=stop_tokens)

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> "RWKV4LM":
        """Loads a transformers RWKV-4 checkpoint directory (``config.json`` with
        ``model.safetensors``, ``pytorch_model.bin`` or their sharded ``*.index.json``).
        ``dtype`` casts as :meth:`to_dtype` does (None keeps the stored dtypes).

        The weights are checked against ``config.json`` before anything is assigned:
        every expected tensor present with its shape and a floating dtype, nothing
        else, all problems named in one ``ValueError`` with the file. Unreadable files
        (truncated, empty, not safetensors / torch) raise ``ValueError`` naming them."""
        from prosg.models.checkpoint import load_hf

        return load_hf(cls, path, dtype=dtype, device=device)

    @classmethod
    def from_blinkdl(cls, path: str | Path, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                     **config_overrides) -> "RWKV4LM":
        """Loads a BlinkDL RWKV-4 ``.pth`` state dict, renaming keys as transformers'
        ``convert_rwkv_checkpoint_to_hf.py`` does and reading the shapes from the
        tensors. ``config_overrides`` set other :class:`RWKV4Config` fields
        (``rescale_every`` defaults to 6, as that conversion leaves it).

        The file has no config, so its depth is the blocks it holds: one that lost its
        last block(s) is indistinguishable from a shallower model. Pass the shape
        fields you know (``num_hidden_layers``, ``hidden_size``, ...): they are checked
        against the tensors, and a missing or extra block is named in the error.
        Gaps (a block missing in the middle), missing, extra or mis-shaped tensors are
        always refused, naming the file."""
        from prosg.models.checkpoint import load_blinkdl

        return load_blinkdl(cls, path, dtype=dtype, device=device, **config_overrides)

    def save_pretrained(self, path: str | Path) -> None:
        """Writes ``config.json`` and ``model.safetensors`` in transformers' layout
        (``RwkvForCausalLM.from_pretrained`` reads them)."""
        from prosg.models.checkpoint import save_hf

        save_hf(self, path)
