"""The one table of per-dtype tolerances for every test of prosg.

Usage (``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path``)::

    from tolerances import TOL, assert_close
    assert_close(y, y_ref, x.dtype, what="lowrank_linear y")

How the numbers were chosen. A kernel is compared with a float64 reference fed the
*same* inputs (already rounded to the kernel's dtype and converted to float64), so the
rounding of the inputs is not an error source; what remains is

* the accumulation: every prosg kernel accumulates in float32 (float64 for float64
  inputs). A dot product of length K in precision u has an error of about
  sqrt(K) * u * sum|a_i b_i| for random data (K * u in the worst case). The tests use
  K up to about a thousand and scale their inputs so that outputs are O(1), so
  float32 accumulation stays below 1e-5 and float64 below 1e-12;
* for float16 / bfloat16, the rounding of the output to the storage type: half an ulp,
  u = 2^-11 (float16) or 2^-8 (bfloat16) relative. A fused op may round one
  intermediate it stores (lowrank_linear stores the shared GEMM's output in the input
  dtype, then adds the low-rank term and rounds again), and an intermediate can be
  larger than the result when terms cancel, so the tolerance allows 4u relative plus
  4u absolute at unit scale: rtol covers large values, atol covers values near zero
  that come from cancelling O(1) terms.

A test whose values are not O(1) should scale its data, or pass ``atol=``/``rtol=``
(and say why in a comment) rather than edit this table.
"""

from __future__ import annotations

import torch

_U16 = 2.0**-11  # float16 unit roundoff (10 explicit mantissa bits)
_UBF16 = 2.0**-8  # bfloat16 unit roundoff (7 explicit mantissa bits)

TOL: dict[torch.dtype, dict[str, float]] = {
    # Same math, other summation order: a few hundred ulps of float64 at unit scale.
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    # float32 accumulation: sqrt(K) * u * sum|a_i b_i| ~ 32 * 6e-8 * 3 ~ 6e-6 for K = 1024
    # terms at unit output; lowrank_linear's tests use at most 20% of this.
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    # One or two roundings to the storage type (see above): 4u.
    # lowrank_linear's tests use at most half of these.
    torch.float16: dict(atol=4 * _U16, rtol=4 * _U16),  # ~2e-3
    torch.bfloat16: dict(atol=4 * _UBF16, rtol=4 * _UBF16),  # ~1.6e-2
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    """``dict(atol=..., rtol=...)`` for a computation carried out in ``dtype``."""
    try:
        return dict(TOL[dtype])
    except KeyError:
        raise KeyError(f"no tolerance for dtype {dtype}; known: {list(TOL)}") from None


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    what: str = "",
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Asserts ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    Both are compared in float64 (on the CPU), so a float64 reference is never rounded
    to the kernel's dtype. ``dtype`` is the precision the kernel computed in and picks
    the tolerances in :data:`TOL`; ``atol``/``rtol`` override them. The failure message
    starts with ``what`` and gives the largest errors and where they are. NaNs count
    as mismatches unless both sides have them in the same places.
    """
    t = tol(dtype)
    t["atol"] = t["atol"] if atol is None else atol
    t["rtol"] = t["rtol"] if rtol is None else rtol
    label = what or "tensor"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{label}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    torch.testing.assert_close(
        a, e, equal_nan=True, **t,
        msg=lambda m: f"{label} ({dtype}, atol={t['atol']:.3g}, rtol={t['rtol']:.3g}): {m}",
    )
