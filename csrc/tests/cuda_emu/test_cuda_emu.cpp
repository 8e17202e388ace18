// Tests of the CPU execution of CUDA kernels itself (cuda_emu.h): launch checks,
// thread indexing, barriers, warp shuffles and votes, shared-memory poisoning,
// deadlock detection and the 16-bit float conversions. The kernels here are written
// as CUDA and launched through prosg's launch helper, as the real kernels are.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/cuda_types.cuh"
#include "tests/harness.h"

using prosg::cuda::launch;

namespace {

__global__ void write_ids(int* out) {
  const long long block = blockIdx.x + static_cast<long long>(gridDim.x) * (blockIdx.y + gridDim.y * blockIdx.z);
  const long long tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * blockDim.x * blockDim.y * blockDim.z + tid] += 1;
}

__global__ void reverse_in_block(const float* in, float* out) {
  __shared__ float buf[256];
  buf[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// The same without the barrier: a race that the scheduler must expose.
__global__ void reverse_in_block_racy(const float* in, float* out) {
  __shared__ float buf[256];
  buf[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

__global__ void shuffles(int* out) {
  const int lane = threadIdx.x % 32;
  const int base = threadIdx.x * 6;
  out[base + 0] = __shfl_down_sync(0xffffffffu, lane * 10, 3);
  out[base + 1] = __shfl_up_sync(0xffffffffu, lane * 10, 5);
  out[base + 2] = __shfl_xor_sync(0xffffffffu, lane * 10, 7);
  out[base + 3] = __shfl_sync(0xffffffffu, lane * 10, 9);
  out[base + 4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  float v = static_cast<float>(lane);
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  out[base + 5] = static_cast<int>(v);
}

__global__ void early_exit_then_barrier(float* out) {
  if (threadIdx.x >= 10) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void partial_warp_shuffle(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void read_shared_before_write(float* out) {
  __shared__ float buf[4];
  out[threadIdx.x] = buf[threadIdx.x];
  buf[threadIdx.x] = 1.f;
}

__global__ void read_dynamic_shared(float* out) {
  float* buf = static_cast<float*>(cuda_emu::dynamic_shared_memory());
  out[threadIdx.x] = buf[threadIdx.x];
}

struct Pod {
  long long a;
  double b;
};
__global__ void takes_struct(const __grid_constant__ Pod p, double* out) { out[0] = static_cast<double>(p.a) + p.b; }

}  // namespace

PROSG_TEST(emu_launch_runs_every_thread_once) {
  for (dim3 grid : {dim3(3, 2, 2), dim3(1), dim3(70000)}) {
    const dim3 block = grid.x > 1000 ? dim3(1) : dim3(5, 3, 2);
    const size_t n = 1ull * grid.x * grid.y * grid.z * block.x * block.y * block.z;
    std::vector<int> out(n, 0);
    PROSG_EXPECT(launch(&write_ids, grid, block, 0, nullptr, out.data()) == cudaSuccess)
        << cuda_emu::failure_message();
    int wrong = 0;
    for (int v : out) wrong += v != 1;
    PROSG_EXPECT(wrong == 0) << wrong << "of" << n << "threads did not run exactly once";
  }
}

PROSG_TEST(emu_launch_configuration_is_checked_like_cuda) {
  std::vector<int> out(4, 0);
  struct Bad {
    dim3 grid, block;
    size_t smem;
    cudaError_t expected;
  };
  const Bad cases[] = {
      {dim3(0), dim3(32), 0, cudaErrorInvalidConfiguration},          // empty grid
      {dim3(1, 0), dim3(32), 0, cudaErrorInvalidConfiguration},
      {dim3(1, 65536), dim3(32), 0, cudaErrorInvalidConfiguration},   // gridDim.y limit
      {dim3(1, 1, 65536), dim3(32), 0, cudaErrorInvalidConfiguration},
      {dim3(1), dim3(1025), 0, cudaErrorInvalidConfiguration},        // threads per block
      {dim3(1), dim3(32, 32, 2), 0, cudaErrorInvalidConfiguration},
      {dim3(1), dim3(1, 1, 65), 0, cudaErrorInvalidConfiguration},
      {dim3(1), dim3(0), 0, cudaErrorInvalidConfiguration},
      {dim3(1), dim3(32), (48 << 10) + 1, cudaErrorInvalidValue},     // dynamic shared memory
  };
  for (const Bad& c : cases) {
    cuda_emu::stats() = {};
    const cudaError_t err = launch(&write_ids, c.grid, c.block, c.smem, nullptr, out.data());
    PROSG_EXPECT(err == c.expected) << cudaGetErrorName(err) << "for grid" << c.grid.x << c.grid.y << c.grid.z
                                    << "block" << c.block.x << c.block.y << c.block.z;
    PROSG_EXPECT(cuda_emu::stats().blocks == 0) << "an invalid launch ran blocks";
    PROSG_EXPECT(cudaPeekAtLastError() == c.expected);
    PROSG_EXPECT(cudaGetLastError() == c.expected);
    PROSG_EXPECT(cudaGetLastError() == cudaSuccess) << "cudaGetLastError clears the error";
  }
  // Opting in raises the dynamic shared memory limit, up to the device's.
  std::vector<float> f(32);
  PROSG_EXPECT(cudaFuncSetAttribute(&read_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000) ==
               cudaSuccess);
  PROSG_EXPECT(launch(&read_dynamic_shared, dim3(1), dim3(32), 100000, nullptr, f.data()) == cudaSuccess);
  PROSG_EXPECT(launch(&read_dynamic_shared, dim3(1), dim3(32), 100001, nullptr, f.data()) == cudaErrorInvalidValue);
  PROSG_EXPECT(cudaFuncSetAttribute(&read_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, 300000) ==
               cudaErrorInvalidValue);
  cudaGetLastError();
}

PROSG_TEST(emu_syncthreads_orders_shared_memory) {
  const int n = 256, blocks = 3;
  std::vector<float> in(n * blocks), out(n * blocks, NAN);
  for (int i = 0; i < n * blocks; ++i) in[i] = static_cast<float>(i);
  for (auto order : {cuda_emu::Schedule::kForward, cuda_emu::Schedule::kReverse}) {
    cuda_emu::set_schedule(order);
    PROSG_EXPECT(launch(&reverse_in_block, dim3(blocks), dim3(n), 0, nullptr, in.data(), out.data()) == cudaSuccess);
    for (int b = 0; b < blocks; ++b)
      for (int t = 0; t < n; ++t) PROSG_EXPECT(out[b * n + t] == in[b * n + n - 1 - t]) << b << t;
  }
  cuda_emu::set_schedule(cuda_emu::Schedule::kForward);
}

PROSG_TEST(emu_missing_barrier_is_exposed) {
  // In thread order the first half of the block reads slots the second half has not
  // written yet: the poison (NaN) shows.
  const int n = 64;
  std::vector<float> in(n, 1.f), out(n, 0.f);
  PROSG_EXPECT(launch(&reverse_in_block_racy, dim3(1), dim3(n), 0, nullptr, in.data(), out.data()) == cudaSuccess);
  int nan = 0;
  for (float v : out) nan += std::isnan(v);
  PROSG_EXPECT(nan == n / 2) << nan;
}

PROSG_TEST(emu_warp_shuffles_and_votes) {
  const int n = 64;  // two warps
  std::vector<int> out(n * 6, -1);
  PROSG_EXPECT(launch(&shuffles, dim3(1), dim3(n), 0, nullptr, out.data()) == cudaSuccess)
      << cuda_emu::failure_message();
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l) ballot |= (l % 3 == 0 ? 1u : 0u) << l;
  for (int t = 0; t < n; ++t) {
    const int lane = t % 32;
    PROSG_EXPECT(out[t * 6 + 0] == (lane + 3 < 32 ? lane + 3 : lane) * 10) << "down" << t;
    PROSG_EXPECT(out[t * 6 + 1] == (lane >= 5 ? lane - 5 : lane) * 10) << "up" << t;
    PROSG_EXPECT(out[t * 6 + 2] == (lane ^ 7) * 10) << "xor" << t;
    PROSG_EXPECT(out[t * 6 + 3] == 90) << "idx" << t;
    PROSG_EXPECT(static_cast<unsigned>(out[t * 6 + 4]) == ballot) << "ballot" << t;
    if (lane == 0) {
      PROSG_EXPECT(out[t * 6 + 5] == 31 * 32 / 2) << "reduction" << t;
    }
  }
}

PROSG_TEST(emu_divergent_barriers_fail_the_launch) {
  std::vector<float> out(64);
  cudaError_t err = launch(&early_exit_then_barrier, dim3(1), dim3(64), 0, nullptr, out.data());
  PROSG_EXPECT(err == cudaErrorLaunchFailure);
  PROSG_EXPECT(cuda_emu::failure_message().find("__syncthreads reached by 10 of 64") != std::string::npos)
      << cuda_emu::failure_message();
  std::vector<int> iout(64);
  err = launch(&partial_warp_shuffle, dim3(1), dim3(64), 0, nullptr, iout.data());
  PROSG_EXPECT(err == cudaErrorLaunchFailure);
  PROSG_EXPECT(cuda_emu::failure_message().find("__shfl_down_sync") != std::string::npos)
      << cuda_emu::failure_message();
  cudaGetLastError();
  // The runtime is usable after a failed launch.
  std::vector<int> ids(32, 0);
  PROSG_EXPECT(launch(&write_ids, dim3(1), dim3(32), 0, nullptr, ids.data()) == cudaSuccess);
}

PROSG_TEST(emu_shared_memory_is_poisoned_per_block) {
  std::vector<float> out(8, 0.f);
  for (int rep = 0; rep < 2; ++rep) {  // the second launch sees no value of the first
    PROSG_EXPECT(launch(&read_shared_before_write, dim3(1), dim3(4), 0, nullptr, out.data()) == cudaSuccess);
    for (int i = 0; i < 4; ++i) PROSG_EXPECT(std::isnan(out[i])) << rep << i << out[i];
  }
  PROSG_EXPECT(launch(&read_dynamic_shared, dim3(1), dim3(8), 64, nullptr, out.data()) == cudaSuccess);
  for (int i = 0; i < 8; ++i) PROSG_EXPECT(std::isnan(out[i])) << i;
}

PROSG_TEST(emu_kernel_parameters_are_copied) {
  double out = 0;
  PROSG_EXPECT(launch(&takes_struct, dim3(1), dim3(1), 0, nullptr, Pod{40, 2.5}, &out) == cudaSuccess);
  PROSG_EXPECT(out == 42.5);
}

PROSG_TEST(emu_device_attributes_are_settable) {
  int sms = 0;
  for (int want : {1, 8, 132}) {
    cuda_emu::set_sm_count(want);
    PROSG_EXPECT(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess);
    PROSG_EXPECT(sms == want);
  }
}

// Every float16 value converts to float exactly and back to itself; a float halfway
// between two neighbours rounds to the even one; beyond the largest finite value,
// infinity. The same for bfloat16.
PROSG_TEST(emu_half_and_bfloat16_round_to_nearest_even) {
  int bad = 0;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const __half x{static_cast<uint16_t>(h)};
    const float f = __half2float(x);
    if (std::isnan(f)) {
      bad += !std::isnan(__half2float(__float2half_rn(f)));
      continue;
    }
    bad += __float2half_rn(f).__x != h;
    const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double expected = e == 0 ? std::ldexp(static_cast<double>(m), -24) : std::ldexp(1.0 + m / 1024.0, static_cast<int>(e) - 15);
    if (e == 0x1f) expected = INFINITY;
    if (h & 0x8000) expected = -expected;
    bad += static_cast<double>(f) != expected;
    // Halfway to the next value up (in magnitude), exactly representable in float.
    if ((h & 0x7fff) < 0x7bff) {
      const float next = __half2float(__half{static_cast<uint16_t>(h + 1)});
      const float mid = static_cast<float>((static_cast<double>(f) + next) / 2);
      const uint16_t even = (h & 1) ? static_cast<uint16_t>(h + 1) : static_cast<uint16_t>(h);
      bad += __float2half_rn(mid).__x != even;
    }
  }
  PROSG_EXPECT(bad == 0) << bad << "float16 conversions wrong";
  PROSG_EXPECT(std::isinf(__half2float(__float2half_rn(65520.f))));
  PROSG_EXPECT(__half2float(__float2half_rn(65519.f)) == 65504.f);
  PROSG_EXPECT(__float2half_rn(std::ldexp(1.f, -25)).__x == 0);       // tie to even: 0
  PROSG_EXPECT(__float2half_rn(std::ldexp(1.5f, -25)).__x == 1);      // above the tie

  bad = 0;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(h)});
    if (std::isnan(f)) continue;
    bad += __float2bfloat16_rn(f).__x != h;
    if ((h & 0x7fff) < 0x7f7f) {
      const float next = __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(h + 1)});
      const float mid = static_cast<float>((static_cast<double>(f) + next) / 2);
      const uint16_t even = (h & 1) ? static_cast<uint16_t>(h + 1) : static_cast<uint16_t>(h);
      bad += __float2bfloat16_rn(mid).__x != even;
    }
  }
  PROSG_EXPECT(bad == 0) << bad << "bfloat16 conversions wrong";
  PROSG_EXPECT(std::isnan(__bfloat162float(__float2bfloat16_rn(NAN))));
}

PROSG_TEST_MAIN()
