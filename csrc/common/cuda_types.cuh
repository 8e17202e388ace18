// Torch-free CUDA helpers for the kernels: element types by DType, a dispatch
// function and the one launch spelling. torch's build defines
// __CUDA_NO_HALF_CONVERSIONS__ (and the bf16 one), so conversions are spelled out with
// to_float / from_float.
//
// The kernel files compile unchanged with nvcc and, for the CPU execution of the CUDA
// kernels in the tests (csrc/tests/cuda_emu), with the host compiler: they use no
// <<<>>> launches and nothing outside what that harness implements.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <utility>

#include "common/dtype.h"

namespace prosg::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The block's dynamic shared memory (the launch's smem bytes), 16-byte aligned. The one
// spelling that differs between nvcc and the CPU execution of the kernels
// (csrc/tests/cuda_emu), where `extern __shared__` has no meaning.
#if defined(PROSG_CUDA_EMU)
__device__ __forceinline__ void* dynamic_shared() { return cuda_emu::dynamic_shared_memory(); }
#else
__device__ __forceinline__ void* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char prosg_dynamic_shared[];
  return prosg_dynamic_shared;
}
#endif

// Returns f(T{}) with T the element type of `dtype`; float64 is CPU-only and rejected
// by the host wrappers before any launch.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// kernel<<<grid, block, smem, stream>>>(args...), returning this launch's own status:
// cudaLaunchKernelEx reports an invalid configuration itself, where a <<<>>> launch
// leaves it to cudaGetLastError, which would also return (and clear) an earlier,
// unrelated asynchronous error and blame this kernel for it.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// CUDA's grid limits: gridDim.x up to 2^31 - 1, y and z up to 65535. Launchers tile a
// larger extent on y or z with a grid-stride loop in the kernel.
inline constexpr long long kMaxGridX = 2147483647LL;
inline constexpr long long kMaxGridYZ = 65535LL;

inline unsigned int ceil_div(long long a, long long b) { return static_cast<unsigned int>((a + b - 1) / b); }

// min(n, limit) as a grid dimension.
inline unsigned int grid_dim(long long n, long long limit) { return static_cast<unsigned int>(n < limit ? n : limit); }

}  // namespace prosg::cuda
