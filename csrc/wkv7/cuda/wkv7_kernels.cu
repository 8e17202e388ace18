// CUDA kernels of wkv7 (no torch headers). The arithmetic is wkv7_math.h's, shared
// with the CPU kernels; this file only maps threads and moves data.
//
// Index mapping: a block per (sample b, head h), N threads (N = head size, a template
// argument). Forward: thread i owns value row i of the N x N state, its N floats in
// registers; each step the block stages r, d = exp(-exp(w)), k, a, b (N each) in
// shared memory, every thread reads them all, and v_i, y_i are the thread's own.
//
// Backward: one block per (b, h) as well, in three parts:
//   1. the forward again, storing each thread's state row every kSegment steps in the
//      workspace (checkpoints, B*H*ceil(T/kSegment)*N^2 floats);
//   2. per segment, last to first, the forward from its checkpoint, storing the state
//      before each of its steps in the block's scratch (kSegment*N^2 floats);
//   3. per step of the segment, last to first: the row phase (thread i, row i: the
//      row sums sa_i, dv_i, dsa_i and G_i = g_i + gy_i r), then the column phase
//      (thread j, key j: sums over the rows i for dr_j, dk_j, da_j, db_j, dw_j, and
//      dL/dS before the step). dL/dS lives in shared memory, [N][N + 1] (the padding
//      makes both the row-wise and the column-wise accesses bank-conflict free).
// The sums of the column phase run over i in a fixed order, so the backward is
// deterministic. The transition is never inverted to run the state backwards.
//
// No length limit is compiled in and nothing per thread scales with T.
//
// When B*H is too small to fill the GPU (B = 1, H = 12 is 12 blocks on 132 SMs) this
// form is latency bound. The remedy is the chunked (parallel over time) form, as
// flash-linear-attention's chunk_dplr: split T into chunks of C steps; within a chunk
// the product of the transitions diag(d_t) + a_t b_t^T is kept in WY form
// (I-like blocks of rank C) so each chunk's outputs are a few [C x N] matmuls given
// the chunk's start state; the start states come from a scan over chunks of
// (decay product, rank-C update) pairs. It would go here as a second kernel family
// (chunk_states, chunk_scan, chunk_outputs, as wkv4's chunked forward), chosen by
// launch_wkv7_forward when B*H < the SM count and T is long. It is not built yet.
#include <algorithm>

#include "common/cuda_types.cuh"
#include "wkv7/cuda/wkv7_launch.h"
#include "wkv7/wkv7_math.h"

namespace prosg::cuda {
namespace {

using wkv7::ScalarOps;

// Checkpoint spacing of the backward (see wkv7_cpu.cpp): the checkpoints take
// 1/kSegment of the memory of every state, the replay costs one extra forward pass.
constexpr int kSegment = 16;
// The backward's blocks (and so its scratch) are capped; blocks loop over (b, h).
constexpr long long kMaxBackwardBlocks = 1 << 16;

template <typename T>
__device__ __forceinline__ float load(const Wkv7Input& x, long long b, long long t, long long h, long long n) {
  return to_float(static_cast<const T*>(x.ptr)[b * x.sb + t * x.st + h * x.sh + n * x.sn]);
}

// The step's shared inputs, each N floats.
struct StepShared {
  float *r, *w, *d, *k, *a, *b;
};

// Thread n stages element n of step t's r, w, d, k, a, b (the caller syncs).
template <typename T>
__device__ __forceinline__ void stage(const Wkv7Params& p, const StepShared& sh, long long b, long long t,
                                      long long h, int n) {
  sh.r[n] = load<T>(p.r, b, t, h, n);
  const float w = load<T>(p.w, b, t, h, n);
  sh.w[n] = w;
  sh.d[n] = wkv7::decay<ScalarOps>(w);
  sh.k[n] = load<T>(p.k, b, t, h, n);
  sh.a[n] = load<T>(p.a, b, t, h, n);
  sh.b[n] = load<T>(p.b, b, t, h, n);
}

// Row i of an N x N matrix (zeros for none).
template <int N>
__device__ __forceinline__ void load_row(float* s, const float* matrix, int i) {
  if (matrix == nullptr) {
    PROSG_WKV7_UNROLL
    for (int j = 0; j < N; ++j) s[j] = 0.f;
  } else {
    const float* src = matrix + i * N;
    PROSG_WKV7_UNROLL
    for (int j = 0; j < N; ++j) s[j] = src[j];
  }
}

template <int N>
__device__ __forceinline__ void store_row(float* dst, const float* s) {
  PROSG_WKV7_UNROLL
  for (int j = 0; j < N; ++j) dst[j] = s[j];
}

// One forward step of thread i's row: stages the inputs, steps, syncs again before the
// next step overwrites them. Returns y_i.
template <typename T, int N>
__device__ __forceinline__ float forward_step(const Wkv7Params& p, const StepShared& sh, float* s, long long b,
                                              long long t, long long h, int i) {
  stage<T>(p, sh, b, t, h, i);
  const float v = load<T>(p.v, b, t, h, i);
  __syncthreads();
  const float y = wkv7::forward_row<ScalarOps, N>(s, sh.r, sh.d, sh.k, sh.a, sh.b, v);
  __syncthreads();
  return y;
}

template <typename T, int N>
__global__ void __launch_bounds__(N) forward_kernel(const __grid_constant__ Wkv7Params p) {
  __shared__ float buf[6][N];
  const StepShared sh{buf[0], buf[1], buf[2], buf[3], buf[4], buf[5]};
  const int i = threadIdx.x;
  const long long B = p.batch, H = p.heads, T_ = p.seqlen;
  for (long long bh = blockIdx.x; bh < B * H; bh += gridDim.x) {
    const long long b = bh / H, h = bh % H;
    float s[N];
    const float* state_in = static_cast<const float*>(p.state_in);
    load_row<N>(s, state_in ? state_in + bh * N * N : nullptr, i);
    T* out = static_cast<T*>(p.out) + h * N + i;
    for (long long t = 0; t < T_; ++t) {
      const float y = forward_step<T, N>(p, sh, s, b, t, h, i);
      out[(b * T_ + t) * H * N] = from_float<T>(y);
    }
    store_row<N>(static_cast<float*>(p.state_out) + (bh * N + i) * N, s);
  }
}

long long backward_blocks(long long bh) { return std::min(bh, kMaxBackwardBlocks); }

// Dynamic shared memory of the backward: dL/dS [N][N + 1] and ten N-vectors.
template <int N>
constexpr size_t backward_smem() {
  return sizeof(float) * (static_cast<size_t>(N) * (N + 1) + 10 * N);
}

template <typename T, int N>
__global__ void __launch_bounds__(N)
    backward_kernel(const __grid_constant__ Wkv7Params p, float* checkpoints, float* scratch) {
  constexpr int P = N + 1;  // row pitch of dL/dS in shared memory
  float* smem = static_cast<float*>(dynamic_shared());
  float* g = smem;
  float* vec = smem + N * P;
  const StepShared sh{vec, vec + N, vec + 2 * N, vec + 3 * N, vec + 4 * N, vec + 5 * N};
  float *v_sh = vec + 6 * N, *gy_sh = vec + 7 * N, *sa_sh = vec + 8 * N, *dsa_sh = vec + 9 * N;
  const int i = threadIdx.x;  // the value row in the forward and the row phase, the key in the column phase
  const long long B = p.batch, H = p.heads, T_ = p.seqlen;
  const long long n_seg = (T_ + kSegment - 1) / kSegment;
  float* seg = scratch + static_cast<long long>(blockIdx.x) * kSegment * N * N;  // [step][i][j]
  for (long long bh = blockIdx.x; bh < B * H; bh += gridDim.x) {
    const long long b = bh / H, h = bh % H;
    float* ckpt = checkpoints + bh * n_seg * N * N;  // [segment][i][j]
    // 1. Checkpoints.
    float s[N];
    const float* state_in = static_cast<const float*>(p.state_in);
    load_row<N>(s, state_in ? state_in + bh * N * N : nullptr, i);
    for (long long t = 0; t < T_; ++t) {
      if (t % kSegment == 0) store_row<N>(ckpt + ((t / kSegment) * N + i) * N, s);
      forward_step<T, N>(p, sh, s, b, t, h, i);
    }
    {
      const float* gso = static_cast<const float*>(p.grad_state_out) + (bh * N + i) * N;
      for (int j = 0; j < N; ++j) g[i * P + j] = gso[j];
    }
    const long long o = h * N + i;  // offset of (h, n = threadIdx.x) in a [B, T, H, N] row
    for (long long sg = n_seg - 1; sg >= 0; --sg) {
      const long long t0 = sg * kSegment;
      const int len = static_cast<int>(min(static_cast<long long>(kSegment), T_ - t0));
      // 2. The segment's states, each before its step.
      load_row<N>(s, ckpt + sg * N * N, i);
      for (int j = 0; j < len; ++j) {
        store_row<N>(seg + (j * N + i) * N, s);
        forward_step<T, N>(p, sh, s, b, t0 + j, h, i);
      }
      // 3. The gradients, step by step backwards.
      for (int j = len - 1; j >= 0; --j) {
        const long long t = t0 + j;
        stage<T>(p, sh, b, t, h, i);
        v_sh[i] = load<T>(p.v, b, t, h, i);
        gy_sh[i] = load<T>(p.grad_out, b, t, h, i);
        __syncthreads();
        const float* prev = seg + j * N * N;  // the state before step t, [i][j]
        // Row phase: thread i, value row i.
        const wkv7::RowGrad<float> row =
            wkv7::backward_row<ScalarOps, N>(prev + i * N, g + i * P, sh.r, sh.k, sh.a, sh.b, gy_sh[i]);
        sa_sh[i] = row.sa;
        dsa_sh[i] = row.dsa;
        const long long at = (b * T_ + t) * H * N + o;
        static_cast<T*>(p.grad_v)[at] = from_float<T>(row.dv);
        __syncthreads();
        // Column phase: thread i now stands for key index i.
        const int c = i;
        wkv7::ColumnGrad<float> acc{0.f, 0.f, 0.f, 0.f, 0.f};
        const float dc = sh.d[c], kc = sh.k[c], ac = sh.a[c], bc = sh.b[c];
        for (int row_i = 0; row_i < N; ++row_i) {
          const wkv7::RowGrad<float> rg{sa_sh[row_i], 0.f, dsa_sh[row_i]};
          float& G = g[row_i * P + c];
          G = wkv7::backward_column<ScalarOps>(prev[row_i * N + c], G, gy_sh[row_i], v_sh[row_i], rg, dc, kc, ac, bc,
                                               acc);
        }
        static_cast<T*>(p.grad_r)[at] = from_float<T>(acc.dr);
        static_cast<T*>(p.grad_k)[at] = from_float<T>(acc.dk);
        static_cast<T*>(p.grad_a)[at] = from_float<T>(acc.da);
        static_cast<T*>(p.grad_b)[at] = from_float<T>(acc.db);
        static_cast<T*>(p.grad_w)[at] = from_float<T>(wkv7::decay_grad<ScalarOps>(sh.w[c], acc.dd));
        __syncthreads();
      }
    }
    if (p.grad_state_in) {
      float* dst = static_cast<float*>(p.grad_state_in) + (bh * N + i) * N;
      for (int j = 0; j < N; ++j) dst[j] = g[i * P + j];
    }
    __syncthreads();  // g is reused by the block's next (b, h)
  }
}

// Calls f.template operator()<N>() for the params' head size.
template <typename F>
cudaError_t dispatch_head_size(long long n, F&& f) {
  switch (n) {
    case 16: return f.template operator()<16>();
    case 32: return f.template operator()<32>();
    case 64: return f.template operator()<64>();
    case 128: return f.template operator()<128>();
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_wkv7_forward(const Wkv7Params& p, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen == 0) return cudaSuccess;
  const unsigned int blocks = grid_dim(p.batch * p.heads, kMaxGridX);
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_head_size(p.head_size, [&]<int N>() {
      return launch(&forward_kernel<T, N>, dim3(blocks), dim3(N), 0, stream, p);
    });
  });
}

int64_t wkv7_backward_workspace(int64_t batch, int64_t heads, int64_t head_size, int64_t seqlen) {
  const int64_t bh = batch * heads, n_seg = (seqlen + kSegment - 1) / kSegment, nn = head_size * head_size;
  return bh * n_seg * nn + backward_blocks(bh) * kSegment * nn;
}

cudaError_t launch_wkv7_backward(const Wkv7Params& p, float* workspace, cudaStream_t stream) {
  if (p.batch == 0 || p.heads == 0 || p.seqlen == 0) return cudaSuccess;
  const long long bh = p.batch * p.heads, n_seg = (p.seqlen + kSegment - 1) / kSegment;
  const unsigned int blocks = static_cast<unsigned int>(backward_blocks(bh));
  float* checkpoints = workspace;
  float* scratch = workspace + bh * n_seg * p.head_size * p.head_size;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_head_size(p.head_size, [&]<int N>() {
      constexpr size_t smem = backward_smem<N>();
      // Over 48 KiB (N = 128: 71 KiB) needs the kernel's opt-in.
      cudaError_t err = cudaFuncSetAttribute(&backward_kernel<T, N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
      if (err != cudaSuccess) return err;
      return launch(&backward_kernel<T, N>, dim3(blocks), dim3(N), smem, stream, p, checkpoints, scratch);
    });
  });
}

}  // namespace prosg::cuda
