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

// The update of state entries: S_ij d_j + v_i k_j + sa_i b_j, rounded the same way in
// both layouts below (row-major forward_rows, key-major forward_keys).
template <class Ops, typename F>
PROSG_HD F updated_entry(const F& s, const F& d, const F& k, const F& v, const F& sa, const F& b) {
  return Ops::fma(s, d, Ops::fma(v, k, sa * b));
}

// One forward step of M value rows at once: `s` holds the rows' R register groups
// each (row m at s + m * R; R = N / lanes) and is advanced in place; r, d, k, a, b
// point at the step's R groups (d already exp(-exp(w))); v[m] is the rows' v_i.
// Writes y_i to y[m]. The M rows are independent chains (instruction-level
// parallelism) sharing each load of r, d, k, a, b: the CPU steps 4 rows at a time;
// a CUDA thread has one row (M = 1).
// forward_rows_to writes the advanced rows to s_next instead (it may equal s).
template <class Ops, int R, int M, typename F, typename S>
PROSG_HD void forward_rows_to(const F* s, F* s_next, const F* r, const F* d, const F* k, const F* a, const F* b,
                              const S* v, S* y) {
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
      const F x = updated_entry<Ops>(s[m * R + q], dq, kq, vv[m], sa[m], bq);
      s_next[m * R + q] = x;
      out[m] = Ops::fma(x, rq, out[m]);
    }
  }
  Ops::template sum_all<M>(out, y);
}

template <class Ops, int R, int M, typename F, typename S>
PROSG_HD void forward_rows(F* s, const F* r, const F* d, const F* k, const F* a, const F* b, const S* v, S* y) {
  forward_rows_to<Ops, R, M>(s, s, r, d, k, a, b, v, y);
}

// One forward step of one value row i (forward_rows with M = 1). Returns y_i.
template <class Ops, int R, typename F, typename S>
PROSG_HD S forward_row(F* s, const F* r, const F* d, const F* k, const F* a, const F* b, S v) {
  S y;
  forward_rows<Ops, R, 1>(s, r, d, k, a, b, &v, &y);
  return y;
}

// The key-major form of the forward (the CPU's for sequences): the state is stored
// transposed, st[j * ld + c] holding group c of a block of value rows for key j, so
// that the lanes of F run over value rows i and every sum over keys j is a chain of
// fmas into one register per group, with no reduction across lanes. Because sa_i of
// step t + 1 needs the whole row of S after step t, one pass over the block does step
// t's update and output and step t + 1's sa at once:
//   x = S_ij d_j + v_i k_j + sa_i b_j (stored),  y_i += x r_j,  sa'_i += a'_j x
// with r, d, k, b of step t and a' = a of step t + 1, all indexed by key j (scalars,
// broadcast over the lanes); v, sa are the block's C groups of v_i and sa_i; y and
// sa_next receive C groups each. key_sums gives the first step's sa.
template <class Ops, int C, typename F, typename S>
PROSG_HD void forward_keys(F* st, int n_keys, int ld, const S* r, const S* d, const S* k, const S* b,
                           const S* a_next, const F* v, const F* sa, F* y, F* sa_next) {
  F vv[C], s_a[C], acc_y[C], acc_sa[C];
  PROSG_WKV7_UNROLL
  for (int c = 0; c < C; ++c) vv[c] = v[c], s_a[c] = sa[c], acc_y[c] = F(S(0)), acc_sa[c] = F(S(0));
  for (int j = 0; j < n_keys; ++j) {
    const F rj(r[j]), dj(d[j]), kj(k[j]), bj(b[j]), aj(a_next[j]);
    F* row = st + j * ld;
    PROSG_WKV7_UNROLL
    for (int c = 0; c < C; ++c) {
      const F x = updated_entry<Ops>(row[c], dj, kj, vv[c], s_a[c], bj);
      row[c] = x;
      acc_y[c] = Ops::fma(x, rj, acc_y[c]);
      acc_sa[c] = Ops::fma(aj, x, acc_sa[c]);
    }
  }
  PROSG_WKV7_UNROLL
  for (int c = 0; c < C; ++c) y[c] = acc_y[c], sa_next[c] = acc_sa[c];
}

// out[c] = sum_j a_j st[j * ld + c] over a key-major block (sa before the first step).
template <class Ops, int C, typename F, typename S>
PROSG_HD void key_sums(const F* st, int n_keys, int ld, const S* a, F* out) {
  F acc[C];
  PROSG_WKV7_UNROLL
  for (int c = 0; c < C; ++c) acc[c] = F(S(0));
  for (int j = 0; j < n_keys; ++j) {
    const F aj(a[j]);
    PROSG_WKV7_UNROLL
    for (int c = 0; c < C; ++c) acc[c] = Ops::fma(aj, st[j * ld + c], acc[c]);
  }
  PROSG_WKV7_UNROLL
  for (int c = 0; c < C; ++c) out[c] = acc[c];
}

// The row scalars of the backward of one step for value row i.
template <typename S>
struct RowGrad {
  S sa;   // sum_j a_j S_ij (recomputed)
  S dv;   // dL/dv_i
  S dsa;  // dL/dsa_i
};

// Row phase of the backward of one step for M value rows at once (as forward_rows):
// `s` holds the rows before the step (row m at s + m * R), `g` holds dL/dS of the rows
// after the step on entry and G = g + gy_i r on exit; gy[m] is the rows' dL/dy_i.
// Writes the rows' scalars to out[m]. The CPU runs 4 rows (one transpose-and-add per
// sum for all 4), a CUDA thread one (backward_row).
template <class Ops, int R, int M, typename F, typename S>
PROSG_HD void backward_rows(const F* s, F* g, const F* r, const F* k, const F* a, const F* b, const S* gy,
                            RowGrad<S>* out) {
  F sa[M], dv[M], dsa[M], gyv[M];
  PROSG_WKV7_UNROLL
  for (int m = 0; m < M; ++m) sa[m] = F(S(0)), dv[m] = F(S(0)), dsa[m] = F(S(0)), gyv[m] = F(gy[m]);
  PROSG_WKV7_UNROLL
  for (int q = 0; q < R; ++q) {
    const F rq = r[q], kq = k[q], aq = a[q], bq = b[q];
    PROSG_WKV7_UNROLL
    for (int m = 0; m < M; ++m) {
      sa[m] = Ops::fma(aq, s[m * R + q], sa[m]);
      const F G = Ops::fma(gyv[m], rq, g[m * R + q]);
      g[m * R + q] = G;
      dv[m] = Ops::fma(G, kq, dv[m]);
      dsa[m] = Ops::fma(G, bq, dsa[m]);
    }
  }
  S sums[3][M];
  Ops::template sum_all<M>(sa, sums[0]);
  Ops::template sum_all<M>(dv, sums[1]);
  Ops::template sum_all<M>(dsa, sums[2]);
  PROSG_WKV7_UNROLL
  for (int m = 0; m < M; ++m) out[m] = RowGrad<S>{sums[0][m], sums[1][m], sums[2][m]};
}

// Row phase for one value row i (backward_rows with M = 1): `s` is the row before the
// step, `g` holds dL/dS_i after the step on entry and G_i = g_i + gy_i r on exit.
template <class Ops, int R, typename F, typename S>
PROSG_HD RowGrad<S> backward_row(const F* s, F* g, const F* r, const F* k, const F* a, const F* b, S gy) {
  RowGrad<S> out;
  backward_rows<Ops, R, 1>(s, g, r, k, a, b, &gy, &out);
  return out;
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
