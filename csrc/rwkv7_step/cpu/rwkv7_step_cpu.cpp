// CPU kernels of the fused RWKV-7 decode steps and their registration. The low-rank
// MLPs of a single row run in one call (row_mlps_cpu); after the mix (a plain loop),
// the projections and the MLPs, one pass per (sample, head) does the rest
// (step_cpu): prepare (rwkv7_step_math.h), the state update of wkv7_math.h row by row
// (S is stored [value i, key j], so a row is contiguous: at::vec lanes over j, four rows
// at a time, no transposes: for one token the key-major form of wkv7's own kernel pays
// more for its two transposes than for the step), the output: the arithmetic of the
// CUDA backend's prepare, wkv7 and output kernels in one pass, without their buffers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/torch_utils.h"
#include "rwkv7_step/rwkv7_step.h"
#include "rwkv7_step/rwkv7_step_math.h"
#include "wkv7/cpu/wkv7_cpu_ops.h"
#include "wkv7/wkv7_math.h"

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

// One (sample, head) of step_cpu with head size N.
template <typename scalar_t, int N>
void step_head(const Rwkv7StepParams& sp, int64_t bh) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using Ops = wkv7::VecOps<acc_t>;
  constexpr int kLanes = Vec::size(), R = N / kLanes, kRows = 4;
  static_assert(N % kLanes == 0 && N % kRows == 0);
  const Rwkv7PrepareParams& p = sp.prepare;
  const Rwkv7OutputParams& o = sp.output;
  const int64_t C = p.heads * N, b = bh / p.heads, c0 = (bh % p.heads) * N, base = b * C + c0;
  const bool residual = p.v_first != nullptr;
  const auto in = [&](const void* t, int64_t j) { return static_cast<acc_t>(static_cast<const scalar_t*>(t)[base + j]); };
  const auto acc_at = [](const void* t, int64_t i) { return static_cast<const acc_t*>(t)[i]; };

  // prepare: the step's inputs, and the decay d = exp(-exp(w)) as wkv7's kernels form it.
  alignas(64) acc_t r[N], d[N], k[N], v[N], a[N], bb[N], y[N];
  acc_t sum_sq = 0;
  for (int j = 0; j < N; ++j) {
    const acc_t kk = in(p.k, j) * acc_at(p.k_k, c0 + j);
    sum_sq += kk * kk;
  }
  const acc_t divisor = normalize_divisor(sum_sq);
  for (int j = 0; j < N; ++j) {
    const int64_t i = base + j, c = c0 + j;
    const Prepared<acc_t> q = prepare<acc_t>(
        in(p.r, j), in(p.k, j), in(p.v, j), acc_at(p.w_lin, i), acc_at(p.a_lin, i), acc_at(p.w0, c),
        acc_at(p.a0, c), acc_at(p.k_k, c), acc_at(p.k_a, c), divisor, residual, residual ? acc_at(p.v_lin, i) : acc_t(0),
        residual ? acc_at(p.v0, c) : acc_t(0), residual ? in(p.v_first, j) : acc_t(0));
    r[j] = q.r, d[j] = wkv7::decay<wkv7::ScalarOps>(q.w), k[j] = q.k, v[j] = q.v, a[j] = q.a, bb[j] = q.b;
  }

  // The state update, kRows value rows at a time.
  Vec rv[R], dv[R], kv[R], av[R], bv[R];
  for (int q = 0; q < R; ++q) {
    rv[q] = Vec::loadu(r + q * kLanes), dv[q] = Vec::loadu(d + q * kLanes), kv[q] = Vec::loadu(k + q * kLanes);
    av[q] = Vec::loadu(a + q * kLanes), bv[q] = Vec::loadu(bb + q * kLanes);
  }
  const acc_t* s_in = static_cast<const acc_t*>(sp.state_in) + bh * N * N;
  acc_t* s_out = static_cast<acc_t*>(sp.state_out) + bh * N * N;
  for (int i = 0; i < N; i += kRows) {
    Vec rows[kRows * R];
    for (int m = 0; m < kRows; ++m)
      for (int q = 0; q < R; ++q) rows[m * R + q] = Vec::loadu(s_in + (i + m) * N + q * kLanes);
    wkv7::forward_rows<Ops, R, kRows>(rows, rv, dv, kv, av, bv, v + i, y + i);
    for (int m = 0; m < kRows; ++m)
      for (int q = 0; q < R; ++q) rows[m * R + q].store(s_out + (i + m) * N + q * kLanes);
  }

  // output: the head's GroupNorm, bonus and gate.
  acc_t sum = 0, bonus = 0;
  for (int j = 0; j < N; ++j) {
    sum += y[j];
    bonus += r[j] * k[j] * acc_at(o.r_k, c0 + j);
  }
  const acc_t mean = sum / static_cast<acc_t>(N);
  acc_t var = 0;
  for (int j = 0; j < N; ++j) var += (y[j] - mean) * (y[j] - mean);
  const acc_t rstd = rsqrt_of(var / static_cast<acc_t>(N) + static_cast<acc_t>(o.eps));
  auto* out = static_cast<scalar_t*>(o.out);
  for (int j = 0; j < N; ++j) {
    const int64_t c = c0 + j;
    out[base + j] = static_cast<scalar_t>(gated_output<acc_t>(y[j], mean, rstd, acc_at(o.ln_weight, c),
                                                              acc_at(o.ln_bias, c), bonus, v[j], acc_at(o.g, base + j)));
  }
}

void step_cpu(const Rwkv7StepParams& sp) {
  const Rwkv7PrepareParams& p = sp.prepare;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "rwkv7_step_cpu", [&] {
    wkv7::dispatch_head_size(p.head_size, [&]<int N>() {
      at::parallel_for(0, p.batch * p.heads, grain(4 * N * N), [&](int64_t begin, int64_t end) {
        for (int64_t bh = begin; bh < end; ++bh) step_head<scalar_t, N>(sp, bh);
      });
    });
  });
}

// y[0:O] = sum_i x[i] W[i, 0:O] for W [I, O] row-major: the rows of W in order, one
// pass that the hardware prefetcher follows, y (O floats) staying in L1.
void row_times_matrix(const float* x, int64_t I, const float* W, int64_t O, float* y) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t L = Vec::size();
  std::fill(y, y + O, 0.f);
  for (int64_t i = 0; i < I; ++i) {
    const Vec xi(x[i]);
    const float* w = W + i * O;
    int64_t o = 0;
    for (; o + L <= O; o += L) at::vec::fmadd(xi, Vec::loadu(w + o), Vec::loadu(y + o)).store(y + o);
    for (; o < O; ++o) y[o] = std::fma(x[i], w[o], y[o]);
  }
}

// The low-rank MLPs of one row, a task each.
void row_mlps_cpu(const Rwkv7MlpParams& p) {
  at::parallel_for(0, p.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hidden;
    for (int64_t m = begin; m < end; ++m) {
      const auto& mlp = p.mlps[m];
      hidden.resize(mlp.dim);
      row_times_matrix(mlp.x, p.channels, mlp.first, mlp.dim, hidden.data());
      if (mlp.activation == MlpActivation::kTanh) {
        for (float& h : hidden) h = std::tanh(h);
      } else if (mlp.activation == MlpActivation::kSigmoid) {
        for (float& h : hidden) h = sigmoid(h);
      }
      row_times_matrix(hidden.data(), mlp.dim, mlp.second, p.channels, mlp.out);
    }
  });
}

// Not constexpr: it refers to the wkv7 and lowrank_linear backends, defined in other
// files (constant-initialised there, so they are ready before this one).
const Backend kCpu{&mix_cpu, nullptr, nullptr, wkv7::cpu_backend(), lowrank::cpu_backend(), &step_cpu,
                   &row_mlps_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CPU, m) {
  m.impl("rwkv7_time_mix_step", &time_mix_step_op<kCpu>);
  m.impl("rwkv7_channel_mix_step", &channel_mix_step_op<kCpu>);
}

}  // namespace prosg::rwkv7_step
