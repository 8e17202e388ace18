"""RWKV-7 ("x070", Goose) language model with per-sample low-rank weight deltas.

The arithmetic is the ``rwkv`` package's ``RWKV_x070`` CPU path step for step
(``RWKV_x070_TMix_seq`` / ``RWKV_x070_CMix_seq``): embedding, ``ln0`` on block 0's
input, then per block ``ln1`` -> time mix -> residual and ``ln2`` -> channel mix ->
residual; ``ln_out`` and the head.

Time mix: token shift ``xx = x_prev - x`` and six mixes ``x + xx * x_{r,w,k,v,a,g}``;
``r, k, v`` projections; low-rank MLPs for the decay ``w = tanh(xw w1) w2``, the
in-context learning rate ``a = sigmoid(a0 + xa a1 a2)``, the gate
``g = sigmoid(xg g1) g2`` and (layers > 0) the value residual
``v += (v_first - v) sigmoid(v0 + xv v1 v2)`` towards layer 0's value; the removal key
``kk = normalize(k * k_k)`` per head, ``k *= 1 + (a - 1) k_a``; the log-log decay
``-softplus(-(w0 + w)) - 0.5``; the recurrence :func:`prosg.ops.wkv7` with
``a = -kk, b = kk * a``; a per-head GroupNorm (``ln_x``), the bonus
``(sum_head r k r_k) v``, the gate and the output projection. Channel mix: token shift
with ``x_k`` and ``value(relu(key(xk))^2)``.

Parameter names are BlinkDL's with ``att``/``ffn`` spelled ``attention``/
``feed_forward`` and ``emb`` spelled ``embeddings`` (so delta names read as RWKV-4's);
vectors (``x_r``, ``w0``, ``k_k``, ...) are stored flat ``[H]``; the low-rank matrices
keep BlinkDL's orientation (``w1 [H, D]``, ``w2 [D, H]``: ``x @ w1 @ w2``). Layer 0 has
no ``v0/v1/v2`` (the rwkv package ignores them). docs/rwkv7.md maps every name to
BlinkDL's and to flash-linear-attention's layout.

Deltas (:class:`Delta`) modify ``attention.{receptance,key,value,output}`` and
``feed_forward.{key,value}`` per sample through :func:`prosg.ops.lowrank_linear`; no
per-sample weight is formed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prosg.models.checks import check_count
from prosg.models.common import RWKVLanguageModel, last_token, project, takes_fused_step, token_shift
from prosg.models.config import RWKV7Config
from prosg.models.protocol import LayerInputs
from prosg.models.state import RWKV7State, parse_delta_name
from prosg.numerics import accumulation_dtype
from prosg.ops import wkv7
from prosg.ops._checks import flatten_deltas

LowRank = tuple[Tensor, Tensor]

#: The matrices of a block that can carry a delta, by part (RWKV-7's channel mix has
#: no receptance).
ATTENTION_KINDS = ("key", "value", "receptance", "output")
FEED_FORWARD_KINDS = ("key", "value")
DELTA_KINDS = {"attention": ATTENTION_KINDS, "feed_forward": FEED_FORWARD_KINDS}

#: Parameters kept in float32 when the model runs in a 16-bit dtype: the decay's
#: low-rank MLP. The decay exp(-exp(w)) compounds over every token, and 8 mantissa bits
#: of w shift it by ~0.4% per step (RWKV4LM keeps time_decay float32 for the same reason).
FLOAT32_PARAMETERS = ("w0", "w1", "w2")

#: The token-shift mixes of the time mix, in the rwkv package's order.
MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


class RWKV7TimeMix(nn.Module):
    """Time mixing (BlinkDL's ``RWKV_Tmix_x070``)."""

    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.layer_id = layer_id
        self.num_heads, self.head_size = config.num_heads, config.head_size
        for name in MIXES:
            setattr(self, name, nn.Parameter(torch.empty(C)))
        dims = dict(w=config.decay_low_rank_dim, a=config.a_low_rank_dim, v=config.v_low_rank_dim,
                    g=config.gate_low_rank_dim)
        for prefix in ("w", "a", "v", "g"):
            if prefix == "v" and layer_id == 0:
                continue  # layer 0's value is v_first itself
            if prefix != "g":
                setattr(self, f"{prefix}0", nn.Parameter(torch.empty(C)))
            setattr(self, f"{prefix}1", nn.Parameter(torch.empty(C, dims[prefix])))
            setattr(self, f"{prefix}2", nn.Parameter(torch.empty(dims[prefix], C)))
        self.k_k = nn.Parameter(torch.empty(C))
        self.k_a = nn.Parameter(torch.empty(C))
        self.r_k = nn.Parameter(torch.empty(self.num_heads, self.head_size))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, C, eps=config.group_norm_epsilon)

    def mixes(self, x: Tensor, shifted: Tensor, names=MIXES) -> list[Tensor]:
        """``x + (shifted - x) * x_m`` for each mix ``m`` (the rwkv package's order of
        operations, so the products round as there)."""
        xx = shifted - x
        if len(names) == 1:
            return [x + xx * getattr(self, names[0])]
        # One broadcast multiply and add over all mixes instead of two small kernels per
        # mix: the decode step is dominated by per-op overhead outside the GEMVs
        # (benchmarks/RESULTS.md). Same operations, same rounding as one by one.
        mix = torch.stack([getattr(self, m) for m in names]).view(len(names), *([1] * (x.dim() - 1)), -1)
        return list((x + xx * mix).unbind(0))

    def forward(self, x: Tensor, prev: Tensor | None, wkv_state: Tensor | None, v_first: Tensor | None,
                delta: dict[str, LowRank], scale: float,
                last: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x``: the ``ln1`` output, ``[B, T, H]`` or ``[B, H]`` for one token;
        ``v_first``: layer 0's value at the same positions (None in layer 0).
        ``last`` (``[B]``, sequences only): the position of each row's last token; the
        positions after it leave the state as it is (see :meth:`RWKV7LM.prefill_rows`).
        Returns ``(output, x of the last token, WKV state, v_first)``."""
        single = x.dim() == 2
        B, C = x.shape[0], x.shape[-1]
        T = 1 if single else x.shape[1]
        nh, N = self.num_heads, self.head_size
        if takes_fused_step(self, x, delta, prev, wkv_state, v_first):
            return self._fused_step(x, prev, wkv_state, v_first, delta, scale)
        xr, xw, xk, xv, xa, xg = self.mixes(x, token_shift(x, prev))
        r = project(xr, self.receptance.weight, delta.get("receptance"), scale)
        k = project(xk, self.key.weight, delta.get("key"), scale)
        v = project(xv, self.value.weight, delta.get("value"), scale)
        # The decay's MLP runs in its parameters' dtype (float32 for a 16-bit model).
        w = self.w0 + torch.tanh(xw.to(self.w1.dtype) @ self.w1) @ self.w2
        w = -F.softplus(-w) - 0.5
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, nh, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        if last is not None:
            # Past a row's last token the step is the identity: decay exp(-exp(-inf)) = 1,
            # nothing removed (kk = 0, so a = b = 0) and nothing written (k = 0).
            keep = (torch.arange(T, device=x.device) <= last.unsqueeze(1)).unsqueeze(-1)
            w = w.masked_fill(~keep, float("-inf"))
            kk = kk * keep.unsqueeze(-1)
            k = k * keep
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        # The recurrence runs in the state's dtype: float32 (float64 for float64), so a
        # 16-bit model's decay and state keep float32 precision.
        acc = accumulation_dtype(x.dtype)
        a4 = a.view(B, T, nh, N)
        out, wkv_state = wkv7(r.view(B, T, nh, N).to(acc), w.view(B, T, nh, N).to(acc),
                              k.view(B, T, nh, N).to(acc), v.view(B, T, nh, N).to(acc), (-kk).to(acc),
                              (kk * a4).to(acc), wkv_state)
        out = F.group_norm(out.reshape(B * T, C), nh, self.ln_x.weight.to(acc), self.ln_x.bias.to(acc),
                           self.ln_x.eps).to(x.dtype)
        bonus = (r * k * self.r_k.view(C)).view(B, T, nh, N).sum(-1, keepdim=True) * v.view(B, T, nh, N)
        out = (out.view(B, T, C) + bonus.view(B, T, C)).view(x.shape) * g
        out = project(out, self.output.weight, delta.get("output"), scale)
        return out, last_token(x, last), wkv_state, v_first

    def _fused_step(self, x: Tensor, prev: Tensor | None, wkv_state: Tensor | None, v_first: Tensor | None,
                    delta: dict[str, LowRank], scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One token through the fused decode-step op (prosg.ops.rwkv7_time_mix_step):
        the same arithmetic as :meth:`forward` in one call, without its ~45 small ops.
        It runs once per layer and token, so it reads the parameters from the module
        dicts and calls the op positionally: attribute lookups through nn.Module and
        the keyword wrapper cost about as much as the op's own host code at B=1."""
        if wkv_state is None:
            wkv_state = torch.zeros(x.shape[0], self.num_heads, self.head_size, self.head_size,
                                    dtype=accumulation_dtype(x.dtype), device=x.device)
        p, m = self._parameters, self._modules
        later = self.layer_id > 0
        ln_x = m["ln_x"]
        out, wkv_state, v = torch.ops.prosg.rwkv7_time_mix_step.default(
            x, prev if prev is not None else torch.zeros_like(x), wkv_state, v_first if later else None,
            p["x_r"], p["x_w"], p["x_k"], p["x_v"], p["x_a"], p["x_g"], p["w0"], p["w1"], p["w2"], p["a0"], p["a1"],
            p["a2"], p["g1"], p["g2"], p["v0"] if later else None, p["v1"] if later else None,
            p["v2"] if later else None, p["k_k"], p["k_a"], p["r_k"], m["receptance"]._parameters["weight"],
            m["key"]._parameters["weight"], m["value"]._parameters["weight"], m["output"]._parameters["weight"],
            ln_x._parameters["weight"], ln_x._parameters["bias"], float(ln_x.eps),
            flatten_deltas("rwkv7_time_mix_step", [delta.get(kind) for kind in ATTENTION_KINDS], ATTENTION_KINDS),
            float(scale))
        return out, x, wkv_state, (v_first if later else v)


class RWKV7ChannelMix(nn.Module):
    """Channel mixing (BlinkDL's ``RWKV_CMix_x070``): ``value(relu(key(xk))^2)``."""

    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        C, F_ = config.hidden_size, config.intermediate_size
        self.layer_id = layer_id
        self.x_k = nn.Parameter(torch.empty(C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def mix(self, x: Tensor, shifted: Tensor) -> Tensor:
        return x + (shifted - x) * self.x_k

    def forward(self, x: Tensor, prev: Tensor | None, delta: dict[str, LowRank], scale: float,
                last: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x``: the ``ln2`` output; ``last`` as :meth:`RWKV7TimeMix.forward`'s.
        Returns ``(output, x of the last token)``."""
        if takes_fused_step(self, x, delta, prev):
            # One token without gradients: the fused decode step
            # (prosg.ops.rwkv7_channel_mix_step), called as _fused_step above is.
            m = self._modules
            out = torch.ops.prosg.rwkv7_channel_mix_step.default(
                x, prev if prev is not None else torch.zeros_like(x), self._parameters["x_k"],
                m["key"]._parameters["weight"], m["value"]._parameters["weight"],
                flatten_deltas("rwkv7_channel_mix_step", [delta.get(kind) for kind in FEED_FORWARD_KINDS],
                               FEED_FORWARD_KINDS), float(scale))
            return out, x
        xk = self.mix(x, token_shift(x, prev))
        key = torch.square(torch.relu(project(xk, self.key.weight, delta.get("key"), scale)))
        return project(key, self.value.weight, delta.get("value"), scale), last_token(x, last)


class RWKV7Block(nn.Module):
    def __init__(self, config: RWKV7Config, layer_id: int):
        super().__init__()
        H, eps = config.hidden_size, config.layer_norm_epsilon
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(H, eps=eps)
        self.ln1 = nn.LayerNorm(H, eps=eps)
        self.ln2 = nn.LayerNorm(H, eps=eps)
        self.attention = RWKV7TimeMix(config, layer_id)
        self.feed_forward = RWKV7ChannelMix(config, layer_id)


class RWKV7LM(RWKVLanguageModel):
    """RWKV-7 causal language model: ``model(input_ids, state, delta) -> (logits, state)``.

    Load weights with :meth:`from_blinkdl` (a BlinkDL x070 ``.pth``) or
    :meth:`from_pretrained` (a flash-linear-attention ``RWKV7ForCausalLM`` directory);
    write them with :meth:`save_pretrained`. ``RWKV7LM(config)`` initialises weights as
    BlinkDL's x070 training does; ``init=False`` leaves them uninitialised.

    Precision: float32 follows the rwkv package's fp32 CPU path to float32 rounding.
    bfloat16 (via :meth:`to_dtype`, which keeps the decay MLP ``w0/w1/w2`` float32; the
    recurrence and its state always run in float32) stays within
    ``0.25 + 0.05 |logit|`` of float32 with a mean error below 0.02 on logits of unit
    standard deviation (measured on random 3-layer models: max 0.22, mean 0.011-0.013;
    tests/test_rwkv7_model.py, docs/rwkv7.md)."""

    STATE = RWKV7State
    DELTA_KINDS = DELTA_KINDS
    FLOAT32_PARAMETERS = FLOAT32_PARAMETERS

    def __init__(self, config: RWKV7Config, *, init: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(RWKV7Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embeddings.weight
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BlinkDL's x070 initialisation (RWKV-LM ``RWKV-v7/train_temp/src/model.py``,
        as flash-linear-attention reproduces it): position ramps for the mixes, the
        zigzag decay/learning-rate biases, zero first LoRA factors, orthogonal
        projections, zero output/value projections (a fresh model is the identity on
        the residual stream)."""
        cfg = self.config
        L, C, N = cfg.num_hidden_layers, cfg.hidden_size, cfg.head_size
        n = torch.arange(C, dtype=torch.float64)
        ddd = n / C
        linear = n / max(C - 1, 1) - 0.5
        zigzag = ((n % N) - (N - 1) / 2) / max((N - 1) / 2, 1)
        zigzag = zigzag * zigzag.abs()

        def ortho(p: Tensor, gain: float = 1.0) -> None:
            w = torch.empty(p.shape, dtype=torch.float32)
            nn.init.orthogonal_(w, gain=gain)
            p.copy_(w)

        for block in self.blocks:
            i = block.layer_id
            r01 = i / max(L - 1, 1)
            r10 = 1.0 - i / L
            att, ffn = block.attention, block.feed_forward
            for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
                getattr(att, name).copy_(1.0 - ddd.pow(power * r10))
            www = -6 + 6 * (n / max(C - 1, 1)) ** (1 + r01 ** 0.3)
            att.w0.copy_(www + 0.5 + zigzag * 2.5)
            att.a0.copy_(-0.19 + zigzag * 0.3 + linear * 0.4)
            if i > 0:
                att.v0.copy_(0.73 - linear * 0.4)
            for prefix in ("w", "a", "v", "g"):
                if prefix == "v" and i == 0:
                    continue
                getattr(att, f"{prefix}1").zero_()
                ortho(getattr(att, f"{prefix}2"), 0.1)
            att.k_k.copy_(0.71 - linear * 0.1)
            att.k_a.fill_(1.02)
            att.r_k.fill_(-0.04)
            att.ln_x.weight.fill_(((i + 1) / L) ** 0.7)
            att.ln_x.bias.zero_()
            ortho(att.receptance.weight)
            ortho(att.key.weight, 0.1)
            ortho(att.value.weight)
            att.output.weight.zero_()
            ffn.x_k.copy_(1.0 - ddd.pow(r10 ** 4))
            ortho(ffn.key.weight)
            ffn.value.weight.zero_()
            for ln in (block.ln1, block.ln2, getattr(block, "ln0", None)):
                if ln is not None:
                    nn.init.ones_(ln.weight)
                    nn.init.zeros_(ln.bias)
        nn.init.ones_(self.ln_out.weight)
        nn.init.zeros_(self.ln_out.bias)
        nn.init.uniform_(self.embeddings.weight, -1e-4, 1e-4)
        if not cfg.tie_word_embeddings:
            V = cfg.vocab_size
            ortho(self.head.weight, 0.5 * (math.sqrt(V / C) if V > C else 1.0))

    def delta_shapes(self) -> dict[str, tuple[int, int]]:
        """Every matrix a :class:`Delta` may modify, with its weight's ``(Dout, Din)``:
        ``blocks.<i>.attention.{key,value,receptance,output}`` and
        ``blocks.<i>.feed_forward.{key,value}``."""
        shapes = {}
        for i, block in enumerate(self.blocks):
            for part, kinds in DELTA_KINDS.items():
                for kind in kinds:
                    shapes[f"blocks.{i}.{part}.{kind}"] = tuple(getattr(getattr(block, part), kind).weight.shape)
        return shapes

    def zero_state(self, batch: int) -> RWKV7State:
        """The state before any token for ``batch`` samples (what ``state=None`` means)."""
        batch = check_count(batch, "batch")
        cfg = self.config
        return RWKV7State.zeros(cfg.num_hidden_layers, batch, cfg.hidden_size, cfg.num_heads, cfg.head_size,
                                dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ what the method reads

    def has_delta_input(self, name: str) -> bool:
        """Every matrix but ``attention.output``, whose input (the normalised
        recurrence output plus bonus, gated) needs the recurrence itself."""
        _, part, kind = parse_delta_name(name, DELTA_KINDS)
        return (part, kind) != ("attention", "output")

    @torch.no_grad()
    def delta_input(self, name: str, inputs: LayerInputs) -> Tensor | None:
        """The token-shift mix of the ``ln1`` output (``x_r``, ``x_k``, ``x_v`` for
        receptance, key, value) or of the ``ln2`` output (``x_k`` for the channel-mix
        key), and for ``feed_forward.value`` the squared-ReLU key, at every position of
        a sequence that started from the empty state."""
        if not self.has_delta_input(name):
            return None
        layer, part, kind = parse_delta_name(name, DELTA_KINDS)
        module = getattr(self.blocks[layer], part)
        if part == "attention":
            a = inputs.attention[layer]
            return module.mixes(a, token_shift(a, None), (f"x_{kind[0]}",))[0]
        a = inputs.feed_forward[layer]
        xk = module.mix(a, token_shift(a, None))
        if kind == "key":
            return xk
        return torch.square(torch.relu(project(xk, module.key.weight, None, 1.0)))

    # ------------------------------------------------------------------ checks

    def _state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        cfg = self.config
        L, H, nh, N = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_heads, cfg.head_size
        return {"att_shift": (L, batch, H), "ffn_shift": (L, batch, H), "wkv": (L, batch, nh, N, N)}

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def prefill_rows(self, input_ids: Tensor, lengths: list[int]) -> RWKV7State:
        """The state after the first ``lengths[b]`` tokens (``1 <= lengths[b] <= P``)
        of each row of the right-padded ``input_ids [B, P]``, base weights, in one
        batched forward: past its length a row's positions leave its state as it is
        (the step there is the identity, exactly) and its token-shift vectors are taken
        at its last token. Equals one forward per distinct length (the generic
        ``prefill_rows``) up to the rounding of other batch shapes
        (tests/test_rwkv7_model.py)."""
        lengths = self._check_lengths(input_ids, lengths)
        ids = input_ids[:, :max(lengths)]
        if len(set(lengths)) == 1:  # nothing to mask
            return self(ids, logits_to_keep=1)[1]
        last = torch.tensor(lengths, dtype=torch.long, device=self.device) - 1
        # The pads are read but never reach a state: any id will do, so a caller's pad
        # value (possibly outside the vocabulary) is replaced, and only tokens checked.
        pad = torch.arange(ids.shape[1], device=self.device) > last.unsqueeze(1)
        ids = ids.masked_fill(pad.to(ids.device), 0)
        self._check_input_ids(ids)
        _, (att, ffn, wkv) = self._forward(ids, None, None, logits_to_keep=1, last=last)
        return self.STATE(torch.stack(att), torch.stack(ffn), torch.stack(wkv))

    def _forward(self, input_ids: Tensor, layers: tuple[list, list, list] | None,
                 deltas: tuple[list[dict], list[dict], float] | None,
                 logits_to_keep: int = 0, last: Tensor | None = None) -> tuple[Tensor, tuple[list, list, list]]:
        """The unchecked forward on per-layer state lists. One token runs on
        ``[B, H]`` tensors throughout: no token-shift copies, 2-D GEMMs. ``last``: see
        :meth:`prefill_rows` (sequences only; the logits are then meaningless)."""
        single = input_ids.shape[1] == 1
        h = F.embedding(input_ids[:, 0] if single else input_ids, self.embeddings.weight)
        no_delta: dict = {}
        att_deltas, ffn_deltas, scale = deltas if deltas is not None else (None, None, 1.0)
        new_att, new_ffn, new_wkv = [], [], []
        v_first = None
        for i, block in enumerate(self.blocks):
            if i == 0:
                h = block.ln0(h)
            att_out, att_shift, wkv_state, v_first = block.attention(
                block.ln1(h), layers[0][i] if layers else None, layers[2][i] if layers else None, v_first,
                att_deltas[i] if att_deltas else no_delta, scale, last)
            h = h + att_out
            ffn_out, ffn_shift = block.feed_forward(
                block.ln2(h), layers[1][i] if layers else None, ffn_deltas[i] if ffn_deltas else no_delta, scale,
                last)
            h = h + ffn_out
            new_att.append(att_shift)
            new_ffn.append(ffn_shift)
            new_wkv.append(wkv_state)
        return self._logits(h, single, logits_to_keep), (new_att, new_ffn, new_wkv)

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_blinkdl(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", **config_overrides) -> "RWKV7LM":
        """Loads a BlinkDL RWKV-7 (x070) ``.pth``. Shapes come from the tensors
        (heads and head size from ``blocks.0.att.r_k``, vocabulary and width from
        ``emb.weight``, the LoRA widths from ``w1/a1/v1/g1``); ``config_overrides``
        set the epsilons / token ids. DeepEmbed checkpoints (``s_emb``, ``s0/s1/s2``)
        and any unknown, missing or mis-shaped key are refused, naming the key and
        the file. Layer 0's unused ``v0/v1/v2`` are accepted and ignored."""
        from prosg.models.checkpoint7 import load_blinkdl7

        return load_blinkdl7(cls, path, dtype=dtype, device=device, **config_overrides)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> "RWKV7LM":
        """Loads a flash-linear-attention ``RWKV7ForCausalLM`` directory
        (``config.json`` + ``model.safetensors`` or sharded/bin variants)."""
        from prosg.models.checkpoint7 import load_fla

        return load_fla(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path) -> None:
        """Writes ``config.json`` and ``model.safetensors`` in fla's layout."""
        from prosg.models.checkpoint7 import save_fla

        save_fla(self, path)

    def to_blinkdl_state_dict(self) -> dict[str, Tensor]:
        """The weights under BlinkDL's x070 names and shapes (vectors ``[1, 1, H]``)."""
        from prosg.models.checkpoint7 import to_blinkdl

        return to_blinkdl(self)
