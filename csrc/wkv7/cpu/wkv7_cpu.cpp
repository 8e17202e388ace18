// CPU kernels of wkv7 and their registration. A task is one (sample, head): its N x N
// state lives in a task-local buffer (N^2 floats, 16 KiB at N = 64: L1/L2-resident)
// and every step walks the value rows i, each row one at::vec::Vectorized register
// group of key indices j at a time (R = N / lanes registers), through the shared
// header wkv7_math.h that the CUDA kernels use too. Tasks are split over threads with
// at::parallel_for; nothing is reduced across tasks, so results do not depend on the
// thread count.
//
// Arithmetic and state are float32 for float32/float16/bfloat16 inputs (each step's
// inputs are converted once) and float64 for float64 inputs.
//
// The backward recomputes instead of storing: pass 1 runs the forward again and keeps
// the state every kSegment steps (O(T / kSegment) states of N^2 per task), pass 2 replays
// the segments last to first, keeping each one's kSegment states, and steps the
// gradients back through it. The transition is never inverted (d_j can be 0, and
// running (diag(d) + a b^T)^-1 backwards amplifies rounding without bound).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common/cpu_vec.h"
#include "common/torch_utils.h"
#include "wkv7/wkv7.h"
#include "wkv7/wkv7_math.h"

namespace prosg::wkv7 {
namespace {

// Checkpoint spacing of the backward. With K = 16 the checkpoints take 1/16 of what
// storing every state would (T/16 states of N^2 per task), and the segment being
// replayed 16 states (256 KiB at N = 64, float32: within L2), while the replay costs
// one extra forward pass whatever K is.
constexpr int64_t kSegment = 16;

template <typename T>
struct VecOps {
  using V = at::vec::Vectorized<T>;
  // exp_u20 (2 ulp) is about twice as fast as exp (1 ulp) and as exact as CUDA's expf.
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) return x.exp_u20();
    else return x.exp();
  }
  static V neg(const V& x) { return x.neg(); }
  static V fma(const V& x, const V& y, const V& z) { return at::vec::fmadd(x, y, z); }
  static T sum(const V& x) {
    return at::vec::vec_reduce_all<T>([](V& u, V& v) { return u + v; }, x);
  }
};

// One (sample, head) task with head size N: the step inputs as register groups.
template <typename scalar_t, int N>
struct Head {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  static constexpr int W = Vec::size();
  static_assert(N % W == 0, "every supported head size is a whole number of vector registers");
  static constexpr int R = N / W;

  const Wkv7Params& p;
  int64_t b, h;

  // The row offset of (b, t, h) in a contiguous [B, T, H, N] buffer.
  int64_t row(int64_t t) const { return ((b * p.seqlen + t) * p.heads + h) * N; }
  // The offset of this task's state in a contiguous [B, H, N, N] buffer.
  int64_t state_offset() const { return (b * p.heads + h) * N * N; }

  void gather(acc_t* dst, const Wkv7Input& x, int64_t t) const {
    const auto* src = static_cast<const scalar_t*>(x.ptr) + b * x.sb + t * x.st + h * x.sh;
    cpu::gather(dst, src, x.sn, N);
  }
  void load(Vec* dst, const Wkv7Input& x, int64_t t) const {
    alignas(64) acc_t tmp[N];
    gather(tmp, x, t);
    for (int q = 0; q < R; ++q) dst[q] = Vec::loadu(tmp + q * W);
  }
  template <typename T>
  static void store(T* dst, const Vec* src) {
    alignas(64) acc_t tmp[N];
    for (int q = 0; q < R; ++q) src[q].store(tmp + q * W);
    for (int n = 0; n < N; ++n) dst[n] = static_cast<T>(tmp[n]);
  }

  // What a forward step reads: r, d = exp(-exp(w)), k, a, b as register groups, v as scalars.
  struct Step {
    Vec r[R], w[R], d[R], k[R], a[R], b[R];
    alignas(64) acc_t v[N];
  };
  void load_step(Step& s, int64_t t) const {
    load(s.r, p.r, t);
    load(s.w, p.w, t);
    load(s.k, p.k, t);
    load(s.a, p.a, t);
    load(s.b, p.b, t);
    gather(s.v, p.v, t);
    for (int q = 0; q < R; ++q) s.d[q] = decay<Ops>(s.w[q]);
  }

  void init_state(Vec* S) const {
    if (p.state_in == nullptr) {
      for (int q = 0; q < N * R; ++q) S[q] = Vec(acc_t(0));
      return;
    }
    const auto* in = static_cast<const acc_t*>(p.state_in) + state_offset();
    for (int q = 0; q < N * R; ++q) S[q] = Vec::loadu(in + q * W);
  }
  static void save_state(acc_t* dst, const Vec* S) {
    for (int q = 0; q < N * R; ++q) S[q].store(dst + q * W);
  }

  // One forward step of the whole head; writes y (N scalars) when `y` is given.
  static void step(Vec* S, const Step& s, acc_t* y) {
    for (int i = 0; i < N; ++i) {
      const acc_t yi = forward_row<Ops, R>(S + i * R, s.r, s.d, s.k, s.a, s.b, s.v[i]);
      if (y != nullptr) y[i] = yi;
    }
  }

  void forward() const {
    std::vector<Vec> S(N * R);
    init_state(S.data());
    Step s;
    alignas(64) acc_t y[N];
    auto* out = static_cast<scalar_t*>(p.out);
    for (int64_t t = 0; t < p.seqlen; ++t) {
      load_step(s, t);
      step(S.data(), s, y);
      scalar_t* dst = out + row(t);
      for (int n = 0; n < N; ++n) dst[n] = static_cast<scalar_t>(y[n]);
    }
    save_state(static_cast<acc_t*>(p.state_out) + state_offset(), S.data());
  }

  void backward() const {
    const int64_t T = p.seqlen, n_seg = (T + kSegment - 1) / kSegment, words = N * R;
    std::vector<Vec> S(words), checkpoints(n_seg * words);
    init_state(S.data());
    Step s;
    for (int64_t t = 0; t < T; ++t) {
      if (t % kSegment == 0) std::copy(S.begin(), S.end(), checkpoints.begin() + (t / kSegment) * words);
      load_step(s, t);
      step(S.data(), s, nullptr);
    }

    std::vector<Vec> g(words), seg_states(kSegment * words);  // g: dL/dS, carried backwards
    {
      const auto* gso = static_cast<const acc_t*>(p.grad_state_out) + state_offset();
      for (int q = 0; q < words; ++q) g[q] = Vec::loadu(gso + q * W);
    }
    alignas(64) acc_t gy[N], dv[N];
    auto* grad_r = static_cast<scalar_t*>(p.grad_r);
    auto* grad_w = static_cast<scalar_t*>(p.grad_w);
    auto* grad_k = static_cast<scalar_t*>(p.grad_k);
    auto* grad_v = static_cast<scalar_t*>(p.grad_v);
    auto* grad_a = static_cast<scalar_t*>(p.grad_a);
    auto* grad_b = static_cast<scalar_t*>(p.grad_b);
    for (int64_t seg = n_seg - 1; seg >= 0; --seg) {
      const int64_t t0 = seg * kSegment, steps = std::min(kSegment, T - t0);
      std::copy_n(checkpoints.begin() + seg * words, words, S.begin());
      for (int64_t j = 0; j < steps; ++j) {
        std::copy(S.begin(), S.end(), seg_states.begin() + j * words);
        load_step(s, t0 + j);
        step(S.data(), s, nullptr);
      }
      for (int64_t j = steps - 1; j >= 0; --j) {
        const int64_t t = t0 + j;
        load_step(s, t);
        gather(gy, p.grad_out, t);
        const Vec* prev = seg_states.data() + j * words;
        ColumnGrad<Vec> acc[R];
        for (int q = 0; q < R; ++q) acc[q] = {Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0))};
        // Row i's column contributions need only row i's scalars: both phases per row.
        for (int i = 0; i < N; ++i) {
          Vec* gi = g.data() + i * R;
          const Vec* si = prev + i * R;
          const RowGrad<acc_t> rg = backward_row<Ops, R>(si, gi, s.r, s.k, s.a, s.b, gy[i]);
          dv[i] = rg.dv;
          for (int q = 0; q < R; ++q)
            gi[q] = backward_column<Ops>(si[q], gi[q], gy[i], s.v[i], rg, s.d[q], s.k[q], s.a[q], s.b[q], acc[q]);
        }
        Vec dr[R], dw[R], dk[R], da[R], db[R];
        for (int q = 0; q < R; ++q) {
          dr[q] = acc[q].dr, dk[q] = acc[q].dk, da[q] = acc[q].da, db[q] = acc[q].db;
          dw[q] = decay_grad<Ops>(s.w[q], acc[q].dd);
        }
        const int64_t o = row(t);
        store(grad_r + o, dr);
        store(grad_w + o, dw);
        store(grad_k + o, dk);
        store(grad_a + o, da);
        store(grad_b + o, db);
        for (int n = 0; n < N; ++n) grad_v[o + n] = static_cast<scalar_t>(dv[n]);
      }
    }
    if (p.grad_state_in != nullptr) save_state(static_cast<acc_t*>(p.grad_state_in) + state_offset(), g.data());
  }
};

template <typename scalar_t, int N, typename Fn>
void for_each_head(const Wkv7Params& p, Fn&& fn) {
  // Heads per thread: at least 2^18 state-element steps (T * N^2) of work, so that a
  // small call (a decode step) runs inline: waking the thread pool costs more.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, p.seqlen * N * N));
  at::parallel_for(0, p.batch * p.heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(Head<scalar_t, N>{p, i / p.heads, i % p.heads});
  });
}

// Calls fn.template operator()<N>() for the params' head size (validated before).
template <typename Fn>
void dispatch_head_size(int64_t n, Fn&& fn) {
  switch (n) {
    case 16: return fn.template operator()<16>();
    case 32: return fn.template operator()<32>();
    case 64: return fn.template operator()<64>();
    case 128: return fn.template operator()<128>();
    default: TORCH_CHECK(false, "prosg.wkv7: unsupported head size ", n);
  }
}

void forward_cpu(const Wkv7Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "wkv7_forward_cpu", [&] {
    dispatch_head_size(p.head_size, [&]<int N>() {
      for_each_head<scalar_t, N>(p, [](const Head<scalar_t, N>& head) { head.forward(); });
    });
  });
}

void backward_cpu(const Wkv7Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "wkv7_backward_cpu", [&] {
    dispatch_head_size(p.head_size, [&]<int N>() {
      for_each_head<scalar_t, N>(p, [](const Head<scalar_t, N>& head) { head.backward(); });
    });
  });
}

constexpr Backend kCpu{&forward_cpu, &backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CPU, m) {
  m.impl("wkv7", &forward_op<kCpu>);
  m.impl("wkv7_backward", &backward_op<kCpu>);
}

}  // namespace prosg::wkv7
