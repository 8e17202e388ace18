// CUDA kernels of the fused RWKV-7 decode step (no torch headers); the arithmetic is
// rwkv7_step_math.h's. The mix runs one thread per element; prepare and output run
// one block per (sample, head) with a thread per channel (N = 16..128 threads), the
// head's sums reduced in shared memory.
#include "common/cuda_types.cuh"
#include "rwkv7_step/cuda/rwkv7_step_launch.h"
#include "rwkv7_step/rwkv7_step_math.h"
#include "wkv7/wkv7_math.h"

namespace prosg::cuda {
namespace {

constexpr int kMixThreads = 256;
constexpr int kMaxHeadSize = 128;

template <typename T>
__global__ void __launch_bounds__(kMixThreads) mix_kernel(Rwkv7MixParams p) {
  const long long i = static_cast<long long>(blockIdx.x) * kMixThreads + threadIdx.x;  // over B*C
  if (i >= p.batch * p.channels) return;
  const long long c = i % p.channels;
  const float x = to_float(static_cast<const T*>(p.x)[i]);
  const float shift = to_float(static_cast<const T*>(p.shift)[i]);
  const float* mix = static_cast<const float*>(p.mix);
  T* out = static_cast<T*>(p.out);
  for (long long m = 0; m < p.n_mix; ++m) {
    out[m * p.batch * p.channels + i] = from_float<T>(rwkv7_step::token_shift_mix(x, shift, mix[m * p.channels + c]));
  }
}

// The sum of every thread's `v` over the block (blockDim.x a power of two, at most
// kMaxHeadSize), through `buf`; every thread of the block must call it.
__device__ float block_sum(float v, float* buf) {
  const unsigned t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  const float total = buf[0];
  __syncthreads();  // before buf is written again
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kMaxHeadSize) prepare_kernel(Rwkv7PrepareParams p) {
  __shared__ float buf[kMaxHeadSize];
  const long long N = p.head_size, C = p.heads * N, BC = p.batch * C;
  const long long b = blockIdx.x / p.heads, c = (blockIdx.x % p.heads) * N + threadIdx.x, i = b * C + c;
  const float k = to_float(static_cast<const T*>(p.k)[i]);
  const float k_k = static_cast<const float*>(p.k_k)[c];
  const float kk = k * k_k;
  const float divisor = rwkv7_step::normalize_divisor(block_sum(kk * kk, buf));
  const bool residual = p.v_first != nullptr;
  const auto q = rwkv7_step::prepare<float>(
      to_float(static_cast<const T*>(p.r)[i]), k, to_float(static_cast<const T*>(p.v)[i]),
      static_cast<const float*>(p.w_lin)[i], static_cast<const float*>(p.a_lin)[i], static_cast<const float*>(p.w0)[c],
      static_cast<const float*>(p.a0)[c], k_k, static_cast<const float*>(p.k_a)[c], divisor, residual,
      residual ? static_cast<const float*>(p.v_lin)[i] : 0.f, residual ? static_cast<const float*>(p.v0)[c] : 0.f,
      residual ? to_float(static_cast<const T*>(p.v_first)[i]) : 0.f);
  float* out = static_cast<float*>(p.out);
  out[i] = q.r;
  out[BC + i] = q.w;
  out[2 * BC + i] = q.k;
  out[3 * BC + i] = q.v;
  out[4 * BC + i] = q.a;
  out[5 * BC + i] = q.b;
}

template <typename T>
__global__ void __launch_bounds__(kMaxHeadSize) output_kernel(Rwkv7OutputParams p) {
  __shared__ float buf[kMaxHeadSize];
  const long long N = p.head_size, C = p.heads * N, BC = p.batch * C;
  const long long b = blockIdx.x / p.heads, c = (blockIdx.x % p.heads) * N + threadIdx.x, i = b * C + c;
  const float* prepared = static_cast<const float*>(p.prepared);
  const float y = static_cast<const float*>(p.y)[i];
  const float r = prepared[i], k = prepared[2 * BC + i], v = prepared[3 * BC + i];
  const float n = static_cast<float>(N);
  const float mean = block_sum(y, buf) / n;
  const float var = block_sum((y - mean) * (y - mean), buf) / n;
  const float bonus = block_sum(r * k * static_cast<const float*>(p.r_k)[c], buf);
  const float rstd = rwkv7_step::rsqrt_of(var + static_cast<float>(p.eps));
  static_cast<T*>(p.out)[i] = from_float<T>(rwkv7_step::gated_output<float>(
      y, mean, rstd, static_cast<const float*>(p.ln_weight)[c], static_cast<const float*>(p.ln_bias)[c], bonus, v,
      static_cast<const float*>(p.g)[i]));
}

// One block per (sample, head): the launch's checks shared by prepare and output.
bool head_grid_ok(long long batch, long long heads, long long head_size) {
  return wkv7::supported_head_size(head_size) && batch * heads <= kMaxGridX;
}

}  // namespace

cudaError_t launch_rwkv7_mix(const Rwkv7MixParams& p, cudaStream_t stream) {
  const long long n = p.batch * p.channels;
  if (n == 0 || p.n_mix == 0) return cudaSuccess;
  if ((n + kMixThreads - 1) / kMixThreads > kMaxGridX) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch(&mix_kernel<decltype(tag)>, dim3(ceil_div(n, kMixThreads)), dim3(kMixThreads), 0, stream, p);
  });
}

cudaError_t launch_rwkv7_prepare(const Rwkv7PrepareParams& p, cudaStream_t stream) {
  if (p.batch * p.heads == 0) return cudaSuccess;
  if (!head_grid_ok(p.batch, p.heads, p.head_size)) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch(&prepare_kernel<decltype(tag)>, dim3(static_cast<unsigned>(p.batch * p.heads)),
                  dim3(static_cast<unsigned>(p.head_size)), 0, stream, p);
  });
}

cudaError_t launch_rwkv7_output(const Rwkv7OutputParams& p, cudaStream_t stream) {
  if (p.batch * p.heads == 0) return cudaSuccess;
  if (!head_grid_ok(p.batch, p.heads, p.head_size)) return cudaErrorInvalidValue;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch(&output_kernel<decltype(tag)>, dim3(static_cast<unsigned>(p.batch * p.heads)),
                  dim3(static_cast<unsigned>(p.head_size)), 0, stream, p);
  });
}

}  // namespace prosg::cuda
