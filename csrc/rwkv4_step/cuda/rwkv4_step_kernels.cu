// CUDA kernels of the fused RWKV-4 decode steps (no torch headers). One thread per
// element, consecutive threads on consecutive channels (coalesced); the arithmetic is
// the shared headers'.
#include "common/cuda_types.cuh"
#include "rwkv4_step/cuda/rwkv4_step_launch.h"
#include "rwkv4_step/rwkv4_step_math.h"
#include "wkv4/wkv4_math.h"

namespace prosg::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) mix_kernel(Rwkv4MixParams p) {
  const long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;  // over B*H
  if (i >= p.batch * p.hidden) return;
  const long long h = i % p.hidden;
  const float x = to_float(static_cast<const T*>(p.x)[i]);
  const float shift = to_float(static_cast<const T*>(p.shift)[i]);
  const float* mix = static_cast<const float*>(p.mix);
  T* out = static_cast<T*>(p.out);
  for (long long m = 0; m < p.n_mix; ++m) {
    out[m * p.batch * p.hidden + i] = from_float<T>(rwkv4_step::token_shift_mix(x, shift, mix[m * p.hidden + h]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gate_kernel(Rwkv4GateParams p) {
  const long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;  // over B*C
  if (i >= p.batch * p.channels) return;
  const long long C = p.channels, b = i / C, c = i % C;
  const float* si = static_cast<const float*>(p.state_in) + b * 3 * C;
  float* so = static_cast<float*>(p.state_out) + b * 3 * C;
  wkv4::State<float> s{si[c], si[C + c], si[2 * C + c]};
  const float y = wkv4::forward_step<wkv4::ScalarOps>(
      static_cast<const float*>(p.w)[c], static_cast<const float*>(p.u)[c], to_float(static_cast<const T*>(p.key)[i]),
      to_float(static_cast<const T*>(p.value)[i]), s);
  static_cast<T*>(p.out)[i] = from_float<T>(rwkv4_step::sigmoid(to_float(static_cast<const T*>(p.receptance)[i])) * y);
  so[c] = s.a;
  so[C + c] = s.b;
  so[2 * C + c] = s.p;
}

}  // namespace

cudaError_t launch_rwkv4_mix(const Rwkv4MixParams& p, cudaStream_t stream) {
  const long long n = p.batch * p.hidden;
  if (n == 0 || p.n_mix == 0) return cudaSuccess;
  if ((n + kThreads - 1) / kThreads > kMaxGridX) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch(&mix_kernel<decltype(tag)>, dim3(ceil_div(n, kThreads)), dim3(kThreads), 0, stream, p);
  });
}

cudaError_t launch_rwkv4_gate(const Rwkv4GateParams& p, cudaStream_t stream) {
  const long long n = p.batch * p.channels;
  if (n == 0) return cudaSuccess;
  if ((n + kThreads - 1) / kThreads > kMaxGridX) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch(&gate_kernel<decltype(tag)>, dim3(ceil_div(n, kThreads)), dim3(kThreads), 0, stream, p);
  });
}

}  // namespace prosg::cuda
