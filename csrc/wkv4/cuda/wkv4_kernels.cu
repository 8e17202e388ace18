// CUDA kernels of wkv4 (no torch headers). The arithmetic is wkv4_math.h's, shared
// with the CPU kernels; this file only maps threads and moves data.
//
// Index mapping: threads of a block run consecutive channels c of one sample b
// (blockIdx.y), so every step's loads and stores of key, value and out coalesce; each
// thread keeps its state in registers.
//
// Forward: a thread per (b, c) alone leaves a GPU mostly idle when B*C is small
// (8 x 768 is about 6k threads for 132 SMs), so time is split too, as a chunked scan:
//   1. chunk_end_states: each (b, c, chunk) runs its chunk from the empty state and
//      writes the end state;
//   2. chunk_scan: each (b, c) folds the chunk end states in order with
//      wkv4::combine, leaving each chunk's true start state (and writes state_out);
//   3. forward_chunks: each (b, c, chunk) reruns its chunk from its start state and
//      writes the outputs.
// With one chunk only step 3 runs, from the given state.
//
// Backward: a thread per (b, c) walks time backwards; pass 1 stores the state every
// kSegment steps in the workspace, pass 2 replays each segment into registers and
// steps the gradients back through it. No length limit is compiled in.
#include <algorithm>

#include "common/cuda_types.cuh"
#include "wkv4/cuda/wkv4_launch.h"
#include "wkv4/wkv4_math.h"

namespace prosg::cuda {
namespace {

using wkv4::ScalarOps;
using wkv4::State;
using wkv4::StateGrad;

constexpr int kThreads = 128;
constexpr int64_t kMinChunkLen = 32;
constexpr int kSegment = 16;

// Inputs of one (b, c) thread: loads of the effective key and value of step t. It
// refers to the kernel's __grid_constant__ parameters, so no per-thread copy is made.
template <typename T>
struct Inputs {
  const Wkv4Params& p;
  long long b, c;

  __device__ float lowrank(const Wkv4LowRank& lr, long long t) const {
    float x = 0.f;
    const T* z = static_cast<const T*>(lr.z) + b * lr.z_batch_stride + t * lr.z_seq_stride;
    const T* U = static_cast<const T*>(lr.U) + b * lr.u_batch_stride + c * lr.u_chan_stride;
    for (long long j = 0; j < lr.rank; ++j) x += to_float(z[j * lr.z_rank_stride]) * to_float(U[j * lr.u_rank_stride]);
    return x;
  }
  __device__ float key(long long t) const {
    const float k = to_float(static_cast<const T*>(p.key)[b * p.k_batch_stride + t * p.k_seq_stride + c * p.k_chan_stride]);
    return p.key_lr.rank ? k + lowrank(p.key_lr, t) : k;
  }
  __device__ float value(long long t) const {
    const float v =
        to_float(static_cast<const T*>(p.value)[b * p.v_batch_stride + t * p.v_seq_stride + c * p.v_chan_stride]);
    return p.value_lr.rank ? v + lowrank(p.value_lr, t) : v;
  }
};

// [.., 3, C] state rows: index of row i of (b, c) in a buffer with `lead` leading rows.
__device__ __forceinline__ long long state_index(long long lead, long long C, int row, long long c) {
  return (lead * 3 + row) * C + c;
}

__device__ __forceinline__ State<float> load_state(const float* buf, long long lead, long long C, long long c) {
  return {buf[state_index(lead, C, 0, c)], buf[state_index(lead, C, 1, c)], buf[state_index(lead, C, 2, c)]};
}

__device__ __forceinline__ void store_state(float* buf, long long lead, long long C, long long c, const State<float>& s) {
  buf[state_index(lead, C, 0, c)] = s.a;
  buf[state_index(lead, C, 1, c)] = s.b;
  buf[state_index(lead, C, 2, c)] = s.p;
}

__device__ __forceinline__ State<float> empty_state() { return {0.f, 0.f, wkv4::kEmptyMax}; }

// Steps 1 and 3 of the forward. start: per-(chunk, b) start states or null (empty /
// state_in for a single chunk); end: where to write the end state, or null.
template <typename T, bool kWriteOut>
__global__ void __launch_bounds__(kThreads)
    forward_chunks(const __grid_constant__ Wkv4Params p, long long chunk_len, const float* start, float* end) {
  const long long c = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.channels) return;
  const long long chunk = blockIdx.z, B = p.batch, C = p.channels;
  const long long t0 = chunk * chunk_len, t1 = min(static_cast<long long>(p.seqlen), t0 + chunk_len);
  const float w = static_cast<const float*>(p.w)[c], u = static_cast<const float*>(p.u)[c];
  for (long long b = blockIdx.y; b < B; b += gridDim.y) {
    const Inputs<T> in{p, b, c};
    State<float> s = start ? load_state(start, chunk * B + b, C, c) : empty_state();
    T* out = static_cast<T*>(p.out) + b * p.seqlen * C + c;
    for (long long t = t0; t < t1; ++t) {
      const float y = wkv4::forward_step<ScalarOps>(w, u, in.key(t), in.value(t), s);
      if (kWriteOut) out[t * C] = from_float<T>(y);
    }
    if (end) store_state(end, chunk * B + b, C, c, s);
  }
}

// Step 2: workspace[chunk, b] holds chunk end states on entry and start states on exit.
// Every chunk but the last has chunk_len steps, the last at least one.
__global__ void __launch_bounds__(kThreads)
    chunk_scan(const __grid_constant__ Wkv4Params p, long long chunks, long long chunk_len, float* workspace) {
  const long long c = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.channels) return;
  const long long B = p.batch, C = p.channels;
  const float w = static_cast<const float*>(p.w)[c];
  for (long long b = blockIdx.y; b < B; b += gridDim.y) {
    State<float> s = p.state_in ? load_state(static_cast<const float*>(p.state_in), b, C, c) : empty_state();
    for (long long i = 0; i < chunks; ++i) {
      const State<float> chunk_end = load_state(workspace, i * B + b, C, c);
      store_state(workspace, i * B + b, C, c, s);
      const long long len = min(chunk_len, static_cast<long long>(p.seqlen) - i * chunk_len);
      s = wkv4::combine<ScalarOps>(s, static_cast<float>(len) * w, chunk_end);
    }
    store_state(static_cast<float*>(p.state_out), b, C, c, s);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(const __grid_constant__ Wkv4Params p, float* checkpoints) {
  const long long c = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.channels) return;
  const long long B = p.batch, C = p.channels, T_ = p.seqlen;
  const long long n_seg = (T_ + kSegment - 1) / kSegment;
  const float w = static_cast<const float*>(p.w)[c], u = static_cast<const float*>(p.u)[c];
  for (long long b = blockIdx.y; b < B; b += gridDim.y) {
    const Inputs<T> in{p, b, c};
    // Pass 1: the state at the start of every segment, [segment, b, 3, C].
    State<float> s = p.state_in ? load_state(static_cast<const float*>(p.state_in), b, C, c) : empty_state();
    for (long long t = 0; t < T_; ++t) {
      if (t % kSegment == 0) store_state(checkpoints, (t / kSegment) * B + b, C, c, s);
      wkv4::forward_step<ScalarOps>(w, u, in.key(t), in.value(t), s);
    }

    // Pass 2: segments in reverse.
    StateGrad<float> g;
    {
      const State<float> gs = load_state(static_cast<const float*>(p.grad_state_out), b, C, c);
      g = {gs.a, gs.b, gs.p};
    }
    float gw = 0.f, gu = 0.f;
    State<float> states[kSegment];
    float keys[kSegment], values[kSegment];
    const T* grad_out = static_cast<const T*>(p.grad_out) + b * p.go_batch_stride + c * p.go_chan_stride;
    T* grad_key = static_cast<T*>(p.grad_key) + b * T_ * C + c;
    T* grad_value = static_cast<T*>(p.grad_value) + b * T_ * C + c;
    for (long long seg = n_seg - 1; seg >= 0; --seg) {
      const long long t0 = seg * kSegment;
      const int len = static_cast<int>(min(static_cast<long long>(kSegment), T_ - t0));
      s = load_state(checkpoints, seg * B + b, C, c);
#pragma unroll
      for (int j = 0; j < kSegment; ++j) {
        if (j < len) {
          states[j] = s;
          keys[j] = in.key(t0 + j);
          values[j] = in.value(t0 + j);
          wkv4::forward_step<ScalarOps>(w, u, keys[j], values[j], s);
        }
      }
#pragma unroll
      for (int j = kSegment - 1; j >= 0; --j) {
        if (j < len) {
          const long long t = t0 + j;
          float gk, gv;
          wkv4::backward_step<ScalarOps>(w, u, keys[j], values[j], states[j], to_float(grad_out[t * p.go_seq_stride]),
                                         g, gk, gv, gw, gu);
          grad_key[t * C] = from_float<T>(gk);
          grad_value[t * C] = from_float<T>(gv);
        }
      }
    }
    static_cast<float*>(p.grad_w)[b * C + c] = gw;
    static_cast<float*>(p.grad_u)[b * C + c] = gu;
    if (p.grad_state_in) store_state(static_cast<float*>(p.grad_state_in), b, C, c, State<float>{g.a, g.b, g.p});
  }
}

}  // namespace

int64_t wkv4_forward_chunks(int64_t batch, int64_t channels, int64_t seqlen, int sm_count) {
  // Aim for ~4 resident 128-thread blocks' worth of threads per SM... times 4 waves.
  const int64_t target_threads = static_cast<int64_t>(std::max(sm_count, 1)) * 2048 * 2;
  const int64_t threads = std::max<int64_t>(1, batch * channels);
  const int64_t want = (target_threads + threads - 1) / threads;
  const int64_t most = std::max<int64_t>(1, seqlen / kMinChunkLen);
  const int64_t chunks = std::clamp<int64_t>(want, 1, std::min<int64_t>(most, kMaxGridYZ));
  // Chunks of ceil(T / chunks) steps: fewer chunks may cover T (T = 5000 in 156 chunks
  // of 33 steps needs only 152), and an empty trailing chunk must not exist.
  const int64_t chunk_len = (seqlen + chunks - 1) / std::max<int64_t>(chunks, 1);
  return chunk_len > 0 ? (seqlen + chunk_len - 1) / chunk_len : 1;
}

int64_t wkv4_forward_workspace(int64_t batch, int64_t channels, int64_t chunks) {
  return chunks > 1 ? chunks * batch * 3 * channels : 0;
}

cudaError_t launch_wkv4_forward(const Wkv4Params& p, int64_t chunks, float* workspace, cudaStream_t stream) {
  if (p.batch == 0 || p.channels == 0) return cudaSuccess;
  if (chunks < 1 || chunks > kMaxGridYZ) return cudaErrorInvalidValue;
  const long long chunk_len = (p.seqlen + chunks - 1) / chunks;
  // Every chunk must hold at least one step: chunk_scan advances the state by each
  // chunk's length.
  if (chunks > 1 && (chunks - 1) * chunk_len >= p.seqlen) return cudaErrorInvalidValue;
  const dim3 block(kThreads);
  const dim3 rows(ceil_div(p.channels, kThreads), grid_dim(p.batch, kMaxGridYZ));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (chunks == 1) {
      return launch(&forward_chunks<T, true>, rows, block, 0, stream, p, chunk_len,
                    static_cast<const float*>(p.state_in), static_cast<float*>(p.state_out));
    }
    const dim3 grid(rows.x, rows.y, static_cast<unsigned int>(chunks));
    const float* no_start = nullptr;
    float* no_end = nullptr;
    cudaError_t err = launch(&forward_chunks<T, false>, grid, block, 0, stream, p, chunk_len, no_start, workspace);
    if (err == cudaSuccess) err = launch(&chunk_scan, rows, block, 0, stream, p, static_cast<long long>(chunks),
                                         chunk_len, workspace);
    if (err == cudaSuccess) err = launch(&forward_chunks<T, true>, grid, block, 0, stream, p, chunk_len,
                                         static_cast<const float*>(workspace), no_end);
    return err;
  });
}

int64_t wkv4_backward_workspace(int64_t batch, int64_t channels, int64_t seqlen) {
  return ((seqlen + kSegment - 1) / kSegment) * batch * 3 * channels;
}

cudaError_t launch_wkv4_backward(const Wkv4Params& p, float* workspace, cudaStream_t stream) {
  if (p.batch == 0 || p.channels == 0) return cudaSuccess;
  const dim3 grid(ceil_div(p.channels, kThreads), grid_dim(p.batch, kMaxGridYZ));
  return dispatch_dtype(p.dtype, [&](auto tag) {
    return launch(&backward_kernel<decltype(tag)>, grid, dim3(kThreads), 0, stream, p, workspace);
  });
}

}  // namespace prosg::cuda
