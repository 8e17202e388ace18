// CPU kernels of wkv4 and their registration. Work is split with at::parallel_for
// over (sample, range of channels) tasks (see Task). Channels go one at::vec::Vectorized
// register at a time (8 floats with AVX2), and the last C mod 8 one at a time; both
// call the shared header wkv4_math.h, so the scalar and vector paths and the CUDA
// kernels compute the same expressions.
//
// The backward recomputes instead of storing: a forward pass keeps the state every
// kSegment steps (O(T / kSegment) states per task), then segments are replayed in
// reverse, each recomputing its kSegment states before stepping the gradients back.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/torch_utils.h"
#include "wkv4/wkv4.h"
#include "wkv4/wkv4_math.h"

namespace prosg::wkv4 {
namespace {

constexpr int64_t kSegment = 16;
// Ranks whose rows of U are held in registers at once (Task::effective_rows).
constexpr int kRankTile = 8;
// Steps whose low-rank terms are accumulated side by side (Task::add_rank_tile).
constexpr int kSteps = 4;

template <typename T>
struct VecOps {
  using V = at::vec::Vectorized<T>;
  // exp_u20 (2 ulp) is about twice as fast as exp (1 ulp) and as exact as CUDA's expf.
  static V exp_neg_abs(const V& d) {
    if constexpr (std::is_same_v<T, float>) return d.abs().neg().exp_u20();
    else return d.abs().neg().exp();
  }
  static V max(const V& x, const V& y) { return at::vec::maximum(x, y); }
  static V select_ge(const V& x, const V& y, const V& a, const V& b) { return V::blendv(b, a, x >= y); }
};

// F is acc_t (one channel) or Vectorized<acc_t> (a block of channels).
template <typename F>
struct Lanes {
  static constexpr int64_t n = 1;
};
template <typename T>
struct Lanes<at::vec::Vectorized<T>> {
  static constexpr int64_t n = at::vec::Vectorized<T>::size();
};

template <typename F, typename acc_t, typename T>
inline F load_lanes(const T* ptr, int64_t stride) {
  constexpr int64_t n = Lanes<F>::n;
  if constexpr (n == 1) {
    return static_cast<acc_t>(*ptr);
  } else {
    if constexpr (std::is_same_v<T, acc_t>) {
      if (stride == 1) return F::loadu(ptr);
    }
    alignas(64) acc_t tmp[n];
    for (int64_t l = 0; l < n; ++l) tmp[l] = static_cast<acc_t>(ptr[l * stride]);
    return F::loadu(tmp);
  }
}

template <typename F, typename acc_t, typename T>
inline void store_lanes(T* ptr, int64_t stride, const F& v) {
  constexpr int64_t n = Lanes<F>::n;
  if constexpr (n == 1) {
    *ptr = static_cast<T>(v);
  } else {
    if constexpr (std::is_same_v<T, acc_t>) {
      if (stride == 1) return v.store(ptr);
    }
    alignas(64) acc_t tmp[n];
    v.store(tmp);
    for (int64_t l = 0; l < n; ++l) ptr[l * stride] = static_cast<T>(tmp[l]);
  }
}

template <typename F, typename acc_t>
using OpsFor = std::conditional_t<Lanes<F>::n == 1, ScalarOps, VecOps<acc_t>>;

// Work layout. A task is one sample b and a range of channels [c_begin, c_end); it walks
// time in the outer loop and its channels in the inner loop, so every step reads and
// writes whole contiguous rows of key, value and out (streams the prefetchers follow),
// while the range's state (3 floats a channel) stays in L1. Channels go a vector
// register at a time, and the last C mod lanes one at a time with the same arithmetic.
template <typename scalar_t>
struct Task {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const Wkv4Params& p;
  int64_t b, c_begin, len;
  std::vector<acc_t> key_u, value_u;  // [rank][len]: the range's rows of U, packed once

  Task(const Wkv4Params& params, int64_t b_, int64_t c_begin_, int64_t c_end)
      : p(params), b(b_), c_begin(c_begin_), len(c_end - c_begin_) {
    pack(p.key_lr, key_u);
    pack(p.value_lr, value_u);
  }

  void pack(const Wkv4LowRank& lr, std::vector<acc_t>& dst) const {
    dst.resize(lr.rank * len);
    const auto* U = static_cast<const scalar_t*>(lr.U) + b * lr.u_batch_stride;
    for (int64_t j = 0; j < lr.rank; ++j)
      for (int64_t c = 0; c < len; ++c)
        dst[j * len + c] = static_cast<acc_t>(U[(c_begin + c) * lr.u_chan_stride + j * lr.u_rank_stride]);
  }

  // Calls body.template operator()<F>(c) for c = offsets in the range: F = Vec while a
  // whole register fits, then F = acc_t.
  template <typename Body>
  void for_channels(Body&& body) const {
    constexpr int64_t W = Vec::size();
    int64_t c = 0;
    for (; c + W <= len; c += W) body.template operator()<Vec>(c);
    for (; c < len; ++c) body.template operator()<acc_t>(c);
  }

  // The low-rank coefficients z[b, t, :] of one step, converted once for all channels.
  void load_z(const Wkv4LowRank& lr, int64_t t, acc_t* zt) const {
    const auto* z = static_cast<const scalar_t*>(lr.z) + b * lr.z_batch_stride + t * lr.z_seq_stride;
    for (int64_t j = 0; j < lr.rank; ++j) zt[j] = static_cast<acc_t>(z[j * lr.z_rank_stride]);
  }

  // The effective rows x + z U^T (x: key or value) of the steps [t0, t0 + steps), into
  // eff[(t - t0) * len + c], in a pass of its own ahead of the recurrence. Inside the
  // recurrence's body every step reloaded the rank's rows of U (2 x 8 x 768 floats a
  // sample at rank 8: more than L1) and its rank-long FMA chain serialised with the
  // step: the fused path cost twice the plain recurrence and more than forming
  // k + z U^T in memory first (benchmarks/RESULTS.md, 2026-12-01). Here each vector of
  // U is loaded into registers once per block, and the chains of different steps are
  // independent, so they overlap. The sum order (x, then j = 0, 1, ...) is the same.
  template <int J>
  void add_rank_tile(const Wkv4LowRank& lr, const std::vector<acc_t>& packed, const acc_t* zb, int64_t j0,
                     int64_t steps, const void* base, int64_t bs, int64_t ts, int64_t cs, int64_t t0,
                     acc_t* eff) const {
    for_channels([&]<typename F>(int64_t c) {
      F ureg[J];
      for (int j = 0; j < J; ++j) ureg[j] = load_lanes<F, acc_t>(packed.data() + (j0 + j) * len + c, 1);
      auto start = [&](int64_t i) {
        return j0 == 0 ? load_lanes<F, acc_t>(static_cast<const scalar_t*>(base) + b * bs + (t0 + i) * ts +
                                                  (c_begin + c) * cs, cs)
                       : load_lanes<F, acc_t>(eff + i * len + c, 1);
      };
      auto fma = [](acc_t z, const F& u, const F& x) {
        // An explicit FMA: -std=c++20 turns off GCC's contraction of a * b + c.
        if constexpr (Lanes<F>::n == 1) return std::fma(z, u, x);
        else return at::vec::fmadd(F(z), u, x);
      };
      // kSteps steps at a time: independent chains side by side in the registers.
      int64_t i = 0;
      for (; i + kSteps <= steps; i += kSteps) {
        F x[kSteps];
        for (int q = 0; q < kSteps; ++q) x[q] = start(i + q);
        for (int j = 0; j < J; ++j)
          for (int q = 0; q < kSteps; ++q) x[q] = fma(zb[(i + q) * lr.rank + j0 + j], ureg[j], x[q]);
        for (int q = 0; q < kSteps; ++q) store_lanes<F, acc_t>(eff + (i + q) * len + c, 1, x[q]);
      }
      for (; i < steps; ++i) {
        F x = start(i);
        for (int j = 0; j < J; ++j) x = fma(zb[i * lr.rank + j0 + j], ureg[j], x);
        store_lanes<F, acc_t>(eff + i * len + c, 1, x);
      }
    });
  }

  void effective_rows(const void* base, int64_t bs, int64_t ts, int64_t cs, const Wkv4LowRank& lr,
                      const std::vector<acc_t>& packed, int64_t t0, int64_t steps, std::vector<acc_t>& zb,
                      acc_t* eff) const {
    zb.resize(steps * lr.rank);
    for (int64_t i = 0; i < steps; ++i) load_z(lr, t0 + i, zb.data() + i * lr.rank);
    for (int64_t j0 = 0; j0 < lr.rank; j0 += kRankTile) {
      const int64_t jn = std::min<int64_t>(kRankTile, lr.rank - j0);
      // The tile's width as a template argument keeps U's vectors in registers.
      [&]<int... J>(std::integer_sequence<int, J...>) {
        (void)((jn == J + 1 ? (add_rank_tile<J + 1>(lr, packed, zb.data(), j0, steps, base, bs, ts, cs, t0, eff),
                               true)
                            : false) ||
               ...);
      }(std::make_integer_sequence<int, kRankTile>{});
    }
  }

  // The effective keys and values of steps [t0, t0 + steps) into ek / ev, for the
  // perturbed ones (has_key_lr() / has_value_lr()).
  void effective_block(int64_t t0, int64_t steps, std::vector<acc_t>& zb, acc_t* ek, acc_t* ev) const {
    if (has_key_lr())
      effective_rows(p.key, p.k_batch_stride, p.k_seq_stride, p.k_chan_stride, p.key_lr, key_u, t0, steps, zb, ek);
    if (has_value_lr())
      effective_rows(p.value, p.v_batch_stride, p.v_seq_stride, p.v_chan_stride, p.value_lr, value_u, t0, steps, zb,
                     ev);
  }
  // Asks for step t's raw key and value at channel c (the perturbed ones) while the
  // recurrence computes an earlier block: the pass that forms the effective rows is
  // memory-bound and would otherwise wait for them with nothing to overlap.
  void prefetch_inputs(int64_t t, int64_t c) const {
    if (has_key_lr())
      __builtin_prefetch(static_cast<const scalar_t*>(p.key) + b * p.k_batch_stride + t * p.k_seq_stride +
                         (c_begin + c) * p.k_chan_stride);
    if (has_value_lr())
      __builtin_prefetch(static_cast<const scalar_t*>(p.value) + b * p.v_batch_stride + t * p.v_seq_stride +
                         (c_begin + c) * p.v_chan_stride);
  }
  bool has_key_lr() const { return p.key_lr.rank > 0; }
  bool has_value_lr() const { return p.value_lr.rank > 0; }

  // Step t's key / value at channel c: from the block buffer when perturbed (row i of
  // the block), else straight from the input.
  template <typename F>
  F key(const acc_t* ek, int64_t i, int64_t t, int64_t c) const {
    if (has_key_lr()) return load_lanes<F, acc_t>(ek + i * len + c, 1);
    return load_lanes<F, acc_t>(static_cast<const scalar_t*>(p.key) + b * p.k_batch_stride + t * p.k_seq_stride +
                                    (c_begin + c) * p.k_chan_stride, p.k_chan_stride);
  }
  template <typename F>
  F value(const acc_t* ev, int64_t i, int64_t t, int64_t c) const {
    if (has_value_lr()) return load_lanes<F, acc_t>(ev + i * len + c, 1);
    return load_lanes<F, acc_t>(static_cast<const scalar_t*>(p.value) + b * p.v_batch_stride + t * p.v_seq_stride +
                                    (c_begin + c) * p.v_chan_stride, p.v_chan_stride);
  }

  // Pointer to channel c of this task in row `row` of a contiguous [B, rows, C] buffer.
  template <typename T>
  T* row_ptr(T* buf, int64_t rows, int64_t row, int64_t c) const {
    return buf + (b * rows + row) * p.channels + c_begin + c;
  }
};

// The range's state as three arrays [len] (a, b, p), loaded and stored per step.
template <typename acc_t>
struct StateRows {
  std::vector<acc_t> a, b, p;
  explicit StateRows(int64_t len) : a(len), b(len), p(len) {}
  template <typename F>
  State<F> load(int64_t c) const {
    return {load_lanes<F, acc_t>(a.data() + c, 1), load_lanes<F, acc_t>(b.data() + c, 1),
            load_lanes<F, acc_t>(p.data() + c, 1)};
  }
  template <typename F>
  void store(int64_t c, const State<F>& s) {
    store_lanes<F, acc_t>(a.data() + c, 1, s.a);
    store_lanes<F, acc_t>(b.data() + c, 1, s.b);
    store_lanes<F, acc_t>(p.data() + c, 1, s.p);
  }
};

template <typename scalar_t>
void init_state(const Task<scalar_t>& task, StateRows<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& p = task.p;
  if (p.state_in == nullptr) {
    std::fill(s.a.begin(), s.a.end(), acc_t(0));
    std::fill(s.b.begin(), s.b.end(), acc_t(0));
    std::fill(s.p.begin(), s.p.end(), acc_t(kEmptyMax));
    return;
  }
  const auto* in = static_cast<const acc_t*>(p.state_in);
  std::copy_n(task.row_ptr(in, 3, 0, 0), task.len, s.a.begin());
  std::copy_n(task.row_ptr(in, 3, 1, 0), task.len, s.b.begin());
  std::copy_n(task.row_ptr(in, 3, 2, 0), task.len, s.p.begin());
}

template <typename scalar_t>
void store_rows(const Task<scalar_t>& task, void* buf, const std::vector<at::opmath_type<scalar_t>>& a,
                const std::vector<at::opmath_type<scalar_t>>& b, const std::vector<at::opmath_type<scalar_t>>& c) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* out = static_cast<acc_t*>(buf);
  std::copy_n(a.begin(), task.len, task.row_ptr(out, 3, 0, 0));
  std::copy_n(b.begin(), task.len, task.row_ptr(out, 3, 1, 0));
  std::copy_n(c.begin(), task.len, task.row_ptr(out, 3, 2, 0));
}

// Steps whose effective keys and values are formed together (Task::effective_rows):
// 2 x 16 x len floats of buffer (L1/L2), and far enough ahead for the prefetches.
constexpr int64_t kBlock = 16;

template <typename scalar_t>
void forward_task(const Task<scalar_t>& task) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& p = task.p;
  const auto* w = static_cast<const acc_t*>(p.w) + task.c_begin;
  const auto* u = static_cast<const acc_t*>(p.u) + task.c_begin;
  StateRows<acc_t> s(task.len);
  init_state(task, s);
  std::vector<acc_t> ek(task.has_key_lr() ? kBlock * task.len : 0), ev(task.has_value_lr() ? kBlock * task.len : 0),
      zb;
  for (int64_t t0 = 0; t0 < p.seqlen; t0 += kBlock) {
    const int64_t steps = std::min(kBlock, p.seqlen - t0);
    task.effective_block(t0, steps, zb, ek.data(), ev.data());
    for (int64_t i = 0; i < steps; ++i) {
      const int64_t t = t0 + i;
      auto* out = task.row_ptr(static_cast<scalar_t*>(p.out), p.seqlen, t, 0);
      const int64_t ahead = t + kBlock < p.seqlen ? t + kBlock : -1;
      task.for_channels([&]<typename F>(int64_t c) {
        using Ops = OpsFor<F, acc_t>;
        if (ahead >= 0) task.prefetch_inputs(ahead, c);
        State<F> st = s.template load<F>(c);
        const F y = forward_step<Ops>(load_lanes<F, acc_t>(w + c, 1), load_lanes<F, acc_t>(u + c, 1),
                                      task.template key<F>(ek.data(), i, t, c),
                                      task.template value<F>(ev.data(), i, t, c), st);
        s.template store<F>(c, st);
        store_lanes<F, acc_t>(out + c, 1, y);
      });
    }
  }
  store_rows(task, p.state_out, s.a, s.b, s.p);
}

// Backward of one task: pass 1 keeps the state every kSegment steps; pass 2 replays the
// segments last to first, keeping each one's kSegment states (and effective keys and
// values), then steps the gradients back through it.
template <typename scalar_t>
void backward_task(const Task<scalar_t>& task) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto& p = task.p;
  const int64_t T = p.seqlen, len = task.len, n_seg = (T + kSegment - 1) / kSegment;
  const auto* w = static_cast<const acc_t*>(p.w) + task.c_begin;
  const auto* u = static_cast<const acc_t*>(p.u) + task.c_begin;
  StateRows<acc_t> s(len);
  init_state(task, s);
  std::vector<acc_t> checkpoints(n_seg * 3 * len);  // [segment][a|b|p][len]
  auto save = [&](std::vector<acc_t>& dst, int64_t i) {
    std::copy(s.a.begin(), s.a.end(), dst.begin() + (i * 3 + 0) * len);
    std::copy(s.b.begin(), s.b.end(), dst.begin() + (i * 3 + 1) * len);
    std::copy(s.p.begin(), s.p.end(), dst.begin() + (i * 3 + 2) * len);
  };
  // The effective keys and values of one segment (kSegment rows each, formed ahead by
  // Task::effective_block); the replay keeps them for the gradient steps.
  std::vector<acc_t> seg_keys(kSegment * len), seg_values(kSegment * len), zb;
  // Step t = t0 + i of the segment: advances the state; with `keep`, stores the step's
  // effective key and value (the raw ones when unperturbed) into row i.
  auto advance = [&](int64_t i, int64_t t, bool keep) {
    task.for_channels([&]<typename F>(int64_t c) {
      using Ops = OpsFor<F, acc_t>;
      State<F> st = s.template load<F>(c);
      const F k = task.template key<F>(seg_keys.data(), i, t, c), v = task.template value<F>(seg_values.data(), i, t, c);
      forward_step<Ops>(load_lanes<F, acc_t>(w + c, 1), load_lanes<F, acc_t>(u + c, 1), k, v, st);
      s.template store<F>(c, st);
      if (keep) {
        store_lanes<F, acc_t>(seg_keys.data() + i * len + c, 1, k);
        store_lanes<F, acc_t>(seg_values.data() + i * len + c, 1, v);
      }
    });
  };
  for (int64_t seg = 0; seg < n_seg; ++seg) {
    const int64_t t0 = seg * kSegment, steps = std::min(kSegment, T - t0);
    save(checkpoints, seg);
    task.effective_block(t0, steps, zb, seg_keys.data(), seg_values.data());
    for (int64_t i = 0; i < steps; ++i) advance(i, t0 + i, false);
  }

  StateRows<acc_t> g(len);  // dL/d(state), carried backwards
  const auto* gso = static_cast<const acc_t*>(p.grad_state_out);
  std::copy_n(task.row_ptr(gso, 3, 0, 0), len, g.a.begin());
  std::copy_n(task.row_ptr(gso, 3, 1, 0), len, g.b.begin());
  std::copy_n(task.row_ptr(gso, 3, 2, 0), len, g.p.begin());
  std::vector<acc_t> gw(len, acc_t(0)), gu(len, acc_t(0));
  std::vector<acc_t> seg_states(kSegment * 3 * len);
  for (int64_t seg = n_seg - 1; seg >= 0; --seg) {
    const int64_t t0 = seg * kSegment, steps = std::min(kSegment, T - t0);
    std::copy_n(checkpoints.begin() + (seg * 3 + 0) * len, len, s.a.begin());
    std::copy_n(checkpoints.begin() + (seg * 3 + 1) * len, len, s.b.begin());
    std::copy_n(checkpoints.begin() + (seg * 3 + 2) * len, len, s.p.begin());
    task.effective_block(t0, steps, zb, seg_keys.data(), seg_values.data());
    for (int64_t j = 0; j < steps; ++j) {
      save(seg_states, j);
      advance(j, t0 + j, true);
    }
    for (int64_t j = steps - 1; j >= 0; --j) {
      const int64_t t = t0 + j;
      const acc_t* sa = seg_states.data() + (j * 3 + 0) * len;
      const acc_t* sb = seg_states.data() + (j * 3 + 1) * len;
      const acc_t* sp = seg_states.data() + (j * 3 + 2) * len;
      const acc_t* keys = seg_keys.data() + j * len;
      const acc_t* values = seg_values.data() + j * len;
      const auto* go = static_cast<const scalar_t*>(p.grad_out) + task.b * p.go_batch_stride + t * p.go_seq_stride +
                       task.c_begin * p.go_chan_stride;
      auto* gk_out = task.row_ptr(static_cast<scalar_t*>(p.grad_key), T, t, 0);
      auto* gv_out = task.row_ptr(static_cast<scalar_t*>(p.grad_value), T, t, 0);
      task.for_channels([&]<typename F>(int64_t c) {
        using Ops = OpsFor<F, acc_t>;
        const State<F> st{load_lanes<F, acc_t>(sa + c, 1), load_lanes<F, acc_t>(sb + c, 1),
                          load_lanes<F, acc_t>(sp + c, 1)};
        const State<F> gs = g.template load<F>(c);
        StateGrad<F> gr{gs.a, gs.b, gs.p};
        F gwc = load_lanes<F, acc_t>(gw.data() + c, 1), guc = load_lanes<F, acc_t>(gu.data() + c, 1), gk, gv;
        backward_step<Ops>(load_lanes<F, acc_t>(w + c, 1), load_lanes<F, acc_t>(u + c, 1),
                           load_lanes<F, acc_t>(keys + c, 1), load_lanes<F, acc_t>(values + c, 1), st,
                           load_lanes<F, acc_t>(go + c * p.go_chan_stride, p.go_chan_stride), gr, gk, gv, gwc, guc);
        g.template store<F>(c, State<F>{gr.a, gr.b, gr.p});
        store_lanes<F, acc_t>(gw.data() + c, 1, gwc);
        store_lanes<F, acc_t>(gu.data() + c, 1, guc);
        store_lanes<F, acc_t>(gk_out + c, 1, gk);
        store_lanes<F, acc_t>(gv_out + c, 1, gv);
      });
    }
  }
  std::copy_n(gw.begin(), len, static_cast<acc_t*>(p.grad_w) + task.b * p.channels + task.c_begin);
  std::copy_n(gu.begin(), len, static_cast<acc_t*>(p.grad_u) + task.b * p.channels + task.c_begin);
  if (p.grad_state_in != nullptr) store_rows(task, p.grad_state_in, g.a, g.b, g.p);
}

// Splits (sample, channel range) tasks over the threads: whole samples when the batch
// alone keeps every thread busy, else each sample's channels in vector-aligned ranges.
template <typename scalar_t, typename Fn>
void for_each_task(const Wkv4Params& p, Fn&& fn) {
  using Vec = at::vec::Vectorized<at::opmath_type<scalar_t>>;
  const int64_t W = Vec::size(), C = p.channels;
  const int64_t threads = at::get_num_threads();
  const int64_t max_ranges = std::max<int64_t>(1, C / (4 * W));
  const int64_t ranges = std::clamp<int64_t>((2 * threads + p.batch - 1) / std::max<int64_t>(1, p.batch), 1, max_ranges);
  const int64_t range_len = ((C + ranges - 1) / ranges + W - 1) / W * W;
  const int64_t per_sample = (C + range_len - 1) / range_len;
  // Tasks per thread: at least 2^15 channel-steps (T * range_len) of work, so that a
  // small call (a decode step, a short prompt) runs inline: waking the thread pool
  // costs more than such work, and milliseconds when other processes hold the cores.
  // The split into ranges above does not depend on this, so neither do the results.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, p.seqlen * range_len));
  at::parallel_for(0, p.batch * per_sample, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / per_sample, c0 = (i % per_sample) * range_len;
      fn(Task<scalar_t>(p, b, c0, std::min(C, c0 + range_len)));
    }
  });
}

void forward_cpu(const Wkv4Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "wkv4_forward_cpu",
                                  [&] { for_each_task<scalar_t>(p, [](const Task<scalar_t>& t) { forward_task(t); }); });
}

void backward_cpu(const Wkv4Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "wkv4_backward_cpu",
                                  [&] { for_each_task<scalar_t>(p, [](const Task<scalar_t>& t) { backward_task(t); }); });
}

constexpr Backend kCpu{&forward_cpu, &backward_cpu};

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CPU, m) {
  m.impl("wkv4", &forward_op<kCpu>);
  m.impl("wkv4_backward", &backward_op<kCpu>);
}

}  // namespace prosg::wkv4
