// CPU execution of prosg's CUDA kernels, for tests: the CUDA language and runtime
// subset the .cu files use, implemented on the host so that the real kernel files
// compile unchanged with the host compiler and their launchers run here, under ASan and
// UBSan. It is a development and CI tool, never a backend of `import prosg`.
//
// The headers in include/ (cuda_runtime.h, cuda_runtime_api.h, cuda_fp16.h,
// cuda_bf16.h) stand in for the toolkit's and include this one; put include/ first on
// the include path and compile the .cu file as C++ (-x c++).
//
// Execution model. A launch runs its blocks one after another on the calling thread;
// within a block every CUDA thread is a fiber (its own stack) and a deterministic
// scheduler runs each fiber until it finishes or waits at a barrier (__syncthreads, a
// warp shuffle, vote or __syncwarp), in thread order or in reverse order (set_schedule),
// so a missing barrier shows as a read of another thread's unwritten data. What it
// checks as CUDA does or stricter:
//   * the launch configuration: grid and block limits, an empty grid, the dynamic
//     shared memory size (48 KiB, or the per-kernel opt-in up to the device maximum);
//     an invalid launch returns its error and runs nothing;
//   * barriers: a __syncthreads that not every live thread of the block reaches, or a
//     warp operation whose mask names a lane that exited or waits elsewhere, is a
//     deadlock on a GPU and a launch failure here (with a message, failure_message());
//   * shared memory, static and dynamic, is filled with 0xFF bytes (a NaN for float
//     and double) before every block, so a read before a write shows.
// Device properties that launchers query (the SM count above all) are settable.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- Language ---------------------------------------------------------------------
#define PROSG_CUDA_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
// Every static __shared__ variable lands in one section, which the emulator fills
// with 0xFF before each block (its bounds are the linker's __start_/__stop_ symbols).
#define __shared__ __attribute__((section("cuda_emu_shared"), used)) static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// ---- Runtime types ----------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct cudaLaunchAttribute;

struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned int numAttrs = 0;
};

const char* cudaGetErrorString(cudaError_t err);
const char* cudaGetErrorName(cudaError_t err);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value);
template <typename... A>
cudaError_t cudaFuncSetAttribute(void (*func)(A...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

// ---- The emulator -----------------------------------------------------------------
namespace cuda_emu {

inline constexpr int kWarpSize = 32;

// Device properties the launchers can query. Defaults: an H100/H200 (132 SMs, 9.0).
struct DeviceProperties {
  int sm_count = 132;
  int cc_major = 9, cc_minor = 0;
  int max_shared_optin = 232448;  // 227 KiB
};
DeviceProperties& device_properties();
inline void set_sm_count(int sms) { device_properties().sm_count = sms; }

enum class Schedule { kForward, kReverse };
void set_schedule(Schedule s);
Schedule schedule();

// Why the last failed launch failed (empty when none did).
const std::string& failure_message();
// Counters for tests of the harness itself.
struct Stats {
  long long launches = 0, blocks = 0, threads = 0, barriers = 0;
};
Stats& stats();


// What every launch hands to the runtime: the block shape and a function that runs
// the kernel body for the current fiber.
struct LaunchBody {
  void (*run)(void* closure);
  void* closure;
  const void* kernel;  // for per-kernel attributes
};
cudaError_t launch(const cudaLaunchConfig_t& config, const LaunchBody& body);

// Synchronisation points, called from inside a kernel.
void sync_block();
void sync_warp(unsigned mask, const char* what);
// The current block's dynamic shared memory (extern __shared__ T x[] in CUDA).
void* dynamic_shared_memory();

// Lane exchange for shuffles and votes: every lane of `mask` publishes 8 bytes, then
// reads those of `src_lane`.
uint64_t exchange(unsigned mask, uint64_t mine, int src_lane, const char* what);
unsigned ballot(unsigned mask, bool pred);

int lane_id();

template <typename T>
T shuffle(unsigned mask, T v, int src_lane, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = exchange(mask, bits, src_lane, what);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace cuda_emu

// The C++ form of cudaLaunchKernelEx that prosg's launch helper calls: arguments are
// converted to the kernel's parameter types and copied once, as CUDA copies them into
// the parameter buffer; every thread of the grid then runs the kernel on those copies.
template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...), ActTypes&&... args) {
  if (config == nullptr) return cudaErrorInvalidValue;
  struct Closure {
    void (*kernel)(ExpTypes...);
    std::tuple<std::decay_t<ExpTypes>...> params;
  } closure{kernel, std::tuple<std::decay_t<ExpTypes>...>(std::forward<ActTypes>(args)...)};
  cuda_emu::LaunchBody body{
      [](void* c) {
        auto* cl = static_cast<Closure*>(c);
        std::apply(cl->kernel, cl->params);
      },
      &closure, reinterpret_cast<const void*>(kernel)};
  return cuda_emu::launch(*config, body);
}

// CUDA's built-in variables: the scheduler sets them to the running fiber's before it
// switches to that fiber. Plain globals, not thread_local: launches run one at a time
// (a mutex serialises launches from several threads), and GCC 12's UBSan null check
// of an extern thread_local reads stale flags and reports false errors.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
inline constexpr int warpSize = cuda_emu::kWarpSize;

// ---- Device functions -------------------------------------------------------------
inline void __syncthreads() { cuda_emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emu::sync_warp(mask, "__syncwarp"); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  const int lane = cuda_emu::lane_id();
  return cuda_emu::shuffle(mask, v, (lane / width) * width + ((src % width + width) % width), "__shfl_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = cuda_emu::lane_id(), base = (lane / width) * width;
  const int src = lane - base + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return cuda_emu::shuffle(mask, v, src, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  const int lane = cuda_emu::lane_id(), base = (lane / width) * width;
  const int src = lane - base >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return cuda_emu::shuffle(mask, v, src, "__shfl_up_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  const int lane = cuda_emu::lane_id(), base = (lane / width) * width;
  const int src = lane ^ lane_mask;
  return cuda_emu::shuffle(mask, v, src - base < width && src >= base ? src : lane, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return cuda_emu::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return cuda_emu::ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) { return (cuda_emu::ballot(mask, pred != 0) & mask) == mask; }

// Integer and floating min/max as CUDA's device overloads (host C++ has only std::).
#define PROSG_EMU_MINMAX(T)                          \
  inline T min(T a, T b) { return a < b ? a : b; } \
  inline T max(T a, T b) { return a < b ? b : a; }
PROSG_EMU_MINMAX(int)
PROSG_EMU_MINMAX(unsigned int)
PROSG_EMU_MINMAX(long)
PROSG_EMU_MINMAX(unsigned long)
PROSG_EMU_MINMAX(long long)
PROSG_EMU_MINMAX(unsigned long long)
#undef PROSG_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline unsigned int __float_as_uint(float x) {
  unsigned int u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
template <typename T>
T __ldg(const T* p) { return *p; }
// Atomics: fibers of a block never interleave between two instructions, and blocks run
// one after another, so a plain read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* address, T val) {
  const T old = *address;
  *address = old + val;
  return old;
}
template <typename T>
T atomicMax(T* address, T val) {
  const T old = *address;
  *address = old < val ? val : old;
  return old;
}
