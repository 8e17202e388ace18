"""Adversarial tests of every prosg op: the calls a kernel test does not make.

* Mixed devices with ``meta``: one argument on meta makes the dispatcher pick the
  Meta (fake) kernel for the whole call, so the fake kernel must reject the device mix
  (it used to return an uninitialised CPU tensor, or a meta one).
* Fake kernels validate like the C++ kernels: a bad call raises the same exception,
  word for word, on CPU tensors, on meta tensors, under FakeTensorMode and when traced
  by torch.compile.
* Double backward: lowrank_linear's second derivatives are right (against the float64
  reference and finite differences); wkv4 refuses ``create_graph=True``.
* Ops without a derivative (the decode steps, the backward ops) refuse inputs that
  require grad while grad mode is on, naming the argument, instead of dropping the
  gradient; under no_grad / inference_mode they run.

Every op is described once (:class:`Spec`): its overload, valid CPU arguments by
schema name, and how its device errors read; the tests iterate over the specs.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import pytest
import torch
from tolerances import assert_close
from torch._subclasses.fake_tensor import FakeTensorMode

import prosg  # noqa: F401  (loads torch.ops.prosg)
from prosg.ops import (lowrank_linear, rwkv4_channel_mix_step, rwkv4_time_mix_step, rwkv7_channel_mix_step,
                       rwkv7_time_mix_step, wkv4, wkv7)
from prosg.ops.rwkv4_step import CHANNEL_MIX_KINDS, TIME_MIX_KINDS
from prosg.ops.rwkv7_step import CHANNEL_MIX_KINDS as RWKV7_CHANNEL_MIX_KINDS
from prosg.ops.rwkv7_step import TIME_MIX_KINDS as RWKV7_TIME_MIX_KINDS
from prosg.reference import lowrank_linear_ref

OPS = torch.ops.prosg


def _randn(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------------------------
# The ops, their valid arguments, and what their device errors say


@dataclasses.dataclass(frozen=True)
class Spec:
    op: torch._ops.OpOverload
    make: Callable[[], dict]  # valid CPU float32 arguments by schema name
    ref: str  # the argument every other one is checked against
    first: str  # the argument checked first against ref (named when ref itself is odd one out)
    # (label, name) of the error for element j of a list argument (the decode steps
    # validate their deltas in lowrank_linear's words)
    list_item: Callable[[str, int], tuple[str, str]] | None = None

    @property
    def label(self) -> str:
        return f"prosg.{self.op._opname}"

    def call(self, args: dict):
        return self.op(*(args[a.name] for a in self.op._schema.arguments))


# lowrank_linear: B=3, T=4, Din=5, Dout=6, r=2.
def _lowrank_args():
    return dict(x=_randn(3, 4, 5), weight=_randn(6, 5, scale=5**-0.5), bias=_randn(6),
                U=_randn(3, 6, 2, scale=0.7), V=_randn(3, 5, 2, scale=5**-0.5), scale=0.5)


def _lowrank_backward_args():
    a = _lowrank_args()
    del a["bias"]
    return dict(a, grad_out=_randn(3, 4, 6), output_mask=[True] * 5)


# wkv4: B=3, T=4, C=5, r=2, with an initial state.
def _wkv4_args():
    state = torch.stack([_randn(3, 5).abs(), _randn(3, 5).abs() + 1, _randn(3, 5)], 1)
    return dict(time_decay=_randn(5, scale=0.5), time_first=_randn(5, scale=0.5), key=_randn(3, 4, 5),
                value=_randn(3, 4, 5), state=state, key_z=_randn(3, 4, 2), key_u=_randn(3, 5, 2, scale=0.3),
                value_z=_randn(3, 4, 2), value_u=_randn(3, 5, 2, scale=0.3))


def _wkv4_backward_args():
    return dict(_wkv4_args(), grad_out=_randn(3, 4, 5), grad_state_out=_randn(3, 3, 5))


# wkv7: B=2, T=3, H=2, N=16, with an initial state.
def _wkv7_args():
    kk = torch.nn.functional.normalize(_randn(2, 3, 2, 16), dim=-1)
    return dict(r=_randn(2, 3, 2, 16, scale=0.25), w=_randn(2, 3, 2, 16), k=_randn(2, 3, 2, 16, scale=0.25),
                v=_randn(2, 3, 2, 16), a=-kk, b=kk * 0.5, state=_randn(2, 2, 16, 16, scale=0.5))


def _wkv7_backward_args():
    return dict(_wkv7_args(), grad_out=_randn(2, 3, 2, 16), grad_state_out=_randn(2, 2, 16, 16))


# Decode steps: B=2, H=5, attention width C=6, feed-forward width F=7, r=2.
def _pair(dout, din):
    return [_randn(2, dout, 2, scale=0.7), _randn(2, din, 2, scale=din**-0.5)]


def _time_mix_args():
    state = torch.stack([_randn(2, 6).abs(), _randn(2, 6).abs() + 1, _randn(2, 6)], 1)
    return dict(x=_randn(2, 5), shift=_randn(2, 5), wkv_state=state, time_mix_key=torch.rand(1, 1, 5),
                time_mix_value=torch.rand(1, 1, 5), time_mix_receptance=torch.rand(1, 1, 5),
                time_decay=_randn(6, scale=0.5), time_first=_randn(6, scale=0.5),
                key_weight=_randn(6, 5, scale=0.45), value_weight=_randn(6, 5, scale=0.45),
                receptance_weight=_randn(6, 5, scale=0.45), output_weight=_randn(5, 6, scale=0.4),
                deltas=_pair(6, 5) + _pair(6, 5) + _pair(6, 5) + _pair(5, 6), scale=0.7)


def _channel_mix_args():
    return dict(x=_randn(2, 5), shift=_randn(2, 5), time_mix_key=torch.rand(1, 1, 5),
                time_mix_receptance=torch.rand(1, 1, 5), key_weight=_randn(7, 5, scale=0.45),
                receptance_weight=_randn(5, 5, scale=0.45), value_weight=_randn(5, 7, scale=0.38),
                deltas=_pair(7, 5) + _pair(5, 5) + _pair(5, 7), scale=0.7)


# The RWKV-7 decode step: B=2, H=1, N=16 (C=16), low-rank widths 3/4/5/2, r=2, a later
# layer (with v_first and the value residual's MLP).
def _rwkv7_time_mix_args():
    C = 16
    vec = {n: torch.rand(C) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_k", "k_a")}
    return dict(x=_randn(2, C), shift=_randn(2, C), wkv_state=_randn(2, 1, 16, 16, scale=0.3),
                v_first=_randn(2, C), **{n: vec[n] for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")},
                w0=_randn(C, scale=0.5), w1=_randn(C, 3, scale=0.25), w2=_randn(3, C, scale=0.3),
                a0=_randn(C, scale=0.5), a1=_randn(C, 4, scale=0.25), a2=_randn(4, C, scale=0.3),
                g1=_randn(C, 5, scale=0.25), g2=_randn(5, C, scale=0.3),
                v0=_randn(C, scale=0.5), v1=_randn(C, 2, scale=0.25), v2=_randn(2, C, scale=0.3),
                k_k=vec["k_k"], k_a=vec["k_a"], r_k=_randn(1, 16, scale=0.3),
                receptance_weight=_randn(C, C, scale=0.25), key_weight=_randn(C, C, scale=0.25),
                value_weight=_randn(C, C, scale=0.25), output_weight=_randn(C, C, scale=0.25),
                ln_x_weight=torch.ones(C) + _randn(C, scale=0.1), ln_x_bias=_randn(C, scale=0.1), ln_x_eps=64e-5,
                deltas=_pair(C, C) + _pair(C, C) + _pair(C, C) + _pair(C, C), scale=0.7)


# The RWKV-7 channel-mix step: B=2, C=16, F=7, r=2.
def _rwkv7_channel_mix_args():
    return dict(x=_randn(2, 16), shift=_randn(2, 16), x_k=torch.rand(16), key_weight=_randn(7, 16, scale=0.25),
                value_weight=_randn(16, 7, scale=0.38), deltas=_pair(7, 16) + _pair(16, 7), scale=0.7)


def _delta_factor(name: str, j: int) -> tuple[str, str]:
    return "prosg.lowrank_linear", "UV"[j % 2]


SPECS = {
    "lowrank_linear": Spec(OPS.lowrank_linear.default, _lowrank_args, "x", "weight"),
    "lowrank_linear_backward": Spec(OPS.lowrank_linear_backward.default, _lowrank_backward_args, "x", "weight"),
    "wkv4": Spec(OPS.wkv4.default, _wkv4_args, "key", "value"),
    "wkv4_backward": Spec(OPS.wkv4_backward.default, _wkv4_backward_args, "key", "value"),
    "wkv7": Spec(OPS.wkv7.default, _wkv7_args, "r", "w"),
    "wkv7_backward": Spec(OPS.wkv7_backward.default, _wkv7_backward_args, "r", "w"),
    "rwkv4_time_mix_step": Spec(OPS.rwkv4_time_mix_step.default, _time_mix_args, "x", "shift", _delta_factor),
    "rwkv4_channel_mix_step": Spec(OPS.rwkv4_channel_mix_step.default, _channel_mix_args, "x", "shift",
                                   _delta_factor),
    "rwkv7_time_mix_step": Spec(OPS.rwkv7_time_mix_step.default, _rwkv7_time_mix_args, "x", "shift",
                                _delta_factor),
    "rwkv7_channel_mix_step": Spec(OPS.rwkv7_channel_mix_step.default, _rwkv7_channel_mix_args, "x", "shift",
                                   _delta_factor),
}


def tensor_slots(args: dict):
    """``(name, j)`` of every tensor argument (j: the index in a list argument, else None)."""
    for name, v in args.items():
        if isinstance(v, torch.Tensor):
            yield name, None
        elif isinstance(v, list):
            yield from ((name, j) for j, t in enumerate(v) if isinstance(t, torch.Tensor))


def item(args: dict, slot) -> torch.Tensor:
    name, j = slot
    return args[name] if j is None else args[name][j]


def replaced(args: dict, slot, fn) -> dict:
    """``args`` with the tensor at ``slot`` replaced by ``fn(tensor)``."""
    name, j = slot
    out = dict(args)
    if j is None:
        out[name] = fn(args[name])
    else:
        out[name] = [fn(t) if i == j else t for i, t in enumerate(args[name])]
    return out


def mapped(args: dict, fn) -> dict:
    """``args`` with every tensor replaced by ``fn(tensor)``."""
    return {k: fn(v) if isinstance(v, torch.Tensor)
            else [fn(t) if isinstance(t, torch.Tensor) else t for t in v] if isinstance(v, list) else v
            for k, v in args.items()}


def slot_id(slot) -> str:
    name, j = slot
    return name if j is None else f"{name}[{j}]"


DEVICE_CASES = [pytest.param(spec_name, slot, id=f"{spec_name}-{slot_id(slot)}")
                for spec_name, spec in SPECS.items() for slot in tensor_slots(spec.make())]


# ------------------------------------------------------------------------------------
# 1. Mixed devices with meta


@pytest.mark.parametrize("odd,rest", [("meta", "cpu"), ("cpu", "meta")], ids=["one-on-meta", "one-on-cpu"])
@pytest.mark.parametrize("spec_name,slot", DEVICE_CASES)
def test_device_mix_with_meta_is_rejected(spec_name, slot, odd, rest):
    """One argument on meta, the rest on the CPU (or the reverse): the dispatcher runs
    the meta kernel, whose error names the argument, its device and the expected one
    (it returned an uninitialised CPU tensor, or a meta one). When the odd one out is
    the argument the others are checked against, the first one checked is named."""
    spec = SPECS[spec_name]
    valid = spec.make()
    args = replaced(mapped(valid, lambda t: t.to(rest)), slot, lambda _: item(valid, slot).to(odd))
    name, j = slot
    if name == spec.ref:
        label, named, want, got = spec.label, spec.first, odd, rest
    else:
        label, named = spec.list_item(name, j) if j is not None else (spec.label, name)
        want, got = rest, odd
    with torch.no_grad(), pytest.raises(ValueError) as info:
        spec.call(args)
    assert str(info.value) == f"{label}: {named} must be on the same device as {spec.ref} ({want}), got {got}"


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_all_on_meta_gives_the_shapes(spec_name):
    """Consistent meta arguments still get meta results shaped like the CPU ones."""
    spec = SPECS[spec_name]
    args = spec.make()
    with torch.no_grad():
        cpu, meta = spec.call(args), spec.call(mapped(args, lambda t: t.to("meta")))
    cpu, meta = (cpu, meta) if isinstance(cpu, tuple) else ((cpu,), (meta,))
    for c, m in zip(cpu, meta, strict=True):
        assert m.device.type == "meta" and (m.shape, m.dtype) == (c.shape, c.dtype)


def test_python_entry_points_reject_meta_mixes():
    """The reported instances, through the public functions."""
    lr = _lowrank_args()
    with pytest.raises(ValueError, match=r"^prosg\.lowrank_linear: weight must be on the same device as x \(cpu\), "
                                         r"got meta$"):
        lowrank_linear(lr["x"], lr["weight"].to("meta"))
    with pytest.raises(ValueError, match=r"^prosg\.lowrank_linear: weight must be on the same device as x \(meta\)"):
        lowrank_linear(lr["x"].to("meta"), lr["weight"])
    w = _wkv4_args()
    with pytest.raises(ValueError, match=r"^prosg\.wkv4: time_decay must be on the same device as key \(cpu\), "
                                         r"got meta$"):
        wkv4(w["time_decay"].to("meta"), w["time_first"], w["key"], w["value"])


# ------------------------------------------------------------------------------------
# 2. The fake kernels validate like the C++ kernels


NAMES7 = ("r", "w", "k", "v", "a", "b", "state")


def _bad(spec_name: str, **changes) -> tuple[str, Callable[[], dict]]:
    """``(op, make)``: ``make()`` gives the op's valid arguments with ``changes`` applied
    (a value, or a function of the valid arguments)."""
    def make():
        args = SPECS[spec_name].make()
        for k, v in changes.items():
            args[k] = v(args) if callable(v) else v
        return args

    return spec_name, make


def _with_delta(j: int, t):
    return lambda a: [t if i == j else d for i, d in enumerate(a["deltas"])]


BAD_CALLS = {
    # lowrank_linear (B=3, T=4, Din=5, Dout=6, r=2)
    "ll x 4-D": _bad("lowrank_linear", x=_randn(3, 4, 5, 1)),
    "ll x integer": _bad("lowrank_linear", x=torch.ones(3, 4, 5, dtype=torch.int32)),
    "ll weight width": _bad("lowrank_linear", weight=_randn(6, 4)),
    "ll weight 1-D": _bad("lowrank_linear", weight=_randn(6)),
    "ll weight dtype": _bad("lowrank_linear", weight=_randn(6, 5, dtype=torch.float16)),
    "ll bias width": _bad("lowrank_linear", bias=_randn(5)),
    "ll bias dtype": _bad("lowrank_linear", bias=_randn(6, dtype=torch.float64)),
    "ll U without V": _bad("lowrank_linear", V=None),
    "ll V without U": _bad("lowrank_linear", U=None),
    "ll rank": _bad("lowrank_linear", V=_randn(3, 5, 3)),
    "ll U batch": _bad("lowrank_linear", U=_randn(2, 6, 2)),
    "ll V batch": _bad("lowrank_linear", V=_randn(4, 5, 2)),
    "ll U width": _bad("lowrank_linear", U=_randn(3, 7, 2)),
    "ll V width": _bad("lowrank_linear", V=_randn(3, 4, 2)),
    "ll U 2-D": _bad("lowrank_linear", U=_randn(6, 2)),
    "ll V 2-D": _bad("lowrank_linear", V=_randn(5, 2)),
    "ll V dtype": _bad("lowrank_linear", V=_randn(3, 5, 2, dtype=torch.bfloat16)),
    "ll float64 x, float32 weight": _bad("lowrank_linear", x=_randn(3, 4, 5, dtype=torch.float64)),
    "ll 2-D x, U batch": _bad("lowrank_linear", x=_randn(3, 5), U=_randn(1, 6, 2)),
    # lowrank_linear_backward
    "llb grad_out width": _bad("lowrank_linear_backward", grad_out=_randn(3, 4, 5)),
    "llb grad_out length": _bad("lowrank_linear_backward", grad_out=_randn(3, 5, 6)),
    "llb grad_out 2-D for 3-D x": _bad("lowrank_linear_backward", grad_out=_randn(3, 6)),
    "llb grad_out dtype": _bad("lowrank_linear_backward", grad_out=_randn(3, 4, 6, dtype=torch.float16)),
    "llb V batch": _bad("lowrank_linear_backward", V=_randn(2, 5, 2)),
    "llb weight dtype": _bad("lowrank_linear_backward", weight=_randn(6, 5, dtype=torch.float64)),
    # wkv4 (B=3, T=4, C=5, r=2)
    "wkv key 2-D": _bad("wkv4", key=_randn(4, 5)),
    "wkv key integer": _bad("wkv4", key=torch.ones(3, 4, 5, dtype=torch.int32)),
    "wkv value width": _bad("wkv4", value=_randn(3, 4, 6)),
    "wkv value length": _bad("wkv4", value=_randn(3, 5, 5)),
    "wkv value batch": _bad("wkv4", value=_randn(2, 4, 5)),
    "wkv value dtype": _bad("wkv4", value=_randn(3, 4, 5, dtype=torch.float16)),
    "wkv time_decay width": _bad("wkv4", time_decay=_randn(6)),
    "wkv time_first 2-D": _bad("wkv4", time_first=_randn(1, 5)),
    "wkv time_decay integer": _bad("wkv4", time_decay=torch.ones(5, dtype=torch.int64)),
    "wkv state rows": _bad("wkv4", state=_randn(3, 2, 5)),
    "wkv state batch": _bad("wkv4", state=_randn(1, 3, 5)),
    "wkv state width": _bad("wkv4", state=_randn(3, 3, 4)),
    "wkv state dtype": _bad("wkv4", state=_randn(3, 3, 5, dtype=torch.float64)),
    "wkv bfloat16 state": _bad("wkv4", **{k: (lambda a, k=k: a[k].bfloat16())
                                          for k in ("key", "value", "state", "key_z", "key_u", "value_z",
                                                    "value_u")}),
    "wkv key_z rank": _bad("wkv4", key_u=_randn(3, 5, 3)),
    "wkv key_z batch": _bad("wkv4", key_z=_randn(2, 4, 2)),
    "wkv key_z length": _bad("wkv4", key_z=_randn(3, 5, 2)),
    "wkv value_u width": _bad("wkv4", value_u=_randn(3, 6, 2)),
    "wkv key_u 2-D": _bad("wkv4", key_u=_randn(5, 2)),
    "wkv value_z 2-D": _bad("wkv4", value_z=_randn(4, 2)),
    "wkv key_z alone": _bad("wkv4", key_u=None),
    "wkv value_u alone": _bad("wkv4", value_z=None),
    "wkv key_z dtype": _bad("wkv4", key_z=_randn(3, 4, 2, dtype=torch.bfloat16)),
    # wkv4_backward
    "wkvb grad_out width": _bad("wkv4_backward", grad_out=_randn(3, 4, 6)),
    "wkvb grad_out dtype": _bad("wkv4_backward", grad_out=_randn(3, 4, 5, dtype=torch.float16)),
    "wkvb grad_state_out 2-D": _bad("wkv4_backward", grad_state_out=_randn(3, 5)),
    "wkvb grad_state_out dtype": _bad("wkv4_backward", grad_state_out=_randn(3, 3, 5, dtype=torch.float64)),
    "wkvb value length": _bad("wkv4_backward", value=_randn(3, 3, 5)),
    # wkv7 (B=2, T=3, H=2, N=16)
    "wkv7 r 3-D": _bad("wkv7", r=_randn(2, 3, 32)),
    "wkv7 r integer": _bad("wkv7", r=torch.ones(2, 3, 2, 16, dtype=torch.int32)),
    "wkv7 head size 8": _bad("wkv7", **{k: (lambda a, k=k: a[k][..., :8]) for k in "rwkvab"},
                             state=_randn(2, 2, 8, 8)),
    "wkv7 head size 20 (w mismatched too)": _bad("wkv7", r=_randn(2, 3, 2, 20)),
    "wkv7 w heads": _bad("wkv7", w=_randn(2, 3, 3, 16)),
    "wkv7 k length": _bad("wkv7", k=_randn(2, 4, 2, 16)),
    "wkv7 v batch": _bad("wkv7", v=_randn(1, 3, 2, 16)),
    "wkv7 a dtype": _bad("wkv7", a=_randn(2, 3, 2, 16, dtype=torch.bfloat16)),
    "wkv7 b 3-D": _bad("wkv7", b=_randn(2, 3, 32)),
    "wkv7 state shape": _bad("wkv7", state=_randn(2, 2, 16, 8)),
    "wkv7 state dtype": _bad("wkv7", state=_randn(2, 2, 16, 16, dtype=torch.float64)),
    "wkv7 bfloat16 state": _bad("wkv7", **{k: (lambda a, k=k: a[k].bfloat16()) for k in NAMES7}),
    # wkv7_backward
    "wkv7b grad_out shape": _bad("wkv7_backward", grad_out=_randn(2, 3, 2, 32)),
    "wkv7b grad_out dtype": _bad("wkv7_backward", grad_out=_randn(2, 3, 2, 16, dtype=torch.float16)),
    "wkv7b grad_state_out shape": _bad("wkv7_backward", grad_state_out=_randn(2, 2, 16)),
    "wkv7b grad_state_out dtype": _bad("wkv7_backward", grad_state_out=_randn(2, 2, 16, 16, dtype=torch.float64)),
    "wkv7b k shape": _bad("wkv7_backward", k=_randn(2, 3, 2, 32)),
    # rwkv4_time_mix_step (B=2, H=5, C=6, r=2)
    "tm x 3-D": _bad("rwkv4_time_mix_step", x=_randn(2, 1, 5)),
    "tm x integer": _bad("rwkv4_time_mix_step", x=torch.ones(2, 5, dtype=torch.int64)),
    "tm shift width": _bad("rwkv4_time_mix_step", shift=_randn(2, 4)),
    "tm shift batch": _bad("rwkv4_time_mix_step", shift=_randn(3, 5)),
    "tm shift dtype": _bad("rwkv4_time_mix_step", shift=_randn(2, 5, dtype=torch.bfloat16)),
    "tm key_weight 1-D": _bad("rwkv4_time_mix_step", key_weight=_randn(6)),
    "tm value_weight width": _bad("rwkv4_time_mix_step", value_weight=_randn(6, 4)),
    "tm receptance_weight rows": _bad("rwkv4_time_mix_step", receptance_weight=_randn(7, 5)),
    "tm output_weight transposed": _bad("rwkv4_time_mix_step", output_weight=_randn(6, 5)),
    "tm output_weight dtype": _bad("rwkv4_time_mix_step", output_weight=_randn(5, 6, dtype=torch.float64)),
    "tm state rows": _bad("rwkv4_time_mix_step", wkv_state=_randn(2, 2, 6)),
    "tm state batch": _bad("rwkv4_time_mix_step", wkv_state=_randn(3, 3, 6)),
    "tm state dtype": _bad("rwkv4_time_mix_step", wkv_state=_randn(2, 3, 6, dtype=torch.float64)),
    "tm time_decay width": _bad("rwkv4_time_mix_step", time_decay=_randn(5)),
    "tm time_first 2-D": _bad("rwkv4_time_mix_step", time_first=_randn(1, 6)),
    "tm time_mix_value elements": _bad("rwkv4_time_mix_step", time_mix_value=torch.rand(1, 1, 4)),
    "tm deltas count": _bad("rwkv4_time_mix_step", deltas=lambda a: a["deltas"][:6]),
    "tm value delta U alone": _bad("rwkv4_time_mix_step", deltas=_with_delta(3, None)),
    "tm key delta rank": _bad("rwkv4_time_mix_step", deltas=_with_delta(1, _randn(2, 5, 3))),
    "tm receptance delta batch": _bad("rwkv4_time_mix_step", deltas=_with_delta(4, _randn(3, 6, 2))),
    "tm output delta width": _bad("rwkv4_time_mix_step", deltas=_with_delta(7, _randn(2, 5, 2))),
    "tm output delta dtype": _bad("rwkv4_time_mix_step", deltas=_with_delta(6, _randn(2, 5, 2, dtype=torch.float16))),
    # rwkv4_channel_mix_step (B=2, H=5, F=7, r=2)
    "cm x 1-D": _bad("rwkv4_channel_mix_step", x=_randn(5)),
    "cm shift width": _bad("rwkv4_channel_mix_step", shift=_randn(2, 6)),
    "cm key_weight width": _bad("rwkv4_channel_mix_step", key_weight=_randn(7, 4)),
    "cm receptance_weight rows": _bad("rwkv4_channel_mix_step", receptance_weight=_randn(7, 5)),
    "cm value_weight transposed": _bad("rwkv4_channel_mix_step", value_weight=_randn(7, 5)),
    "cm value_weight dtype": _bad("rwkv4_channel_mix_step", value_weight=_randn(5, 7, dtype=torch.float16)),
    "cm time_mix_receptance elements": _bad("rwkv4_channel_mix_step", time_mix_receptance=torch.rand(6)),
    "cm deltas count": _bad("rwkv4_channel_mix_step", deltas=lambda a: a["deltas"] + [None, None]),
    "cm receptance delta V alone": _bad("rwkv4_channel_mix_step", deltas=_with_delta(2, None)),
    "cm value delta width": _bad("rwkv4_channel_mix_step", deltas=_with_delta(5, _randn(2, 5, 2))),
    "cm key delta batch": _bad("rwkv4_channel_mix_step", deltas=_with_delta(0, _randn(1, 7, 2))),
    # rwkv7_time_mix_step (B=2, C=16, H=1, N=16, r=2)
    "r7 x 1-D": _bad("rwkv7_time_mix_step", x=_randn(16)),
    "r7 state head size": _bad("rwkv7_time_mix_step", wkv_state=_randn(2, 1, 16, 8)),
    "r7 r_k flat": _bad("rwkv7_time_mix_step", r_k=_randn(16)),
    "r7 r_k head size 8": _bad("rwkv7_time_mix_step", r_k=_randn(2, 8)),
    "r7 v1 without v2": _bad("rwkv7_time_mix_step", v2=None),
    "r7 v_first in layer 0": _bad("rwkv7_time_mix_step", v0=None, v1=None, v2=None),
    "r7 w1 half": _bad("rwkv7_time_mix_step", w1=_randn(16, 3, dtype=torch.float16)),
    "r7 g2 rows": _bad("rwkv7_time_mix_step", g2=_randn(4, 16)),
    "r7 x_g elements": _bad("rwkv7_time_mix_step", x_g=torch.rand(15)),
    "r7 eps": _bad("rwkv7_time_mix_step", ln_x_eps=-1.0),
    "r7 deltas count": _bad("rwkv7_time_mix_step", deltas=lambda a: a["deltas"][:6]),
    "r7 output delta width": _bad("rwkv7_time_mix_step", deltas=_with_delta(6, _randn(2, 15, 2))),
    "r7 key delta V alone": _bad("rwkv7_time_mix_step", deltas=_with_delta(0, None)),
    # rwkv7_channel_mix_step (B=2, C=16, F=7, r=2)
    "c7 x 3-D": _bad("rwkv7_channel_mix_step", x=_randn(2, 1, 16)),
    "c7 shift dtype": _bad("rwkv7_channel_mix_step", shift=_randn(2, 16, dtype=torch.float64)),
    "c7 x_k elements": _bad("rwkv7_channel_mix_step", x_k=torch.rand(15)),
    "c7 key_weight width": _bad("rwkv7_channel_mix_step", key_weight=_randn(7, 15)),
    "c7 value_weight transposed": _bad("rwkv7_channel_mix_step", value_weight=_randn(7, 16)),
    "c7 value_weight dtype": _bad("rwkv7_channel_mix_step", value_weight=_randn(16, 7, dtype=torch.float16)),
    "c7 deltas count": _bad("rwkv7_channel_mix_step", deltas=lambda a: a["deltas"][:2]),
    "c7 value delta U alone": _bad("rwkv7_channel_mix_step", deltas=_with_delta(3, None)),
    "c7 key delta width": _bad("rwkv7_channel_mix_step", deltas=_with_delta(0, _randn(2, 6, 2))),
    "c7 value delta batch": _bad("rwkv7_channel_mix_step", deltas=_with_delta(3, _randn(3, 7, 2))),
}


def _outcome(fn) -> tuple[type, str] | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (the type is what is compared)
        return type(e), str(e)
    return None


def _outcomes(spec: Spec, args: dict) -> dict[str, tuple[type, str] | None]:
    """What the call raises on the CPU kernel, on meta tensors and under FakeTensorMode."""
    mode = FakeTensorMode()
    fake_args = mapped(args, mode.from_tensor)

    def under_fake_mode():
        with mode:
            spec.call(fake_args)

    with torch.no_grad():
        return {"cpu": _outcome(lambda: spec.call(args)),
                "meta": _outcome(lambda: spec.call(mapped(args, lambda t: t.to("meta")))),
                "fake": _outcome(under_fake_mode)}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_fake_kernels_reject_what_the_kernels_reject(case):
    spec_name, make = BAD_CALLS[case]
    got = _outcomes(SPECS[spec_name], make())
    assert got["cpu"] is not None and got["cpu"][0] is ValueError, f"the CPU kernel accepts {case}: {got['cpu']}"
    assert got["meta"] == got["cpu"], "meta tensors"
    assert got["fake"] == got["cpu"], "FakeTensorMode"


def _creatable_dtypes():
    out = []
    for name in dir(torch):
        dtype = getattr(torch, name)
        quantized = str(dtype).startswith("torch.q")  # not plain tensors: the op never sees them
        if isinstance(dtype, torch.dtype) and dtype not in out and dtype != torch.float32 and not quantized:
            try:
                with warnings.catch_warnings():  # "ComplexHalf support is experimental", ...
                    warnings.simplefilter("ignore")
                    torch.empty(6, 5, dtype=dtype).to("meta")
            except Exception:  # noqa: BLE001, S112  (dtypes without plain tensors: nothing to check)
                continue
            out.append(dtype)
    return sorted(out, key=str)


@pytest.mark.filterwarnings("ignore:.*support is experimental")
@pytest.mark.parametrize("dtype", _creatable_dtypes(), ids=str)
def test_dtype_names_match_the_kernels(dtype):
    """Every dtype is named in the fake kernels' messages as c10 prints it (Float, Long, UInt16, ...)."""
    args = _lowrank_args()
    args["weight"] = torch.empty(6, 5, dtype=dtype)
    got = _outcomes(SPECS["lowrank_linear"], args)
    assert got["cpu"] is not None and "weight must have dtype Float" in got["cpu"][1]
    assert got["meta"] == got["cpu"] and got["fake"] == got["cpu"]


def _compiled(spec: Spec, backend="aot_eager"):
    """``spec.call`` through torch.compile(fullgraph=True) (the schema is read here,
    outside the traced function)."""
    names = [a.name for a in spec.op._schema.arguments]
    compiled = torch.compile(lambda *values: spec.op(*values), fullgraph=True, backend=backend)
    return lambda args: compiled(*(args[n] for n in names))


COMPILED_BAD_CALLS = ["ll V batch", "wkv value width", "wkv7 head size 8", "tm state batch", "cm value delta width"]


@pytest.mark.parametrize("case", COMPILED_BAD_CALLS)
def test_compile_fails_at_trace_time_with_the_kernels_message(case):
    """torch.compile(fullgraph=True) traces through the fake kernel: the bad call fails
    while tracing, before any graph reaches the backend, with the C++ kernel's message."""
    spec_name, make = BAD_CALLS[case]
    spec, args = SPECS[spec_name], make()
    with torch.no_grad():
        expected = _outcome(lambda: spec.call(args))[1]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception) as info:
        _compiled(spec, backend)(args)
    assert not graphs, "traced without an error: the kernel raised at run time"
    assert expected in str(info.value)


# ------------------------------------------------------------------------------------
# 3. Double backward


def _leaves(args: dict, dtype=torch.float64) -> dict:
    return {k: v.detach().to(dtype).requires_grad_(True) if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}


LOWRANK_VARIANTS = {
    # name: (x shape, bias, delta)
    "3d": ((3, 4, 5), True, True),
    "2d": ((3, 5), True, True),
    "noUV": ((3, 4, 5), True, False),
    "nobias": ((3, 4, 5), False, True),
}


def _lowrank_leaves(variant: str, dtype=torch.float64) -> dict:
    shape, bias, delta = LOWRANK_VARIANTS[variant]
    a = _lowrank_args()
    a["x"] = _randn(*shape)
    if not bias:
        a["bias"] = None
    if not delta:
        a["U"] = a["V"] = None
    return _leaves({k: v for k, v in a.items() if k != "scale"}, dtype)


def _present(a: dict) -> list[str]:
    return [k for k in ("x", "weight", "bias", "U", "V") if a[k] is not None]


@pytest.mark.parametrize("variant", list(LOWRANK_VARIANTS))
def test_lowrank_linear_gradgradcheck(variant):
    """Second derivatives (grad_out included) against finite differences of the first."""
    a = _lowrank_leaves(variant)
    names = _present(a)

    def f(*tensors):
        return lowrank_linear(**{**a, **dict(zip(names, tensors))}, scale=-0.7)

    assert torch.autograd.gradgradcheck(f, [a[k] for k in names])


def _second_order(fn, a: dict, names: list[str], seed: int = 1):
    """Hessian-vector products of a nonlinear loss of ``fn``'s output: d/dinputs of
    <d loss/d inputs, v>, and the first derivatives themselves."""
    gen = torch.Generator().manual_seed(seed)
    y = fn(**a, scale=-0.7)
    c = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    loss = (torch.tanh(y) * c).sum()
    first = torch.autograd.grad(loss, [a[k] for k in names], create_graph=True)
    vs = [torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.dtype) for g in first]
    second = torch.autograd.grad(sum((g * v).sum() for g, v in zip(first, vs)), [a[k] for k in names])
    return first, second


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("variant", list(LOWRANK_VARIANTS))
def test_lowrank_linear_second_derivatives_match_reference(variant, dtype):
    """Hessian-vector products through the op equal those through the float64 reference
    (which forms the dense per-sample weights); so do the first derivatives taken with
    create_graph=True, which take the differentiable formulas instead of the fused kernel."""
    a = _lowrank_leaves(variant, dtype)
    names = _present(a)
    first, second = _second_order(lowrank_linear, a, names)
    ref_first, ref_second = _second_order(lowrank_linear_ref, _leaves(a), names)
    for k, g, r in zip(names, first, ref_first):
        assert_close(g, r, dtype, f"create_graph grad {k}")
    for k, g, r in zip(names, second, ref_second):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"second derivative {k}")


def test_wkv4_double_backward_raises():
    a = _leaves(_wkv4_args())
    out, state = wkv4(a["time_decay"], a["time_first"], a["key"], a["value"], a["state"],
                      (a["key_z"], a["key_u"]), (a["value_z"], a["value_u"]))
    loss = (out**2).sum() + state.sum()
    with pytest.raises(RuntimeError, match=r"^prosg\.wkv4: double backward is not supported"):
        torch.autograd.grad(loss, [a["key"], a["time_decay"]], create_graph=True)
    # Once differentiable, as before.
    g_key, _ = torch.autograd.grad(loss, [a["key"], a["time_decay"]])
    assert torch.isfinite(g_key).all() and not g_key.requires_grad


def test_wkv7_double_backward_raises():
    a = _leaves(_wkv7_args())
    out, state = wkv7(*(a[k] for k in NAMES7))
    loss = (out**2).sum() + state.sum()
    with pytest.raises(RuntimeError, match=r"^prosg\.wkv7: double backward is not supported"):
        torch.autograd.grad(loss, [a["k"], a["w"]], create_graph=True)
    g_k, _ = torch.autograd.grad(loss, [a["k"], a["w"]])
    assert torch.isfinite(g_k).all() and not g_k.requires_grad


@pytest.mark.parametrize("spec_name", ["lowrank_linear_backward", "wkv4_backward", "wkv7_backward"])
def test_backward_ops_refuse_inputs_requiring_grad(spec_name):
    """Called directly, the backward ops have no derivative: refuse rather than hand
    back gradients whose own gradients are silently zero."""
    spec = SPECS[spec_name]
    args = spec.make()
    for slot in tensor_slots(args):
        with pytest.raises(RuntimeError, match=rf"^{spec.label}: {slot_id(slot)} requires grad, but {spec.label} "
                                               r"has no derivative"):
            spec.call(replaced(args, slot, lambda t: t.clone().requires_grad_(True)))
    with torch.no_grad():
        spec.call(mapped(args, lambda t: t.clone().requires_grad_(True)))


# ------------------------------------------------------------------------------------
# 4. Inference-only ops refuse inputs that require grad


STEP_SPECS = ["rwkv4_time_mix_step", "rwkv4_channel_mix_step", "rwkv7_time_mix_step", "rwkv7_channel_mix_step"]
STEP_CASES = [pytest.param(spec_name, slot, id=f"{spec_name}-{slot_id(slot)}")
              for spec_name in STEP_SPECS for slot in tensor_slots(SPECS[spec_name].make())]
KINDS = {"rwkv4_time_mix_step": TIME_MIX_KINDS, "rwkv4_channel_mix_step": CHANNEL_MIX_KINDS,
         "rwkv7_time_mix_step": RWKV7_TIME_MIX_KINDS, "rwkv7_channel_mix_step": RWKV7_CHANNEL_MIX_KINDS}


def _step_name(spec_name: str, slot) -> str:
    name, j = slot
    if j is None:
        return name
    return rf"deltas\[{j}\] \(the {KINDS[spec_name][j // 2]} delta's {'UV'[j % 2]}\)"


def _python_call(spec_name: str, args: dict):
    """The public function on the op's arguments (deltas as (U, V) pairs)."""
    flat = args["deltas"]
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    rest = {k: v for k, v in args.items() if k not in ("deltas", "scale")}
    if spec_name == "rwkv7_time_mix_step":
        positional = [rest.pop(k) for k in ("x", "shift", "wkv_state", "v_first")]
        return rwkv7_time_mix_step(*positional, **rest, deltas=pairs, scale=args["scale"])
    if spec_name == "rwkv7_channel_mix_step":
        positional = [rest.pop(k) for k in ("x", "shift")]
        return rwkv7_channel_mix_step(*positional, **rest, deltas=pairs, scale=args["scale"])
    fn = rwkv4_time_mix_step if spec_name == "rwkv4_time_mix_step" else rwkv4_channel_mix_step
    return fn(*rest.values(), deltas=pairs, scale=args["scale"])


@pytest.mark.parametrize("spec_name,slot", STEP_CASES)
def test_inference_only_ops_refuse_inputs_requiring_grad(spec_name, slot):
    """Every tensor argument that requires grad (time_mix_key and time_decay were let
    through and their .grad stayed None) is refused, named, through the public function
    and the op itself; under no_grad / inference_mode the same call runs."""
    spec = SPECS[spec_name]
    args = spec.make()
    with torch.no_grad():
        expected = spec.call(args)
    grad_args = replaced(args, slot, lambda t: t.clone().requires_grad_(True))
    match = rf"^prosg\.{spec_name}: {_step_name(spec_name, slot)} requires grad, but prosg\.{spec_name} is " \
            r"inference-only"
    with pytest.raises(RuntimeError, match=match):
        _python_call(spec_name, grad_args)
    with pytest.raises(RuntimeError, match=match):
        spec.call(grad_args)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = spec.call(grad_args)
        for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple)
                        else (expected,)):
            assert torch.equal(g, e) and not g.requires_grad


def test_inference_only_op_still_compiles_under_no_grad():
    """The Autograd-key check does not get in the way of tracing."""
    torch._dynamo.reset()
    spec = SPECS["rwkv4_time_mix_step"]
    args = _leaves(spec.make(), torch.float32)
    compiled = _compiled(spec)
    with torch.no_grad():
        got, expected = compiled(args), spec.call(args)
    for g, e in zip(got, expected):
        assert_close(g, e, torch.float32, "compiled decode step")
    with pytest.raises(Exception, match=r"requires grad, but prosg\.rwkv4_time_mix_step is inference-only"):
        compiled(args)
