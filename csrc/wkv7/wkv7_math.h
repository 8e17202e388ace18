// The arithmetic of the RWKV-7 recurrence (the generalized delta rule), written once
// for the CPU and the CUDA kernels: every function here is __host__ __device__ and
// templated on
//   F    the number type of a group of key indices j: float or double (one j), or
//        at::vec::Vectorized<float/double> on the CPU (one j per lane);
//   Ops  the elementary operations: exp(x), neg(x), fma(x, y, z) = x*y + z,
//        sum(F) = the sum of F's lanes (the identity for a scalar), and
//        sum_all<M>(acc, out): out[m] = sum(acc[m]) for m < M (one transpose-and-add
//        for M vectors on the CPU instead of M separate reductions).
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
  template <int M, typename F>
  static PROSG_HD void sum_all(const F* acc, F* out) {
    for (int m = 0; m < M; ++m) out[m] = acc[m];
  }
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

// One forward step of M value rows at once: `s` holds the rows' R register groups
// each (row m at s + m * R; R = N / lanes) and is advanced in place; r, d, k, a, b
// point at the step's R groups (d already exp(-exp(w))); v[m] is the rows' v_i.
// Writes y_i to y[m]. The M rows are independent chains (instruction-level
// parallelism) sharing each load of r, d, k, a, b: the CPU steps 4 rows at a time;
// a CUDA thread has one row (M = 1).
template <class Ops, int R, int M, typename F, typename S>
PROSG_HD void forward_rows(F* s, const F* r, const F* d, const F* k, const F* a, const F* b, const S* v, S* y) {
  F acc[M];
  PROSG_WKV7_UNROLL
  for (int m = 0; m < M; ++m) acc[m] = F(S(0));
  // Each input group is read once into a local: the pointers may alias `s` as far as
  // the compiler knows, so a read inside the loop over m would be repeated per row.
  PROSG_WKV7_UNROLL
  for (int q = 0; q < R; ++q) {
    const F aq = a[q];
    PROSG_WKV7_UNROLL
    for (int m = 0; m < M; ++m) acc[m] = Ops::fma(aq, s[m * R + q], acc[m]);
  }
  S sums[M];
  Ops::template sum_all<M>(acc, sums);
  F sa[M], vv[M], out[M];
  PROSG_WKV7_UNROLL
  for (int m = 0; m < M; ++m) sa[m] = F(sums[m]), vv[m] = F(v[m]), out[m] = F(S(0));
  PROSG_WKV7_UNROLL
  for (int q = 0; q < R; ++q) {
    const F rq = r[q], dq = d[q], kq = k[q], bq = b[q];
    PROSG_WKV7_UNROLL
    for (int m = 0; m < M; ++m) {
      const F x = Ops::fma(s[m * R + q], dq, Ops::fma(vv[m], kq, sa[m] * bq));
      s[m * R + q] = x;
      out[m] = Ops::fma(x, rq, out[m]);
    }
  }
  Ops::template sum_all<M>(out, y);
}

// One forward step of one value row i (forward_rows with M = 1). Returns y_i.
template <class Ops, int R, typename F, typename S>
PROSG_HD S forward_row(F* s, const F* r, const F* d, const F* k, const F* a, const F* b, S v) {
  S y;
  forward_rows<Ops, R, 1>(s, r, d, k, a, b, &v, &y);
  return y;
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

// Column phase of the backward of one step, one (i, j) group, given both states:
// s = S_ij before the step and s_new = S'_ij after it, G = G_ij from the row phase;
// the row scalars gy_i and row.sa, row.dsa (v_i enters through G and S' only); d, a of
// key group j. Accumulates into `acc` and returns dL/dS_ij before the step.
template <class Ops, typename F, typename S>
PROSG_HD F backward_column_given(const F& s, const F& s_new, const F& G, S gy, S v, const RowGrad<S>& row,
                                 const F& d, const F& a, ColumnGrad<F>& acc) {
  const F vv(v), sa(row.sa), dsa(row.dsa);
  acc.dr = Ops::fma(F(gy), s_new, acc.dr);
  acc.dk = Ops::fma(G, vv, acc.dk);
  acc.db = Ops::fma(G, sa, acc.db);
  acc.dd = Ops::fma(G, s, acc.dd);
  acc.da = Ops::fma(dsa, s, acc.da);
  return Ops::fma(G, d, dsa * a);
}

// The same with S' recomputed from S (the GPU's column phase, which keeps only the
// states before each step): S'_ij = S_ij d_j + v_i k_j + sa_i b_j, as forward_rows.
template <class Ops, typename F, typename S>
PROSG_HD F backward_column(const F& s, const F& G, S gy, S v, const RowGrad<S>& row, const F& d, const F& k,
                           const F& a, const F& b, ColumnGrad<F>& acc) {
  const F s_new = Ops::fma(s, d, Ops::fma(F(v), k, F(row.sa) * b));
  return backward_column_given<Ops>(s, s_new, G, gy, v, row, d, a, acc);
}

}  // namespace prosg::wkv7
