// The CUDA kernels of the fused RWKV-7 decode step (csrc/rwkv7_step/cuda/
// rwkv7_step_kernels.cu: the token-shift mix, prepare, output), executed on the CPU
// (cuda_emu.h) against float64 references written out here from the definitions in
// rwkv7_step_math.h's header comment: float32, float16 and bfloat16 inputs; every head
// size (a block per (sample, head), its sums reduced in shared memory); layer 0 and
// later layers (value residual); both fiber schedules (a missing barrier reads another
// thread's unwritten sum); NaN-filled outputs (an element left unwritten fails); empty
// work and unsupported head sizes.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/cuda_types.cuh"
#include "rwkv7_step/cuda/rwkv7_step_launch.h"
#include "tests/harness.h"
#include "emu_test.h"

std::mt19937_64& prosg::emu_test::rng() {
  static std::mt19937_64 g(777);
  return g;
}

namespace {

using prosg::DType;
using prosg::cuda::from_float;
using prosg::cuda::to_float;

// The outputs here are O(1) element by element: a fixed atol (tol), not one scaled by
// the largest expected value.
using namespace prosg::emu_test;

// n values of element type E drawn by `draw`, with their rounded values in float64.
template <typename E>
struct Values {
  std::vector<E> stored;
  std::vector<double> value;
  template <typename Draw>
  Values(int64_t n, Draw draw) {
    for (int64_t i = 0; i < n; ++i) {
      stored.push_back(from_float<E>(static_cast<float>(draw())));
      value.push_back(to_float(stored.back()));
    }
  }
  const E* data() const { return stored.data(); }
};

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double softplus(double x) { return x > 20 ? x : std::log1p(std::exp(x)); }

template <typename E>
void run_case(int64_t B, int64_t H, int64_t N, bool residual, DType dt, cuda_emu::Schedule order) {
  const std::string name = "rwkv7_step B" + std::to_string(B) + "-H" + std::to_string(H) + "-N" + std::to_string(N) +
                           (residual ? "-residual" : "-layer0") + "-" + dtype_name(dt) +
                           (order == cuda_emu::Schedule::kForward ? "" : "-reverse");
  cuda_emu::set_schedule(order);
  const int64_t C = H * N, BC = B * C;

  // The mix.
  Values<E> x(BC, normal), shift(BC, normal);
  std::vector<float> mix(6 * C);
  for (auto& m : mix) m = static_cast<float>(uniform(0, 1));
  std::vector<E> xs = poisoned<E>(6 * BC);
  prosg::Rwkv7MixParams mp;
  mp.batch = B, mp.channels = C, mp.n_mix = 6, mp.dtype = dt;
  mp.x = x.data(), mp.shift = shift.data(), mp.mix = mix.data(), mp.out = xs.data();
  expect_launch(prosg::cuda::launch_rwkv7_mix(mp, nullptr), name + " mix");
  std::vector<double> xs_ref(6 * BC);
  for (int64_t m = 0; m < 6; ++m)
    for (int64_t i = 0; i < BC; ++i)
      xs_ref[m * BC + i] = x.value[i] + (shift.value[i] - x.value[i]) * mix[m * C + i % C];
  close(name + " mix", as_double(xs, 6 * BC), xs_ref, tol_of(dt), /*atol=*/tol_of(dt));

  // prepare.
  Values<E> r(BC, normal), k(BC, normal), v(BC, normal), v_first(BC, normal);
  std::vector<float> w_lin(BC), a_lin(BC), v_lin(BC), w0(C), a0(C), v0(C), k_k(C), k_a(C);
  for (int64_t i = 0; i < BC; ++i)
    w_lin[i] = static_cast<float>(normal()), a_lin[i] = static_cast<float>(normal()),
    v_lin[i] = static_cast<float>(normal());
  for (int64_t c = 0; c < C; ++c)
    w0[c] = static_cast<float>(normal() - 1), a0[c] = static_cast<float>(normal()), v0[c] = static_cast<float>(normal()),
    k_k[c] = static_cast<float>(uniform(0.2, 1)), k_a[c] = static_cast<float>(uniform(0, 1));
  std::vector<float> prepared = poisoned<float>(6 * BC);
  prosg::Rwkv7PrepareParams pp;
  pp.batch = B, pp.heads = H, pp.head_size = N, pp.dtype = dt;
  pp.r = r.data(), pp.k = k.data(), pp.v = v.data(), pp.v_first = residual ? v_first.data() : nullptr;
  pp.w_lin = w_lin.data(), pp.a_lin = a_lin.data(), pp.v_lin = residual ? v_lin.data() : nullptr;
  pp.w0 = w0.data(), pp.a0 = a0.data(), pp.v0 = residual ? v0.data() : nullptr, pp.k_k = k_k.data();
  pp.k_a = k_a.data(), pp.out = prepared.data();
  expect_launch(prosg::cuda::launch_rwkv7_prepare(pp, nullptr), name + " prepare");
  std::vector<double> prep_ref(6 * BC);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t base = (bh / H) * C + (bh % H) * N;
    double norm = 0;
    for (int64_t j = 0; j < N; ++j) norm += std::pow(k.value[base + j] * k_k[(base + j) % C], 2);
    norm = std::max(std::sqrt(norm), 1e-12);
    for (int64_t j = 0; j < N; ++j) {
      const int64_t i = base + j, c = i % C;
      const double kk = k.value[i] * k_k[c] / norm, a = sigmoid(a0[c] + a_lin[i]);
      prep_ref[i] = r.value[i];
      prep_ref[BC + i] = -softplus(-(w0[c] + w_lin[i])) - 0.5;
      prep_ref[2 * BC + i] = k.value[i] * (1 + (a - 1) * k_a[c]);
      prep_ref[3 * BC + i] =
          residual ? v.value[i] + (v_first.value[i] - v.value[i]) * sigmoid(v0[c] + v_lin[i]) : v.value[i];
      prep_ref[4 * BC + i] = -kk;
      prep_ref[5 * BC + i] = kk * a;
    }
  }
  close(name + " prepare", as_double(prepared, 6 * BC), prep_ref, tol_of(DType::kFloat32), /*atol=*/tol_of(DType::kFloat32));

  // output, from a made-up wkv7 output y and the prepared r, k, v.
  std::vector<float> y(BC), g(BC), r_k(C), ln_w(C), ln_b(C);
  for (int64_t i = 0; i < BC; ++i) y[i] = static_cast<float>(normal() * 2 + 0.5), g[i] = static_cast<float>(normal());
  for (int64_t c = 0; c < C; ++c)
    r_k[c] = static_cast<float>(normal() * 0.3), ln_w[c] = static_cast<float>(1 + 0.2 * normal()),
    ln_b[c] = static_cast<float>(0.1 * normal());
  std::vector<E> out = poisoned<E>(BC);
  prosg::Rwkv7OutputParams op;
  op.batch = B, op.heads = H, op.head_size = N, op.dtype = dt, op.eps = 64e-5;
  op.y = y.data(), op.prepared = prepared.data(), op.g = g.data(), op.r_k = r_k.data();
  op.ln_weight = ln_w.data(), op.ln_bias = ln_b.data(), op.out = out.data();
  expect_launch(prosg::cuda::launch_rwkv7_output(op, nullptr), name + " output");
  std::vector<double> out_ref(BC);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t base = (bh / H) * C + (bh % H) * N;
    double mean = 0, var = 0, bonus = 0;
    for (int64_t j = 0; j < N; ++j) mean += y[base + j] / static_cast<double>(N);
    for (int64_t j = 0; j < N; ++j) var += std::pow(y[base + j] - mean, 2) / static_cast<double>(N);
    for (int64_t j = 0; j < N; ++j)
      bonus += double(prepared[base + j]) * prepared[2 * BC + base + j] * r_k[(base + j) % C];
    for (int64_t j = 0; j < N; ++j) {
      const int64_t i = base + j, c = i % C;
      const double gn = (y[i] - mean) / std::sqrt(var + 64e-5) * ln_w[c] + ln_b[c];
      out_ref[i] = (gn + bonus * prepared[3 * BC + i]) * g[i];
    }
  }
  close(name + " output", as_double(out, BC), out_ref, tol_of(dt), /*atol=*/tol_of(dt));
  cuda_emu::set_schedule(cuda_emu::Schedule::kForward);
}

template <typename E>
void run_all(DType dt) {
  struct Shape {
    int64_t B, H, N;
  };
  for (Shape s : {Shape{1, 12, 64}, Shape{3, 5, 16}, Shape{2, 3, 32}, Shape{1, 2, 128}})
    for (bool residual : {false, true})
      for (auto order : {cuda_emu::Schedule::kForward, cuda_emu::Schedule::kReverse})
        run_case<E>(s.B, s.H, s.N, residual, dt, order);
}

}  // namespace

PROSG_TEST(rwkv7_step_float32) { run_all<float>(DType::kFloat32); }
PROSG_TEST(rwkv7_step_float16) { run_all<__half>(DType::kFloat16); }
PROSG_TEST(rwkv7_step_bfloat16) { run_all<__nv_bfloat16>(DType::kBFloat16); }

PROSG_TEST(rwkv7_step_empty_work_and_bad_head_size) {
  prosg::Rwkv7MixParams mp;
  mp.batch = 0, mp.channels = 5, mp.n_mix = 6;
  prosg::Rwkv7PrepareParams pp;
  pp.batch = 3, pp.heads = 0, pp.head_size = 64;
  prosg::Rwkv7OutputParams op;
  op.batch = 0, op.heads = 2, op.head_size = 64;
  cuda_emu::stats() = {};
  PROSG_EXPECT(prosg::cuda::launch_rwkv7_mix(mp, nullptr) == cudaSuccess);
  PROSG_EXPECT(prosg::cuda::launch_rwkv7_prepare(pp, nullptr) == cudaSuccess);
  PROSG_EXPECT(prosg::cuda::launch_rwkv7_output(op, nullptr) == cudaSuccess);
  PROSG_EXPECT(cuda_emu::stats().launches == 0);
  // A head size the block reduction does not support (not a power of two, or past
  // 128 threads) is refused, never run with a wrong sum.
  pp.heads = 2, pp.head_size = 48;
  op.batch = 1, op.head_size = 256;
  PROSG_EXPECT(prosg::cuda::launch_rwkv7_prepare(pp, nullptr) == cudaErrorInvalidValue);
  PROSG_EXPECT(prosg::cuda::launch_rwkv7_output(op, nullptr) == cudaErrorInvalidValue);
  PROSG_EXPECT(cuda_emu::stats().launches == 0);
}

PROSG_TEST_MAIN()
