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
