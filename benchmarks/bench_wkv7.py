"""``prosg.ops.wkv7`` (the RWKV-7 recurrence) against the ``rwkv`` package's CPU
recurrence, a plain torch loop under autograd, and torch.mm's multiply-add rate.

The op's width is the shape's ``dim`` in heads of 64: ``medium`` (B=8, T=1024,
D=768) is H=12, N=64; ``medium-b1`` the same for one sample.

Groups (each one (mode, device, dtype, shape); pytest-benchmark prints every
implementation's ratio to the fastest in its group):

* ``fwd``: forward under ``torch.no_grad``, returning the output and the state.
  ``prosg`` the op; ``rwkv`` the rwkv package's x070 CPU loop
  (``state = state * w + state @ ab + vk`` per step, its own source lines, one
  sequence at a time as the package runs it; CPU only); ``mm`` a float32 ``torch.mm``
  of 1024 x 1024 matrices on the same threads, the multiply-add rate yardstick. Every
  entry stores ``extra_info["GFLOP/s"]``: for the recurrence 10 N^2 flops per head and
  step (sa, the update and y: 5 multiply-adds per state element), for mm 2 n^3.
* ``fwdbwd``: forward plus the gradients of every input for random cotangents of out
  and state_out: ``prosg`` vs autograd through ``loop``, the recurrence as a plain
  torch loop over T (batched over samples and heads).

Run (CPU, one intra-op thread on a loaded machine; see README.md)::

    pytest benchmarks/bench_wkv7.py --bench-shapes=medium,medium-b1 --bench-threads=1
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import prosg  # noqa: F401  (loads torch.ops.prosg)
from prosg.ops import wkv7

HEAD_SIZE = 64
MM_SIZE = 1024


def _rwkv_loop():
    """The rwkv package's x070 CPU recurrence (the loop of RWKV_x070_TMix_seq), compiled
    from its own source lines (tests/test_wkv7.py checks it agrees with the op)."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None:
        pytest.skip("the rwkv package is not installed (pip install rwkv)")
    src = Path(spec.origin).with_name("model.py").read_text()
    m = re.search(r"\n( +)for t in range\(T\):\n((?:\1 +.*\n)+?)(?:\1 +xx\[t\] = .*\n)", src)
    if m is None or "state @ ab" not in m.group(2):
        pytest.skip("the rwkv package's x070 CPU loop has changed shape (model.py)")
    indent = len(m.group(1)) + 4
    body = "\n".join(line[indent:] for line in m.group(2).splitlines())
    out_line = re.search(r"\n +(xx\[t\] = .*)\n", src[m.start():]).group(1)
    code = ("def loop(H, N, T, r, w, k, v, kk, a, state, xx, x):\n    for t in range(T):\n"
            + "".join(f"        {line}\n" for line in (body + "\n" + out_line).splitlines()) + "    return xx, state\n")
    ns = {"torch": torch}
    exec(compile(code, "rwkv/model.py (RWKV_x070_TMix_seq loop)", "exec"), ns)  # noqa: S102
    return ns["loop"]


def dims(case):
    s = case.shape
    if s.dim % HEAD_SIZE:
        pytest.skip(f"wkv7 needs a width that is a multiple of {HEAD_SIZE}, got {s.dim}")
    return s.batch, s.seqlen, s.dim // HEAD_SIZE, HEAD_SIZE


def make_inputs(case, requires_grad=False):
    """RWKV-7's inputs: r, k ~ N(0, 1/N), v ~ N(0, 1), the model's decay factor
    exp(-0.606531 sigmoid(x)) as w = log(0.606531 sigmoid(x)), and its kk, a."""
    B, T, H, N = dims(case)
    kw = dict(device=case.device, dtype=case.dtype)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, **kw), dim=-1)
    a_model = torch.rand(B, T, H, N, **kw)
    inp = dict(r=torch.randn(B, T, H, N, **kw) / N**0.5,
               w=torch.log(0.606531 * torch.sigmoid(torch.randn(B, T, H, N, **kw))),
               k=torch.randn(B, T, H, N, **kw) / N**0.5, v=torch.randn(B, T, H, N, **kw), a=-kk, b=kk * a_model)
    extra = dict(kk=kk, a_model=a_model)
    return {k: v.requires_grad_(requires_grad) for k, v in inp.items()}, extra


def plain_loop(r, w, k, v, a, b):
    """The recurrence as a plain torch loop (float32, batched over samples and heads)."""
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N)
    d = torch.exp(-torch.exp(w))
    outs = []
    for t in range(T):
        sa = (S @ a[:, t, :, :, None])
        S = S * d[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :] + sa * b[:, t, :, None, :]
        outs.append((S @ r[:, t, :, :, None])[..., 0])
    return torch.stack(outs, 1), S


def flops(case) -> float:
    B, T, H, N = dims(case)
    return 10.0 * N * N * B * T * H


def describe(benchmark, mode, case, impl, **extra):
    s = case.shape
    B, T, H, N = dims(case)
    benchmark.group = f"wkv7 {mode} {case.device} {str(case.dtype).removeprefix('torch.')} {s}"
    benchmark.extra_info.update(op="wkv7", mode=mode, impl=impl, device=case.device,
                                dtype=str(case.dtype).removeprefix("torch."), shape=s.name, B=B, T=T, H=H, N=N,
                                threads=torch.get_num_threads(), torch=torch.__version__, **extra)


def record_rate(benchmark, n_flops):
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["GFLOP/s"] = round(n_flops / stats.stats.median / 1e9, 2)


def relative_error(a, b):
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


@pytest.mark.parametrize("impl", ["prosg", "rwkv", "mm"])
def test_forward(benchmark, case, impl, timed):
    if impl == "rwkv" and case.device != "cpu":
        pytest.skip("the rwkv package's loop is measured on the CPU")
    if case.dtype != torch.float32 and impl != "prosg":
        pytest.skip("the references run in float32")
    inp, extra = make_inputs(case)
    describe(benchmark, "fwd", case, impl)
    with torch.no_grad():
        if impl == "prosg":
            benchmark(timed(lambda: wkv7(**inp)))
            record_rate(benchmark, flops(case))
            if case.device == "cuda":
                # Bytes the forward must move: six inputs read, out written, the state.
                B, T, H, N = dims(case)
                nbytes = 7 * B * T * H * N * case.dtype.itemsize + B * H * N * N * 4
                benchmark.extra_info["bytes"] = nbytes
                stats = getattr(benchmark, "stats", None)
                if stats is not None:
                    benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.median / 1e9, 1)
        elif impl == "mm":
            x = torch.randn(MM_SIZE, MM_SIZE, device=case.device)
            y = torch.randn(MM_SIZE, MM_SIZE, device=case.device)
            benchmark(timed(lambda: torch.mm(x, y)))
            record_rate(benchmark, 2.0 * MM_SIZE**3)
        else:
            loop = _rwkv_loop()
            B, T, H, N = dims(case)
            decay = torch.exp(-torch.exp(inp["w"]))
            flat = lambda x, bb: x[bb].reshape(T, H * N)  # noqa: E731

            def run():
                return [loop(H, N, T, flat(inp["r"], bb), flat(decay, bb), flat(inp["k"], bb), flat(inp["v"], bb),
                             flat(extra["kk"], bb), flat(extra["a_model"], bb), torch.zeros(H, N, N),
                             torch.empty(T, H * N), torch.empty(0)) for bb in range(B)]

            got = run()
            out, st = wkv7(**inp)
            for bb, (xx, s) in enumerate(got):
                err = max(relative_error(out[bb].reshape(T, H * N), xx), relative_error(st[bb], s))
                assert err < 1e-4, f"rwkv disagrees with prosg on sample {bb}: max relative error {err:.3g}"
            benchmark.pedantic(run, rounds=3, iterations=1)
            record_rate(benchmark, flops(case))


@pytest.mark.parametrize("impl", ["prosg", "loop"])
def test_forward_backward(benchmark, case, impl, timed):
    if impl == "loop" and case.dtype != torch.float32:
        pytest.skip("the plain loop runs in float32")
    inp, _ = make_inputs(case, requires_grad=True)
    leaves = list(inp.values())
    B, T, H, N = dims(case)
    g_out = torch.randn(B, T, H, N, device=case.device, dtype=case.dtype)
    g_state = torch.randn(B, H, N, N, device=case.device)
    fn = (lambda: wkv7(**inp)) if impl == "prosg" else (lambda: plain_loop(**inp))

    def step():
        out, st = fn()
        return torch.autograd.grad((out, st), leaves, (g_out, g_state.to(st.dtype)))

    describe(benchmark, "fwdbwd", case, impl)
    if impl == "loop":
        # Seconds a call (T steps forward, its autograd graph backward): one round, and
        # its gradients compared with prosg's from the same inputs.
        got = benchmark.pedantic(timed(step), rounds=1, iterations=1)
        expected = torch.autograd.grad(wkv7(**inp), leaves, (g_out, g_state))
        for name, x, y in zip(inp, got, expected):
            err = relative_error(x, y)
            assert err < 1e-3, f"loop grad {name} disagrees with prosg: max relative error {err:.3g}"
    else:
        step()  # warm-up (thread pool, allocator)
        benchmark(timed(step))
