// The arithmetic of the RWKV-4 WKV recurrence, written once for the CPU and the
// CUDA kernels: every function here is __host__ __device__ and templated on
//   F    the number type: float or double, or at::vec::Vectorized<float> on the CPU
//        (one lane per channel);
//   Ops  the elementary operations on F: exp_neg_abs(d) = exp(-|d|), max(x, y), and
//        select_ge(x, y, a, b) = (x >= y ? a : b) lane-wise.
// So the CPU tests exercise exactly the arithmetic the GPU runs.
//
// State per channel: (a, b, p) with the true numerator a*e^p and denominator b*e^p;
// p is the running max that keeps the exponentials in range. Per step, with
// w = -exp(time_decay), u = time_first and key k, value v (the effective ones):
//   q  = max(p, u + k);  y = (e^(p-q) a + e^(u+k-q) v) / (e^(p-q) b + e^(u+k-q))
//   q' = max(p + w, k);  a' = e^(p+w-q') a + e^(k-q') v;  b' = e^(p+w-q') b + e^(k-q');  p' = q'
// which is transformers' rwkv_linear_attention_cpu. One of each pair of exponentials
// is e^0 = 1, so a step needs two exp calls, not four.
#pragma once

#include <math.h>

#include "common/dtype.h"

namespace prosg::wkv4 {

// Start state when none is given: transformers' (0, 0, -1e38).
constexpr float kEmptyMax = -1e38f;

// Scalar operations for float and double, host and device.
struct ScalarOps {
  static PROSG_HD float exp_neg_abs(float d) { return expf(-fabsf(d)); }
  static PROSG_HD double exp_neg_abs(double d) { return exp(-fabs(d)); }
  template <typename F>
  static PROSG_HD F max(F x, F y) { return x >= y ? x : y; }
  template <typename F>
  static PROSG_HD F select_ge(F x, F y, F a, F b) { return x >= y ? a : b; }
};

template <typename F>
struct State {
  F a, b, p;
};

// (e^(x-m), e^(y-m)) with m = max(x, y).
template <class Ops, typename F>
PROSG_HD void pair_exp(const F& x, const F& y, F& ex, F& ey) {
  const F one(1);
  const F small = Ops::exp_neg_abs(x - y);
  ex = Ops::select_ge(x, y, one, small);
  ey = Ops::select_ge(x, y, small, one);
}

// One forward step: returns the output and advances the state.
template <class Ops, typename F>
PROSG_HD F forward_step(const F& w, const F& u, const F& k, const F& v, State<F>& s) {
  F e1, e2;
  pair_exp<Ops>(s.p, u + k, e1, e2);
  const F y = (e1 * s.a + e2 * v) / (e1 * s.b + e2);
  const F r = s.p + w;
  F f1, f2;
  pair_exp<Ops>(r, k, f1, f2);
  s.a = f1 * s.a + f2 * v;
  s.b = f1 * s.b + f2;
  s.p = Ops::max(r, k);
  return y;
}

// Gradients carried backwards through time: with respect to the state (a, b, p).
template <typename F>
struct StateGrad {
  F a, b, p;
};

// One backward step. `s` is the state *before* the step (recomputed by the caller);
// on entry `g` holds dL/d(state after the step), on exit dL/d(state before it).
// Outputs dL/dk and dL/dv of this step and accumulates dL/dw and dL/du.
//
// The output y does not depend on the choice of q (it cancels), so q is treated as a
// constant there. The new state does depend on q' = p' (it is an output), so its
// gradient gq' = gp' - ga'*a' - gb'*b' flows to whichever of p + w and k was larger
// (to p + w on ties).
template <class Ops, typename F>
PROSG_HD void backward_step(const F& w, const F& u, const F& k, const F& v, const State<F>& s, const F& gy,
                            StateGrad<F>& g, F& gk, F& gv, F& gw_acc, F& gu_acc) {
  const F zero(0);
  F e1, e2;
  pair_exp<Ops>(s.p, u + k, e1, e2);
  const F den = e1 * s.b + e2;
  const F y = (e1 * s.a + e2 * v) / den;
  const F gnum = gy / den;
  const F gden = zero - gnum * y;

  const F r = s.p + w;
  F f1, f2;
  pair_exp<Ops>(r, k, f1, f2);
  const F a1 = f1 * s.a + f2 * v;
  const F b1 = f1 * s.b + f2;
  const F gq = g.p - g.a * a1 - g.b * b1;
  const F gr = (g.a * s.a + g.b * s.b) * f1 + Ops::select_ge(r, k, gq, zero);
  const F gs = (gnum * v + gden) * e2;  // d/d(u + k) through the output

  gk = gs + (g.a * v + g.b) * f2 + Ops::select_ge(r, k, zero, gq);
  gv = gnum * e2 + g.a * f2;
  gw_acc = gw_acc + gr;
  gu_acc = gu_acc + gs;

  const F ga = gnum * e1 + g.a * f1;
  const F gb = gden * e1 + g.b * f1;
  g.p = (gnum * s.a + gden * s.b) * e1 + gr;
  g.a = ga;
  g.b = gb;
}

// Associative combine for a chunked scan over time. A chunk of n steps maps a start
// state S to decay(S, n*w) (+) C, where C is the chunk's end state from the empty
// state and (+) adds the two represented sums (a*e^p, b*e^p) in log-max form:
//   p = max(p1 + n*w, p2);  a = e^(p1+n*w-p) a1 + e^(p2-p) a2;  likewise b.
// `steps_w` is n*w for the second chunk's length n.
template <class Ops, typename F>
PROSG_HD State<F> combine(const State<F>& first, const F& steps_w, const State<F>& second) {
  const F p1 = first.p + steps_w;
  F e1, e2;
  pair_exp<Ops>(p1, second.p, e1, e2);
  return State<F>{e1 * first.a + e2 * second.a, e1 * first.b + e2 * second.b, Ops::max(p1, second.p)};
}

}  // namespace prosg::wkv4
