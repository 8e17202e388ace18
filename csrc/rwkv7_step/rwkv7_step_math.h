// Element arithmetic of the fused RWKV-7 decode step (rwkv7_time_mix_step), shared by
// the CPU and CUDA kernels; each formula is the one RWKV7TimeMix's sequence path
// (prosg/models/rwkv7.py) spells in torch, in the same order of operations. The
// recurrence itself is wkv7's (wkv7_math.h), called on the prepared inputs.
//
// Per (sample, head), with j over the head's N channels:
//   prepare:  kk_j = k_j k_k_j / max(||k k_k||, 1e-12)     (F.normalize)
//             a_j  = sigmoid(a0_j + a_lin_j)
//             k_j <- k_j (1 + (a_j - 1) k_a_j)
//             v_j <- v_j + (v_first_j - v_j) sigmoid(v0_j + v_lin_j)    (layers > 0)
//             w_j  = -softplus(-(w0_j + w_lin_j)) - 0.5                 (log-log decay)
//             wkv7 inputs (r, w, k, v, -kk, kk a)
//   output:   y = wkv7's output; GroupNorm over the head (biased variance, eps),
//             out_j = (gn_j + (sum_i r_i k_i r_k_i) v_j) g_j
#pragma once

#include <math.h>

#include "common/dtype.h"

namespace prosg::rwkv7_step {

// The rwkv package's token-shift mix: xx = shift - x, then x + xx * m.
template <typename F>
PROSG_HD F token_shift_mix(F x, F shift, F m) {
  return x + (shift - x) * m;
}

PROSG_HD float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
PROSG_HD double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

// torch.nn.functional.softplus with its defaults (beta 1, threshold 20: linear above).
PROSG_HD float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }
PROSG_HD double softplus(double x) { return x > 20.0 ? x : log1p(exp(x)); }

// F.normalize's divisor: the norm, at least 1e-12.
PROSG_HD float normalize_divisor(float sum_of_squares) { return fmaxf(sqrtf(sum_of_squares), 1e-12f); }
PROSG_HD double normalize_divisor(double sum_of_squares) { return fmax(sqrt(sum_of_squares), 1e-12); }

PROSG_HD float rsqrt_of(float x) { return 1.f / sqrtf(x); }
PROSG_HD double rsqrt_of(double x) { return 1.0 / sqrt(x); }

// The six inputs of wkv7 for one channel.
template <typename F>
struct Prepared {
  F r, w, k, v, a, b;
};

// One channel of `prepare` (above); kk_divisor is normalize_divisor of the head's
// sum of (k k_k)^2; `residual` is false in layer 0 (v_lin, v0, v_first unused).
template <typename F>
PROSG_HD Prepared<F> prepare(F r, F k, F v, F w_lin, F a_lin, F w0, F a0, F k_k, F k_a, F kk_divisor, bool residual,
                             F v_lin, F v0, F v_first) {
  const F kk = k * k_k / kk_divisor;
  const F a = sigmoid(a0 + a_lin);
  Prepared<F> p;
  p.r = r;
  p.w = -softplus(-(w0 + w_lin)) - F(0.5);
  p.k = k * (F(1) + (a - F(1)) * k_a);
  p.v = residual ? v + (v_first - v) * sigmoid(v0 + v_lin) : v;
  p.a = -kk;
  p.b = kk * a;
  return p;
}

// One channel of `output`: the head's GroupNorm (mean, 1/sqrt(var + eps)), its bonus
// sum_i r_i k_i r_k_i, then (gn + bonus v) g.
template <typename F>
PROSG_HD F gated_output(F y, F mean, F rstd, F ln_weight, F ln_bias, F bonus, F v, F g) {
  const F gn = (y - mean) * rstd * ln_weight + ln_bias;
  return (gn + bonus * v) * g;
}

}  // namespace prosg::rwkv7_step
