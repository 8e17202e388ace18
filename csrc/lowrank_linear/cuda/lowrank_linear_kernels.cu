// CUDA kernels of the per-sample low-rank product (no torch headers: compiles in
// seconds). Index mapping:
//   shrink: one block per row n = (b, t) and per tile of kRankTile ranks; the block's
//           threads stride over dim, each keeping kRankTile partial sums in registers,
//           then reduce with warp shuffles and one shared-memory pass.
//   expand: one thread per output element (n, o); the row's z values are broadcast
//           loads, U_b rows are small and stay in L1/L2.
// Rank tiles (shrink) and output tiles (expand) run on gridDim.y, at most 65535 of
// them, each block striding over the rest.
#include "common/cuda_types.cuh"
#include "lowrank_linear/cuda/lowrank_linear_launch.h"
#include "lowrank_linear/lowrank_linear_math.h"

namespace prosg::cuda {
namespace {

constexpr int kRankTile = 8;
constexpr int kShrinkThreads = 128;
constexpr int kExpandThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads) shrink_kernel(LowrankShrinkParams p) {
  const long long n = blockIdx.x;
  const long long b = n / p.seqlen, t = n % p.seqlen;
  const T* x = static_cast<const T*>(p.x) + b * p.x_batch_stride + t * p.x_seq_stride;
  const T* V = static_cast<const T*>(p.V) + b * p.v_batch_stride;
  __shared__ float partial[kShrinkThreads / 32][kRankTile];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (long long j0 = static_cast<long long>(blockIdx.y) * kRankTile; j0 < p.rank;
       j0 += static_cast<long long>(gridDim.y) * kRankTile) {
    float acc[kRankTile] = {};
    for (long long i = threadIdx.x; i < p.dim; i += kShrinkThreads) {
      const float xi = to_float(x[i * p.x_dim_stride]);
#pragma unroll
      for (int jj = 0; jj < kRankTile; ++jj) {
        if (j0 + jj < p.rank) acc[jj] += xi * to_float(V[i * p.v_dim_stride + (j0 + jj) * p.v_rank_stride]);
      }
    }
#pragma unroll
    for (int jj = 0; jj < kRankTile; ++jj) {
      float v = acc[jj];
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) partial[warp][jj] = v;
    }
    __syncthreads();
    if (threadIdx.x < kRankTile && j0 + threadIdx.x < p.rank) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kShrinkThreads / 32; ++w) s += partial[w][threadIdx.x];
      static_cast<float*>(p.z)[n * p.rank + j0 + threadIdx.x] = s;
    }
    __syncthreads();  // partial is rewritten by the next tile
  }
}

template <typename T>
__global__ void __launch_bounds__(kExpandThreads) expand_kernel(LowrankExpandParams p) {
  const long long n = blockIdx.x;
  const long long b = n / p.seqlen;
  const float* z = static_cast<const float*>(p.z) + n * p.rank;
  for (long long o = static_cast<long long>(blockIdx.y) * kExpandThreads + threadIdx.x; o < p.dim;
       o += static_cast<long long>(gridDim.y) * kExpandThreads) {
    const T* U = static_cast<const T*>(p.U) + b * p.u_batch_stride + o * p.u_dim_stride;
    T* y = static_cast<T*>(p.y) + n * p.dim + o;
    float acc = to_float(*y);
    for (long long j = 0; j < p.rank; ++j)
      acc = lowrank_math::expand_step(acc, lowrank_math::expand_coefficient(p.scale, z[j]),
                                      to_float(U[j * p.u_rank_stride]));
    *y = from_float<T>(acc);
  }
}

}  // namespace

cudaError_t launch_lowrank_shrink(const LowrankShrinkParams& p, cudaStream_t stream) {
  if (p.batch * p.seqlen == 0 || p.rank == 0) return cudaSuccess;
  if (p.batch * p.seqlen > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(p.batch * p.seqlen), grid_dim(ceil_div(p.rank, kRankTile), kMaxGridYZ));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch(&shrink_kernel<decltype(tag)>, grid, dim3(kShrinkThreads), 0, stream, p);
  });
}

cudaError_t launch_lowrank_expand(const LowrankExpandParams& p, cudaStream_t stream) {
  if (p.batch * p.seqlen == 0 || p.dim == 0) return cudaSuccess;
  if (p.batch * p.seqlen > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(p.batch * p.seqlen), grid_dim(ceil_div(p.dim, kExpandThreads), kMaxGridYZ));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch(&expand_kernel<decltype(tag)>, grid, dim3(kExpandThreads), 0, stream, p);
  });
}

}  // namespace prosg::cuda
