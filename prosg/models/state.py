"""The recurrent states of the RWKV-4 and RWKV-7 models and the per-sample low-rank weight deltas.

Both are plain tensors in dataclasses, so they move with ``.to()``, can be detached,
indexed by sample and saved with ``torch.save``. The model checks them on entry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from prosg.numerics import EMPTY_MAX, accumulation_dtype
# The matrices of a block that can carry a delta, in the order the fused decode-step
# ops take their deltas (the one definition of both).
from prosg.ops.rwkv4_step import CHANNEL_MIX_KINDS as FEED_FORWARD_KINDS
from prosg.ops.rwkv4_step import TIME_MIX_KINDS as ATTENTION_KINDS

_NAME = re.compile(r"^blocks\.(\d+)\.(attention|feed_forward)\.(\w+)$")


@dataclass
class _ShiftWkvState:
    """What the RWKV-4 and RWKV-7 states share: per layer the two token-shift vectors
    ``att_shift`` / ``ffn_shift`` ``[L, B, H]`` (activation dtype) and a WKV state
    ``wkv`` ``[L, B, ...]`` (float32, float64 for a float64 model); dimension 1 of every
    tensor is the batch. Subclasses name the WKV layout (``_WKV_LAYOUT``) and check its
    shape further (``_check_wkv_shape``)."""

    att_shift: Tensor
    ffn_shift: Tensor
    wkv: Tensor

    _WKV_LAYOUT = ""

    def __post_init__(self) -> None:
        cls = type(self).__name__
        for name, dims, layout in (("att_shift", 3, "[L, B, H]"), ("ffn_shift", 3, "[L, B, H]"),
                                   ("wkv", self._WKV_LAYOUT.count(",") + 1, self._WKV_LAYOUT)):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"{cls}.{name} must be a Tensor {layout}, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{cls}.{name} must be a floating-point tensor {layout}, got {t.dtype}")
            if t.dim() != dims:
                raise ValueError(f"{cls}.{name} must be a {dims}-D tensor {layout}, got shape {list(t.shape)}")
        self._check_wkv_shape()
        if self.wkv.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{cls}.wkv must be float32 (float64 for a float64 model), got {self.wkv.dtype}")
        devices = {n: getattr(self, n).device for n in ("att_shift", "ffn_shift", "wkv")}
        if len(set(devices.values())) > 1:
            raise ValueError(f"{cls}: all tensors must be on one device, got "
                             f"{', '.join(f'{n} on {d}' for n, d in devices.items())}")

    def _check_wkv_shape(self) -> None:
        pass

    def _map(self, fn):
        return type(self)(fn(self.att_shift), fn(self.ffn_shift), fn(self.wkv))

    @property
    def num_layers(self) -> int:
        return self.att_shift.shape[0]

    @property
    def batch_size(self) -> int:
        return self.att_shift.shape[1]

    @property
    def device(self) -> torch.device:
        return self.att_shift.device

    def to(self, *args, **kwargs):
        """Moves every tensor like ``Tensor.to``. A dtype given applies to the shift
        vectors only: the WKV state stays float32 (float64 with a float64 dtype)."""
        shift_a = self.att_shift.to(*args, **kwargs)
        shift_f = self.ffn_shift.to(*args, **kwargs)
        wkv_dtype = self.wkv.dtype if shift_a.dtype == self.att_shift.dtype else accumulation_dtype(shift_a.dtype)
        wkv = self.wkv.to(device=shift_a.device, dtype=wkv_dtype, non_blocking=kwargs.get("non_blocking", False))
        return type(self)(shift_a, shift_f, wkv)

    def detach(self):
        return self._map(Tensor.detach)

    def clone(self):
        return self._map(Tensor.clone)

    def index_select(self, index: Tensor | list[int]):
        """The state of the samples ``index`` (in that order; repeats allowed)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return self._map(lambda t: t.index_select(1, idx))

    def index_copy_(self, index: Tensor, source):
        """Writes ``source``'s samples into rows ``index`` of this state, in place."""
        for name in ("att_shift", "ffn_shift", "wkv"):
            getattr(self, name).index_copy_(1, index, getattr(source, name))
        return self

    def repeat(self, n: int):
        """Each sample repeated ``n`` times in place (``repeat_interleave``): a prompt
        prefilled once with batch 1 continued by ``n`` samples with their own deltas."""
        return self._map(lambda t: t.repeat_interleave(n, 1))


@dataclass
class RWKV4State(_ShiftWkvState):
    """Recurrent state of every layer after the last token seen.

    Attributes:
        att_shift: ``[L, B, H]``: the time-mix input (``ln1`` output) of the last token,
            i.e. the "previous token" of the next token shift. Activation dtype.
        ffn_shift: ``[L, B, H]``: the channel-mix input (``ln2`` output) of the last token.
        wkv: ``[L, B, 3, C]``: numerator, denominator and running maximum of the WKV
            recurrence, float32 (float64 for a float64 model).

    Passing the state returned by ``model(ids_a)`` to ``model(ids_b, state=...)``
    gives exactly the logits of ``model(cat(ids_a, ids_b))`` for ``ids_b``.

    Construction checks what a state can check alone: tensors, floating point (an
    integer state cast to float would run silently on truncated values), the number of
    dimensions, a float32/float64 WKV state (16 bits cannot hold the running maximum's
    ``-1e38`` / the sums' precision) and one device. The model checks the sizes against
    its config (the number of layers, the batch size, the widths).
    """

    _WKV_LAYOUT = "[L, B, 3, C]"

    def _check_wkv_shape(self) -> None:
        if self.wkv.shape[2] != 3:
            raise ValueError(f"RWKV4State.wkv must be [L, B, 3, C] (numerator, denominator, maximum), "
                             f"got shape {list(self.wkv.shape)}")

    @classmethod
    def zeros(cls, num_layers: int, batch: int, hidden_size: int, attention_size: int, *,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "RWKV4State":
        """The state before any token: zero shifts, WKV ``(0, 0, -1e38)``."""
        shift = torch.zeros(num_layers, batch, hidden_size, dtype=dtype, device=device)
        wkv = torch.zeros(num_layers, batch, 3, attention_size, dtype=accumulation_dtype(dtype), device=device)
        wkv[:, :, 2] = EMPTY_MAX
        return cls(shift, shift.clone(), wkv)

    @classmethod
    def from_hf(cls, state: list[Tensor] | tuple[Tensor, ...]) -> "RWKV4State":
        """From transformers' five ``[B, H, L]`` tensors (feed-forward shift, attention
        shift, numerator, denominator, maximum)."""
        if len(state) != 5:
            raise ValueError(f"RWKV4State.from_hf: expected transformers' 5 state tensors, got {len(state)}")
        ffn, att, num, den, mx = (s.permute(2, 0, 1) for s in state)
        return cls(att.contiguous(), ffn.contiguous(), torch.stack([num, den, mx], 2).contiguous())

    def to_hf(self) -> list[Tensor]:
        """transformers' layout: five ``[B, H, L]`` tensors."""
        num, den, mx = self.wkv.unbind(2)
        return [t.permute(1, 2, 0).contiguous() for t in (self.ffn_shift, self.att_shift, num, den, mx)]


@dataclass
class RWKV7State(_ShiftWkvState):
    """Recurrent state of every layer of an RWKV-7 model after the last token seen.

    Attributes:
        att_shift: ``[L, B, H]``: the time-mix input (``ln1`` output) of the last token
            (the "previous token" of the next token shift). Activation dtype.
        ffn_shift: ``[L, B, H]``: the channel-mix input (``ln2`` output) of the last token.
        wkv: ``[L, B, heads, N, N]``: the generalized-delta-rule state of every head,
            indexed ``[value i, key j]`` as :func:`prosg.ops.wkv7` and the ``rwkv``
            package keep it; float32 (float64 for a float64 model).

    RWKV-7's value residual (``v_first``, layer 0's value) is per token, not state.
    Passing the state returned by ``model(ids_a)`` to ``model(ids_b, state=...)``
    gives the logits of ``model(cat(ids_a, ids_b))`` for ``ids_b``.

    Construction checks what a state can check alone (tensors, floating point, the
    number of dimensions, a float32/float64 WKV state, square heads, one device); the
    model checks the sizes against its config.
    """

    _WKV_LAYOUT = "[L, B, heads, N, N]"

    def _check_wkv_shape(self) -> None:
        if self.wkv.shape[3] != self.wkv.shape[4]:
            raise ValueError(f"RWKV7State.wkv must be [L, B, heads, N, N] (square per head), "
                             f"got shape {list(self.wkv.shape)}")

    @classmethod
    def zeros(cls, num_layers: int, batch: int, hidden_size: int, num_heads: int, head_size: int, *,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "RWKV7State":
        """The state before any token: all zeros."""
        shift = torch.zeros(num_layers, batch, hidden_size, dtype=dtype, device=device)
        wkv = torch.zeros(num_layers, batch, num_heads, head_size, head_size, dtype=accumulation_dtype(dtype),
                          device=device)
        return cls(shift, shift.clone(), wkv)


@dataclass
class Delta:
    """Per-sample low-rank modifications of the model's projection matrices.

    ``factors[name] = (U, V)`` with ``U [B, Dout, r]`` and ``V [B, Din, r]`` turns the
    weight ``W [Dout, Din]`` of module ``name`` into ``W + scale * U_b V_b^T`` for
    sample ``b``; the per-sample weights are never formed. Names are module paths as in
    transformers' state dict without the ``rwkv.`` prefix and ``.weight`` suffix:
    ``blocks.<i>.attention.{key,value,receptance,output}`` and
    ``blocks.<i>.feed_forward.{key,receptance,value}``. Ranks may differ between
    modules. The model also accepts the plain dict (scale 1).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.factors, Mapping):
            raise TypeError(f"Delta.factors must be a dict {{name: (U, V)}}, got {type(self.factors).__name__}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"Delta.scale must be a float, got {self.scale!r} ({type(self.scale).__name__})")
        if not math.isfinite(self.scale):
            raise ValueError(f"Delta.scale must be finite, got {self.scale}")

    @classmethod
    def coerce(cls, delta: "Delta | dict | None") -> "Delta | None":
        """A Delta from a Delta, a ``{name: (U, V)}`` dict, or None."""
        if delta is None or isinstance(delta, Delta):
            return delta
        if isinstance(delta, dict):
            return cls(dict(delta))
        raise TypeError(f"delta must be a prosg.models.Delta, a dict {{name: (U, V)}} or None, got {type(delta)}")

    def to(self, *args, **kwargs) -> "Delta":
        """Moves (and casts) every factor like ``Tensor.to``."""
        return Delta({k: (u.to(*args, **kwargs), v.to(*args, **kwargs)) for k, (u, v) in self.factors.items()},
                     self.scale)

    def detach(self) -> "Delta":
        return Delta({k: (u.detach(), v.detach()) for k, (u, v) in self.factors.items()}, self.scale)

    @property
    def batch_size(self) -> int | None:
        for u, _ in self.factors.values():
            return u.shape[0]
        return None

    def parameters(self) -> list[Tensor]:
        """Every factor tensor (U then V of each module), e.g. for an optimizer."""
        return [t for uv in self.factors.values() for t in uv]


def parse_delta_name(name: str, kinds: Mapping[str, tuple[str, ...]] | None = None) -> tuple[int, str, str]:
    """``'blocks.3.attention.key'`` -> ``(3, 'attention', 'key')``. A ``rwkv.`` prefix
    and a ``.weight`` suffix (state-dict spelling) are accepted.

    ``kinds`` (``{part: (kind, ...)}``) is the model's own set of matrices per part
    (RWKV-7's feed-forward has no receptance); None means RWKV-4's
    (:data:`ATTENTION_KINDS`, :data:`FEED_FORWARD_KINDS`). An unknown name is refused
    with a message listing the valid ones."""
    bare = name.removeprefix("rwkv.").removesuffix(".weight")
    m = _NAME.match(bare)
    if kinds is not None:
        if m is None or m.group(2) not in kinds or m.group(3) not in kinds[m.group(2)]:
            valid = " or ".join(f"blocks.<i>.{part}.{{{','.join(ks)}}}" for part, ks in kinds.items())
            raise ValueError(f"delta: unknown module name {name!r}; expected {valid}")
        return int(m.group(1)), m.group(2), m.group(3)
    kinds = {"attention": ATTENTION_KINDS, "feed_forward": FEED_FORWARD_KINDS}
    if m is None or m.group(3) not in kinds[m.group(2)]:
        raise ValueError(
            f"delta: unknown module name {name!r}; expected blocks.<i>.attention.{{{','.join(ATTENTION_KINDS)}}} "
            f"or blocks.<i>.feed_forward.{{{','.join(FEED_FORWARD_KINDS)}}}")
    return int(m.group(1)), m.group(2), m.group(3)
