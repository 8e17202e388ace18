"""Configuration of an RWKV-4 language model, with the fields and defaults of
transformers' ``RwkvConfig`` so that ``config.json`` files go both ways."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RWKV4Config:
    """Shape and inference settings of an RWKV-4 model.

    Attributes:
        vocab_size: number of tokens (rows of the embedding and of the head).
        hidden_size: width of the residual stream ``H``.
        num_hidden_layers: number of blocks ``L``.
        attention_hidden_size: width ``C`` of key/value/receptance of the time-mix
            (default ``hidden_size``); the WKV state is ``[B, 3, C]``.
        intermediate_size: width of the channel-mix key (default ``4 * hidden_size``).
        layer_norm_epsilon: epsilon of every LayerNorm.
        rescale_every: at inference (``model.eval()``) the residual stream is halved after
            every ``rescale_every`` blocks and the attention output / feed-forward value
            projections of block ``i`` are scaled by ``2 ** -(i // rescale_every)``, as
            transformers does to keep float16 in range; 0 (or negative) disables it.
            Training mode never rescales (as in transformers).
        tie_word_embeddings: the head shares the embedding matrix.
        bos_token_id, eos_token_id: carried to and from ``config.json`` only.
        context_length: carried to and from ``config.json`` only (the recurrence has no
            length limit).
    """

    vocab_size: int = 50277
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    attention_hidden_size: int | None = None
    intermediate_size: int | None = None
    layer_norm_epsilon: float = 1e-5
    rescale_every: int = 6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    context_length: int = 1024

    def __post_init__(self) -> None:
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "attention_hidden_size", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RWKV4Config.{name} must be a positive int, got {value!r}")
        for name in ("rescale_every", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"RWKV4Config.{name} must be an int, got {value!r}")
        eps = self.layer_norm_epsilon
        # bool is an int, and "1e-5" from a hand-edited config.json is a str: both would
        # otherwise fail later inside LayerNorm with a message that names neither.
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps > 0:
            raise ValueError(f"RWKV4Config.layer_norm_epsilon must be a finite number > 0, got {eps!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"RWKV4Config.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"RWKV4Config.{name} must be an int, a list of ints or None, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RWKV4Config":
        """From a transformers ``config.json`` dict; keys this model does not use
        (``architectures``, ``use_cache``, ...) are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object {{field: value}}, got {type(d).__name__}")
        model_type = d.get("model_type", "rwkv")
        if model_type != "rwkv":
            raise ValueError(f"config.json: model_type must be 'rwkv' (RWKV-4), got {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``RwkvConfig`` reads."""
        d = self.to_dict()
        d.update(model_type="rwkv", architectures=["RwkvForCausalLM"], use_cache=True)
        if dtype is not None:
            d["dtype"] = str(dtype).removeprefix("torch.")
        return d


#: The head sizes prosg.ops.wkv7 supports.
RWKV7_HEAD_SIZES = (16, 32, 64, 128)


@dataclass
class RWKV7Config:
    """Shape and inference settings of an RWKV-7 ("x070", Goose) model.

    Attributes:
        vocab_size: number of tokens.
        hidden_size: width ``H`` of the residual stream (also of r, k, v: ``heads * head_size``).
        num_hidden_layers: number of blocks ``L``.
        head_size: ``N``, the width of one head (16, 32, 64 or 128: the wkv7 kernel's);
            ``hidden_size`` must be a multiple of it.
        intermediate_size: width of the channel-mix key (default ``4 * hidden_size``).
        decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim: the
            inner widths of the w / a / v / g low-rank MLPs (BlinkDL's ``w1``, ``a1``,
            ``v1``, ``g1`` columns; fla's ``*_low_rank_dim``).
        layer_norm_epsilon: epsilon of every LayerNorm (fla's ``norm_eps``).
        group_norm_epsilon: epsilon of the per-head GroupNorm ``ln_x``. BlinkDL's code
            and the rwkv package use ``64e-5`` for every head size; fla uses
            ``head_dim * norm_eps`` (the same for head size 64).
        tie_word_embeddings: the head shares the embedding matrix.
        bos_token_id, eos_token_id: carried to and from ``config.json`` only.
    """

    vocab_size: int = 65536
    hidden_size: int = 768
    num_hidden_layers: int = 12
    head_size: int = 64
    intermediate_size: int | None = None
    decay_low_rank_dim: int = 64
    a_low_rank_dim: int = 64
    v_low_rank_dim: int = 32
    gate_low_rank_dim: int = 128
    layer_norm_epsilon: float = 1e-5
    group_norm_epsilon: float = 64e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0

    def __post_init__(self) -> None:
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            self.intermediate_size = 4 * self.hidden_size
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_size", "intermediate_size",
                     "decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RWKV7Config.{name} must be a positive int, got {value!r}")
        if self.head_size not in RWKV7_HEAD_SIZES:
            raise ValueError(f"RWKV7Config.head_size must be one of {RWKV7_HEAD_SIZES} (the wkv7 kernel's), "
                             f"got {self.head_size}")
        if self.hidden_size % self.head_size:
            raise ValueError(f"RWKV7Config.hidden_size ({self.hidden_size}) must be a multiple of head_size "
                             f"({self.head_size})")
        for name in ("layer_norm_epsilon", "group_norm_epsilon"):
            eps = getattr(self, name)
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or not eps > 0:
                raise ValueError(f"RWKV7Config.{name} must be a finite number > 0, got {eps!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"RWKV7Config.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"RWKV7Config.{name} must be an int, a list of ints or None, got {value!r}")

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RWKV7Config":
        """From our own :meth:`to_dict` (``model_type`` absent) or an fla
        ``RWKV7ForCausalLM`` ``config.json`` (``model_type`` ``'rwkv7'``; its field
        names are translated: ``head_dim``/``num_heads``, ``norm_eps``,
        ``hidden_ratio``; a hybrid ``attn`` config, ``value_dim`` other than
        ``hidden_size``, ``norm_bias: false`` or ``norm_first: false`` are refused)."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object {{field: value}}, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        if "model_type" not in d:
            return cls(**{k: v for k, v in d.items() if k in names})
        if d["model_type"] not in ("rwkv7", "rwkv7_fla"):
            raise ValueError(f"config.json: model_type must be 'rwkv7' (fla's RWKV7ForCausalLM), "
                             f"got {d['model_type']!r}")
        hidden = d.get("hidden_size", 2048)
        layers = d.get("num_hidden_layers", 24)
        if d.get("attn") is not None:
            raise ValueError(f"config.json: attn={d['attn']!r} (a hybrid model with softmax-attention layers) "
                             "is not supported")
        for key, want in (("norm_bias", True), ("norm_first", True)):
            if d.get(key, want) is not want:
                raise ValueError(f"config.json: {key} must be {str(want).lower()}, got {d[key]!r}")
        if d.get("hidden_act", "sqrelu") != "sqrelu":
            raise ValueError(f"config.json: hidden_act must be 'sqrelu', got {d['hidden_act']!r}")
        value_dim = d.get("value_dim")
        if value_dim is not None:
            dims = value_dim if isinstance(value_dim, list) else [value_dim]
            if any(v != hidden for v in dims):
                raise ValueError(f"config.json: value_dim must be hidden_size ({hidden}) in every layer, "
                                 f"got {value_dim!r}")
        head = d.get("head_dim")
        if head is None:
            heads = d.get("num_heads")
            if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or hidden % heads:
                raise ValueError(f"config.json: needs head_dim, or num_heads dividing hidden_size, got "
                                 f"head_dim=None, num_heads={heads!r}")
            head = hidden // heads
        inter = d.get("intermediate_size")
        if inter is None:
            # fla's rule: int(hidden * hidden_ratio) rounded up to a multiple of 32.
            ratio = d.get("hidden_ratio") or 4
            inter = int(hidden * ratio)
            inter = 32 * ((inter + 31) // 32)
        norm_eps = d.get("norm_eps", 1e-5)
        fields = dict(vocab_size=d.get("vocab_size", 32000), hidden_size=hidden, num_hidden_layers=layers,
                      head_size=head, intermediate_size=inter,
                      decay_low_rank_dim=d.get("decay_low_rank_dim", 64), a_low_rank_dim=d.get("a_low_rank_dim", 64),
                      v_low_rank_dim=d.get("v_low_rank_dim", 16), gate_low_rank_dim=d.get("gate_low_rank_dim", 128),
                      layer_norm_epsilon=norm_eps,
                      tie_word_embeddings=d.get("tie_word_embeddings", False),
                      bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 2))
        # Our own key (fla ignores it); without it, fla's head_dim * norm_eps.
        gn = d.get("prosg_group_norm_epsilon")
        if gn is None and isinstance(head, int) and isinstance(norm_eps, (int, float)):
            gn = head * norm_eps
        if gn is not None:
            fields["group_norm_epsilon"] = gn
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """A ``config.json`` dict that fla's ``RWKV7Config`` reads (plus
        ``prosg_group_norm_epsilon``, which fla ignores: it derives the GroupNorm
        epsilon as ``head_dim * norm_eps``)."""
        d = dict(model_type="rwkv7", architectures=["RWKV7ForCausalLM"], attn=None, attn_mode="chunk",
                 hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers, head_dim=self.head_size,
                 num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                 hidden_ratio=self.intermediate_size / self.hidden_size,
                 decay_low_rank_dim=self.decay_low_rank_dim, a_low_rank_dim=self.a_low_rank_dim,
                 v_low_rank_dim=self.v_low_rank_dim, gate_low_rank_dim=self.gate_low_rank_dim,
                 value_dim=[self.hidden_size] * self.num_hidden_layers, hidden_act="sqrelu",
                 norm_eps=self.layer_norm_epsilon, norm_bias=True, norm_first=True, fuse_norm=True,
                 prosg_group_norm_epsilon=self.group_norm_epsilon, vocab_size=self.vocab_size,
                 tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                 eos_token_id=self.eos_token_id, use_cache=True)
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d
