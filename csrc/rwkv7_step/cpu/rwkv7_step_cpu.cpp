// CPU kernels of the fused RWKV-7 decode step and its registration. A decode step
// touches B*C elements per kernel (a few thousand): plain loops over (sample, head)
// with at::parallel_for, the arithmetic from rwkv7_step_math.h; the recurrence is
// wkv7's CPU kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "rwkv7_step/rwkv7_step.h"
#include "rwkv7_step/rwkv7_step_math.h"

namespace prosg::rwkv7_step {
namespace {

int64_t grain(int64_t per_item) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_item)); }

void mix_cpu(const Rwkv7MixParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "rwkv7_mix_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* x = static_cast<const scalar_t*>(p.x);
    const auto* shift = static_cast<const scalar_t*>(p.shift);
    const auto* mix = static_cast<const acc_t*>(p.mix);
    auto* out = static_cast<scalar_t*>(p.out);
    const int64_t B = p.batch, C = p.channels;
    at::parallel_for(0, B, grain(C * p.n_mix), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t m = 0; m < p.n_mix; ++m) {
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = token_shift_mix<acc_t>(x[b * C + c], shift[b * C + c], mix[m * C + c]);
            out[(m * B + b) * C + c] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
}

void prepare_cpu(const Rwkv7PrepareParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "rwkv7_prepare_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* r = static_cast<const scalar_t*>(p.r);
    const auto* k = static_cast<const scalar_t*>(p.k);
    const auto* v = static_cast<const scalar_t*>(p.v);
    const auto* v_first = static_cast<const scalar_t*>(p.v_first);
    const auto* w_lin = static_cast<const acc_t*>(p.w_lin);
    const auto* a_lin = static_cast<const acc_t*>(p.a_lin);
    const auto* v_lin = static_cast<const acc_t*>(p.v_lin);
    const auto* w0 = static_cast<const acc_t*>(p.w0);
    const auto* a0 = static_cast<const acc_t*>(p.a0);
    const auto* v0 = static_cast<const acc_t*>(p.v0);
    const auto* k_k = static_cast<const acc_t*>(p.k_k);
    const auto* k_a = static_cast<const acc_t*>(p.k_a);
    auto* out = static_cast<acc_t*>(p.out);
    const int64_t N = p.head_size, C = p.heads * N, BC = p.batch * C;
    const bool residual = v_first != nullptr;
    at::parallel_for(0, p.batch * p.heads, grain(8 * N), [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p.heads, base = b * C + (bh % p.heads) * N, c0 = base - b * C;
        acc_t sum_sq = 0;
        for (int64_t j = 0; j < N; ++j) {
          const acc_t kk = static_cast<acc_t>(k[base + j]) * k_k[c0 + j];
          sum_sq += kk * kk;
        }
        const acc_t divisor = normalize_divisor(sum_sq);
        for (int64_t j = 0; j < N; ++j) {
          const int64_t i = base + j, c = c0 + j;
          const Prepared<acc_t> q = prepare<acc_t>(
              static_cast<acc_t>(r[i]), static_cast<acc_t>(k[i]), static_cast<acc_t>(v[i]), w_lin[i], a_lin[i], w0[c],
              a0[c], k_k[c], k_a[c], divisor, residual, residual ? v_lin[i] : acc_t(0), residual ? v0[c] : acc_t(0),
              residual ? static_cast<acc_t>(v_first[i]) : acc_t(0));
          out[i] = q.r;
          out[BC + i] = q.w;
          out[2 * BC + i] = q.k;
          out[3 * BC + i] = q.v;
          out[4 * BC + i] = q.a;
          out[5 * BC + i] = q.b;
        }
      }
    });
  });
}

void output_cpu(const Rwkv7OutputParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "rwkv7_output_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* y = static_cast<const acc_t*>(p.y);
    const auto* prepared = static_cast<const acc_t*>(p.prepared);
    const auto* g = static_cast<const acc_t*>(p.g);
    const auto* r_k = static_cast<const acc_t*>(p.r_k);
    const auto* ln_w = static_cast<const acc_t*>(p.ln_weight);
    const auto* ln_b = static_cast<const acc_t*>(p.ln_bias);
    auto* out = static_cast<scalar_t*>(p.out);
    const int64_t N = p.head_size, C = p.heads * N, BC = p.batch * C;
    const acc_t* r = prepared;
    const acc_t* k = prepared + 2 * BC;
    const acc_t* v = prepared + 3 * BC;
    const acc_t eps = static_cast<acc_t>(p.eps);
    at::parallel_for(0, p.batch * p.heads, grain(4 * N), [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / p.heads, base = b * C + (bh % p.heads) * N, c0 = base - b * C;
        acc_t sum = 0, bonus = 0;
        for (int64_t j = 0; j < N; ++j) {
          sum += y[base + j];
          bonus += r[base + j] * k[base + j] * r_k[c0 + j];
        }
        const acc_t mean = sum / static_cast<acc_t>(N);
        acc_t var = 0;
        for (int64_t j = 0; j < N; ++j) var += (y[base + j] - mean) * (y[base + j] - mean);
        const acc_t rstd = rsqrt_of(var / static_cast<acc_t>(N) + eps);
        for (int64_t j = 0; j < N; ++j) {
          const int64_t i = base + j, c = c0 + j;
          out[i] = static_cast<scalar_t>(gated_output<acc_t>(y[i], mean, rstd, ln_w[c], ln_b[c], bonus, v[i], g[i]));
        }
      }
    });
  });
}

// Not constexpr: it refers to the wkv7 and lowrank_linear backends, defined in other
// files (constant-initialised there, so they are ready before this one).
const Backend kCpu{&mix_cpu, &prepare_cpu, &output_cpu, wkv7::cpu_backend(), lowrank::cpu_backend()};

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CPU, m) { m.impl("rwkv7_time_mix_step", &time_mix_step_op<kCpu>); }

}  // namespace prosg::rwkv7_step
