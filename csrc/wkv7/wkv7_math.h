// The arithmetic of the RWKV-7 recurrence (the generalized delta rule), written once
// for the CPU and the CUDA kernels: every function here is __host__ __device__ and
// templated on
//   F    the number type of a group of key indices j: float or double (one j), or
//        at::vec::Vectorized<float/double> on the CPU (one j per lane);
//   Ops  the elementary operations: exp(x), neg(x), fma(x, y, z) = x*y + z, and
//        sum(F) = the sum of F's lanes (the identity for a scalar).
// So the CPU tests exercise exactly the arithmetic the GPU runs.
//
// Per (sample, head) the state S is N x N, indexed [value i, key j]. A step with
// receptance r, log-log decay w, key k, value v and the rank-one pair (a, b) is
//   d_j  = exp(-exp(w_j))
//   sa_i = sum_j a_j S_ij
//   S_ij <- S_ij d_j + v_i k_j + sa_i b_j        (S <- S (diag(d) + a b^T) + v k^T)
//   y_i  = sum_j S_ij r_j                         (after the update)
// Each value row i evolves on its own, which is what the kernels parallelise over.
//
// Backward of a step, with g = dL/dS after the step and gy = dL/dy:
//   G_ij     = g_ij + gy_i r_j                     (dL/dS_ij after the update, all of it)
//   dv_i     = sum_j G_ij k_j,   dsa_i = sum_j G_ij b_j          (row reductions)
//   dr_j    += gy_i S'_ij, dk_j += G_ij v_i, db_j += G_ij sa_i,
//   dd_j    += G_ij S_ij,  da_j += dsa_i S_ij                    (column reductions over i)
//   g_prev_ij = G_ij d_j + dsa_i a_j                             (row-local again)
//   dw_j     = dd_j * d(d_j)/dw_j = -dd_j exp(w_j - exp(w_j))
// where S is the state before the step and S' after it. The kernels run the row
// phase (backward_row) for every i, then the column phase (backward_column) for every
// (i, j); the CPU vectorises both over j, the GPU maps i, then j, to threads.
#pragma once

#include <math.h>

#include "common/dtype.h"

// nvcc unrolls the loops over a row's R register groups so that a thread's row stays
// in registers (a dynamic index would spill it to local memory); host compilers unroll
// constant trip counts at -O3 on their own and warn about nvcc's pragma.
#if defined(__CUDACC__)
#define PROSG_WKV7_UNROLL _Pragma("unroll")
#else
#define PROSG_WKV7_UNROLL
#endif

namespace prosg::wkv7 {

// The head sizes the kernels are instantiated for (a template argument, so that a
// CUDA thread's state row of N floats stays in registers).
constexpr int kHeadSizes[] = {16, 32, 64, 128};

PROSG_HD constexpr bool supported_head_size(long long n) { return n == 16 || n == 32 || n == 64 || n == 128; }

// Scalar operations for float and double, host and device.
struct ScalarOps {
  static PROSG_HD float exp(float x) { return expf(x); }
  static PROSG_HD double exp(double x) { return ::exp(x); }
  static PROSG_HD float fma(float x, float y, float z) { return fmaf(x, y, z); }
  static PROSG_HD double fma(double x, double y, double z) { return ::fma(x, y, z); }
  static PROSG_HD float neg(float x) { return -x; }
  static PROSG_HD double neg(double x) { return -x; }
  static PROSG_HD float sum(float x) { return x; }
  static PROSG_HD double sum(double x) { return x; }
};

// d = exp(-exp(w)). For w -> +inf, exp(w) overflows to inf and d is exactly 0; for
// w -> -inf, d is exactly 1: no NaN anywhere.
template <class Ops, typename F>
PROSG_HD F decay(const F& w) {
  return Ops::exp(Ops::neg(Ops::exp(w)));
}

// dL/dw from dL/dd: d(d)/dw = -exp(w) exp(-exp(w)) = -exp(w - exp(w)), one exponential
// of a number that is never +inf (w - exp(w) <= -1), so no inf * 0 = NaN for large |w|.
template <class Ops, typename F>
PROSG_HD F decay_grad(const F& w, const F& dd) {
  return Ops::neg(dd * Ops::exp(w - Ops::exp(w)));
}

// One forward step of one value row i: `s` holds the row's R groups of key indices
// (R = N / lanes) and is advanced in place; r, d, k, a, b point at the step's R groups
// (d already exp(-exp(w))); v is v_i. Returns y_i.
template <class Ops, int R, typename F, typename S>
PROSG_HD S forward_row(F* s, const F* r, const F* d, const F* k, const F* a, const F* b, S v) {
  F acc(S(0));
  PROSG_WKV7_UNROLL
  for (int q = 0; q < R; ++q) acc = Ops::fma(a[q], s[q], acc);
  const F sa(Ops::sum(acc));
  const F vv(v);
  F y(S(0));
  PROSG_WKV7_UNROLL
  for (int q = 0; q < R; ++q) {
    s[q] = Ops::fma(s[q], d[q], Ops::fma(vv, k[q], sa * b[q]));
    y = Ops::fma(s[q], r[q], y);
  }
  return Ops::sum(y);
}

// The row scalars of the backward of one step for value row i.
template <typename S>
struct RowGrad {
  S sa;   // sum_j a_j S_ij (recomputed)
  S dv;   // dL/dv_i
  S dsa;  // dL/dsa_i
};

// Row phase of the backward of one step, value row i: `s` is the row before the step,
// `g` holds dL/dS_i after the step on entry and G_i = g_i + gy_i r on exit.
template <class Ops, int R, typename F, typename S>
PROSG_HD RowGrad<S> backward_row(const F* s, F* g, const F* r, const F* k, const F* a, const F* b, S gy) {
  F sa(S(0)), dv(S(0)), dsa(S(0));
  const F gyv(gy);
  PROSG_WKV7_UNROLL
  for (int q = 0; q < R; ++q) {
    sa = Ops::fma(a[q], s[q], sa);
    const F G = Ops::fma(gyv, r[q], g[q]);
    g[q] = G;
    dv = Ops::fma(G, k[q], dv);
    dsa = Ops::fma(G, b[q], dsa);
  }
  return RowGrad<S>{Ops::sum(sa), Ops::sum(dv), Ops::sum(dsa)};
}

// Per-key sums over the value rows i of one step: dL/dr_j, dL/dk_j, dL/da_j, dL/db_j
// and dL/dd_j (turned into dL/dw_j by decay_grad once every row is in).
template <typename F>
struct ColumnGrad {
  F dr, dk, da, db, dd;
};

// Column phase of the backward of one step, one (i, j) group: s = S_ij before the
// step, G = G_ij from the row phase; the row scalars gy_i, v_i and row.sa, row.dsa;
// d, k, a, b of key group j. Accumulates into `acc` and returns dL/dS_ij before the
// step.
template <class Ops, typename F, typename S>
PROSG_HD F backward_column(const F& s, const F& G, S gy, S v, const RowGrad<S>& row, const F& d, const F& k,
                           const F& a, const F& b, ColumnGrad<F>& acc) {
  const F vv(v), sa(row.sa), dsa(row.dsa);
  const F s_new = Ops::fma(s, d, Ops::fma(vv, k, sa * b));
  acc.dr = Ops::fma(F(gy), s_new, acc.dr);
  acc.dk = Ops::fma(G, vv, acc.dk);
  acc.db = Ops::fma(G, sa, acc.db);
  acc.dd = Ops::fma(G, s, acc.dd);
  acc.da = Ops::fma(dsa, s, acc.da);
  return Ops::fma(G, d, dsa * a);
}

}  // namespace prosg::wkv7
