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
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.models.checks import check_count
from prosg.models.common import RWKVLanguageModel, project, takes_fused_step, token_shift
from prosg.models.config import RWKV4Config
from prosg.models.protocol import LayerInputs
from prosg.models.state import ATTENTION_KINDS, FEED_FORWARD_KINDS, RWKV4State, parse_delta_name
from prosg.numerics import EMPTY_MAX, accumulation_dtype
from prosg.ops import rwkv4_channel_mix_step, rwkv4_time_mix_step, wkv4

LowRank = tuple[Tensor, Tensor]

def _wkv(time_decay: Tensor, time_first: Tensor, key: Tensor, value: Tensor, state: Tensor | None,
         key_lowrank: LowRank | None, value_lowrank: LowRank | None) -> tuple[Tensor, Tensor]:
    return wkv4(time_decay, time_first, key, value, state, key_lowrank, value_lowrank)


def _fused_factor(x: Tensor, uv: LowRank | None, scale: float) -> LowRank | None:
    """``(scale * x @ V_b, U_b)``: the delta's contribution ``(x @ V_b) @ U_b^T`` to a
    key or value projection, in the form prosg.ops.wkv4 adds inside the recurrence, so
    the perturbed key/value is never written. ``x`` is ``[B, T, Din]`` or ``[B, Din]``."""
    if uv is None:
        return None
    U, V = uv
    z = torch.bmm(x if x.dim() == 3 else x.unsqueeze(1), V)
    return (z if scale == 1.0 else z * scale), U


class Pads(NamedTuple):
    """Left padding of a batched prefill (:meth:`RWKV4LM.prefill_rows`), ``[B, T, 1]``
    bool masks: ``pad``, the positions before a row's first token; ``after_pad``, the
    positions whose previous token is a pad (a row's first token, and pads)."""

    pad: Tensor
    after_pad: Tensor


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
                scale: float, pads: Pads | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x``: the ``ln1`` output, ``[B, T, H]`` or ``[B, H]`` for one token.
        ``pads``: see :meth:`RWKV4LM.prefill_rows` (sequences from the empty state only).
        Returns ``(output, x of the last token, WKV state)``."""
        if takes_fused_step(self, x, delta, prev, wkv_state):
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
        if pads is not None:
            shifted = shifted.masked_fill(pads.after_pad, 0.0)
        # lerp(a, b, m) = a + m (b - a): HF's x m + shifted (1 - m) in one kernel.
        xk = torch.lerp(shifted, x, self.time_mix_key.view(-1))
        xv = torch.lerp(shifted, x, self.time_mix_value.view(-1))
        xr = torch.lerp(shifted, x, self.time_mix_receptance.view(-1))
        key = F.linear(xk, self.key.weight)
        if pads is not None:
            # A key of -inf adds nothing (e^(k - q) = 0), and the empty state's p = -1e38
            # absorbs the decay exactly (|w| is far below its float32 spacing).
            key = key.masked_fill(pads.pad, float("-inf"))
        value = F.linear(xv, self.value.weight)
        receptance = torch.sigmoid(project(xr, self.receptance.weight, delta.get("receptance"), scale))
        single = x.dim() == 2
        if single:
            key, value = key.unsqueeze(1), value.unsqueeze(1)
        out, wkv_state = _wkv(self.time_decay, self.time_first, key, value, wkv_state,
                              _fused_factor(xk, delta.get("key"), scale), _fused_factor(xv, delta.get("value"), scale))
        if single:
            out = out.squeeze(1)
        if pads is not None:
            out = out.masked_fill(pads.pad, 0.0)  # 0/0 at a pad: no key has been read yet
        out = project(receptance * out, self.output.weight, delta.get("output"), scale)
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
                scale: float, pads: Pads | None = None) -> tuple[Tensor, Tensor]:
        """``x``: the ``ln2`` output; ``pads`` as :meth:`RWKV4TimeMix.forward`'s.
        Returns ``(output, x of the last token)``."""
        if takes_fused_step(self, x, delta, prev):
            out = rwkv4_channel_mix_step(
                x, prev if prev is not None else torch.zeros_like(x), self.time_mix_key, self.time_mix_receptance,
                self.key.weight, self.receptance.weight, self.value.weight,
                [delta.get(kind) for kind in FEED_FORWARD_KINDS], scale)
            return out, x
        shifted = token_shift(x, prev)
        if pads is not None:
            shifted = shifted.masked_fill(pads.after_pad, 0.0)
        xk = torch.lerp(shifted, x, self.time_mix_key.view(-1))
        xr = torch.lerp(shifted, x, self.time_mix_receptance.view(-1))
        key = torch.square(torch.relu(project(xk, self.key.weight, delta.get("key"), scale)))
        value = project(key, self.value.weight, delta.get("value"), scale)
        receptance = torch.sigmoid(project(xr, self.receptance.weight, delta.get("receptance"), scale))
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


class RWKV4LM(RWKVLanguageModel):
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

    STATE = RWKV4State
    DELTA_KINDS = None  # RWKV-4's (parse_delta_name's default and its messages)
    # transformers' _keep_in_fp32_modules: exp(-exp(w)) is too sensitive for 8 mantissa bits
    FLOAT32_PARAMETERS = ("time_decay", "time_first")
    _STATE_HINT = "; transformers' 5-tensor list converts with RWKV4State.from_hf"

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
            return torch.square(torch.relu(project(xk, module.key.weight, None, 1.0)))
        return torch.lerp(shifted, a, getattr(module, f"time_mix_{kind}").view(-1))

    # ------------------------------------------------------------------ checks

    def _state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        cfg = self.config
        L, H, C = cfg.num_hidden_layers, cfg.hidden_size, cfg.attention_hidden_size
        return {"att_shift": (L, batch, H), "ffn_shift": (L, batch, H), "wkv": (L, batch, 3, C)}

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def prefill_rows(self, input_ids: Tensor, lengths: list[int]) -> RWKV4State:
        """The state after the first ``lengths[b]`` tokens (``1 <= lengths[b] <= P``)
        of each row of the right-padded ``input_ids [B, P]``, base weights, in one
        batched forward. The rows are moved to the right (left padding) so that all end
        at the last column; a pad's key is ``-inf`` and nothing reads a pad's token
        shift, so a row's first token meets exactly the empty state and zero shifts, as
        when it runs alone. (With right padding the decay would still act past a row's
        end: RWKV-4's is per channel, not per position.) Equals one forward per
        distinct length (the generic ``prefill_rows``) up to the rounding of other
        batch shapes (tests/test_model.py)."""
        lengths = self._check_lengths(input_ids, lengths)
        width = max(lengths)
        ids = input_ids[:, :width]
        if len(set(lengths)) == 1:  # nothing to move
            return self(ids, logits_to_keep=1)[1]
        start = width - torch.tensor(lengths, dtype=torch.long, device=ids.device)
        source = torch.arange(width, device=ids.device) - start.unsqueeze(1)
        pad = source < 0
        # A caller's pad value (possibly outside the vocabulary) is never read: replaced.
        ids = ids.gather(1, source.clamp(min=0)).masked_fill(pad, 0)
        self._check_input_ids(ids)
        after_pad = torch.cat([torch.zeros_like(pad[:, :1]), pad[:, :-1]], 1)
        pads = Pads(pad.unsqueeze(-1), after_pad.unsqueeze(-1))
        _, (att, ffn, wkv) = self._forward(ids, None, None, logits_to_keep=1, pads=pads)
        return self.STATE(torch.stack(att), torch.stack(ffn), torch.stack(wkv))

    def _forward(self, input_ids: Tensor, layers: tuple[list, list, list] | None,
                 deltas: tuple[list[dict], list[dict], float] | None,
                 logits_to_keep: int = 0, pads: Pads | None = None) -> tuple[Tensor, tuple[list, list, list]]:
        """The unchecked forward on per-layer state lists (generation calls this once
        per token). One token runs on ``[B, H]`` tensors throughout: no token-shift
        copies, 2-D GEMMs. ``pads``: see :meth:`prefill_rows` (a sequence from the empty
        state; the pads' logits are meaningless)."""
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
                att_deltas[i] if att_deltas else no_delta, scale, pads)
            # transformers divides these two weights by 2^(i // rescale_every) in eval;
            # scaling the product by a power of two is bit-for-bit the same.
            out_scale = 2.0 ** -(i // rescale) if rescale else 1.0
            h = torch.add(h, att_out, alpha=out_scale) if out_scale != 1.0 else h + att_out
            ffn_out, ffn_shift = block.feed_forward(
                block.ln2(h), layers[1][i] if layers else None, ffn_deltas[i] if ffn_deltas else no_delta, scale,
                pads)
            h = torch.add(h, ffn_out, alpha=out_scale) if out_scale != 1.0 else h + ffn_out
            if rescale and (i + 1) % rescale == 0:
                h = h * 0.5
            new_att.append(att_shift)
            new_ffn.append(ffn_shift)
            new_wkv.append(wkv_state)
        return self._logits(h, single, logits_to_keep), (new_att, new_ffn, new_wkv)

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
