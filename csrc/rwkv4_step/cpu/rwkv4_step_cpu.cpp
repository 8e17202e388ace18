// CPU kernels of the fused RWKV-4 decode steps and their registration. A decode step
// touches B*H elements per kernel (a few thousand): plain loops over samples with
// at::parallel_for, the arithmetic from the shared headers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "rwkv4_step/rwkv4_step.h"
#include "rwkv4_step/rwkv4_step_math.h"
#include "wkv4/wkv4_math.h"

namespace prosg::rwkv4_step {
namespace {

int64_t grain(int64_t per_sample) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_sample)); }

void mix_cpu(const Rwkv4MixParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "rwkv4_mix_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* x = static_cast<const scalar_t*>(p.x);
    const auto* shift = static_cast<const scalar_t*>(p.shift);
    const auto* mix = static_cast<const acc_t*>(p.mix);
    auto* out = static_cast<scalar_t*>(p.out);
    const int64_t B = p.batch, H = p.hidden;
    at::parallel_for(0, B, grain(H * p.n_mix), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t m = 0; m < p.n_mix; ++m) {
          for (int64_t h = 0; h < H; ++h) {
            const acc_t v = token_shift_mix<acc_t>(x[b * H + h], shift[b * H + h], mix[m * H + h]);
            out[(m * B + b) * H + h] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
}

void gate_cpu(const Rwkv4GateParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "rwkv4_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto* w = static_cast<const acc_t*>(p.w);
    const auto* u = static_cast<const acc_t*>(p.u);
    const auto* k = static_cast<const scalar_t*>(p.key);
    const auto* v = static_cast<const scalar_t*>(p.value);
    const auto* r = static_cast<const scalar_t*>(p.receptance);
    const auto* s_in = static_cast<const acc_t*>(p.state_in);
    auto* s_out = static_cast<acc_t*>(p.state_out);
    auto* out = static_cast<scalar_t*>(p.out);
    const int64_t C = p.channels;
    at::parallel_for(0, p.batch, grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const acc_t* si = s_in + b * 3 * C;
        acc_t* so = s_out + b * 3 * C;
        for (int64_t c = 0; c < C; ++c) {
          wkv4::State<acc_t> s{si[c], si[C + c], si[2 * C + c]};
          const acc_t y = wkv4::forward_step<wkv4::ScalarOps>(w[c], u[c], static_cast<acc_t>(k[b * C + c]),
                                                              static_cast<acc_t>(v[b * C + c]), s);
          out[b * C + c] = static_cast<scalar_t>(sigmoid(static_cast<acc_t>(r[b * C + c])) * y);
          so[c] = s.a;
          so[C + c] = s.b;
          so[2 * C + c] = s.p;
        }
      }
    });
  });
}

// Not constexpr: it refers to lowrank_linear's backend, defined in another file
// (constant-initialised there, so it is ready before this one).
const Backend kCpu{&mix_cpu, &gate_cpu, lowrank::cpu_backend()};

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CPU, m) {
  m.impl("rwkv4_time_mix_step", &time_mix_step_op<kCpu>);
  m.impl("rwkv4_channel_mix_step", &channel_mix_step_op<kCpu>);
}

}  // namespace prosg::rwkv4_step
