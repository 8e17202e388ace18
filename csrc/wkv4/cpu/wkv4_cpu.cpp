// CPU kernels of wkv4 and their registration. Work is split with at::parallel_for
// over (sample, block of channels); a block is one at::vec::Vectorized register of
// channels (8 floats with AVX2), and the channels left over at the end of C run the
// same arithmetic one at a time. Both use the shared header wkv4_math.h, so the
// scalar and vector paths and the CUDA kernels compute the same expressions.
//
// The backward recomputes instead of storing: a forward pass keeps the state every
// kSegment steps (O(T / kSegment) states per block), then segments are replayed in
// reverse, each recomputing its kSegment states before stepping the gradients back.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "wkv4/wkv4.h"
#include "wkv4/wkv4_math.h"

namespace prosg::wkv4 {
namespace {

constexpr int64_t kSegment = 32;

template <typename T>
struct VecOps {
  using V = at::vec::Vectorized<T>;
  static V exp_neg_abs(const V& d) { return d.abs().neg().exp(); }
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

// One block of channels [c0, c0 + lanes) of one sample: the inputs of every step,
// with the low-rank terms folded into the effective key and value.
template <typename scalar_t, typename F>
struct BlockInputs {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int64_t n = Lanes<F>::n;
  const Wkv4Params& p;
  int64_t b, c0;
  std::vector<acc_t> key_u, value_u;  // [rank][lanes], packed once per block

  BlockInputs(const Wkv4Params& params, int64_t b_, int64_t c0_) : p(params), b(b_), c0(c0_) {
    pack(p.key_lr, key_u);
    pack(p.value_lr, value_u);
  }

  void pack(const Wkv4LowRank& lr, std::vector<acc_t>& dst) const {
    dst.resize(lr.rank * n);
    const auto* U = static_cast<const scalar_t*>(lr.U);
    for (int64_t j = 0; j < lr.rank; ++j)
      for (int64_t l = 0; l < n; ++l)
        dst[j * n + l] = static_cast<acc_t>(U[b * lr.u_batch_stride + (c0 + l) * lr.u_chan_stride + j * lr.u_rank_stride]);
  }

  F with_lowrank(F x, const Wkv4LowRank& lr, const std::vector<acc_t>& packed, int64_t t) const {
    const auto* z = static_cast<const scalar_t*>(lr.z) + b * lr.z_batch_stride + t * lr.z_seq_stride;
    for (int64_t j = 0; j < lr.rank; ++j) {
      const F zj(static_cast<acc_t>(z[j * lr.z_rank_stride]));
      x = x + zj * load_lanes<F, acc_t>(packed.data() + j * n, 1);
    }
    return x;
  }

  F key(int64_t t) const {
    const auto* k = static_cast<const scalar_t*>(p.key) + b * p.k_batch_stride + t * p.k_seq_stride +
                    c0 * p.k_chan_stride;
    return with_lowrank(load_lanes<F, acc_t>(k, p.k_chan_stride), p.key_lr, key_u, t);
  }

  F value(int64_t t) const {
    const auto* v = static_cast<const scalar_t*>(p.value) + b * p.v_batch_stride + t * p.v_seq_stride +
                    c0 * p.v_chan_stride;
    return with_lowrank(load_lanes<F, acc_t>(v, p.v_chan_stride), p.value_lr, value_u, t);
  }

  F param(const void* ptr) const { return load_lanes<F, acc_t>(static_cast<const acc_t*>(ptr) + c0, 1); }

  // Element (i, c0) of a contiguous [B, 3, C] buffer in acc_t.
  acc_t* state_ptr(void* buf, int64_t i) const {
    return static_cast<acc_t*>(buf) + (b * 3 + i) * p.channels + c0;
  }
  const acc_t* state_ptr(const void* buf, int64_t i) const {
    return static_cast<const acc_t*>(buf) + (b * 3 + i) * p.channels + c0;
  }

  State<F> initial_state() const {
    if (p.state_in == nullptr) return State<F>{F(acc_t(0)), F(acc_t(0)), F(acc_t(kEmptyMax))};
    return State<F>{load_lanes<F, acc_t>(state_ptr(p.state_in, 0), 1), load_lanes<F, acc_t>(state_ptr(p.state_in, 1), 1),
                    load_lanes<F, acc_t>(state_ptr(p.state_in, 2), 1)};
  }
};

template <typename F, typename acc_t>
using OpsFor = std::conditional_t<Lanes<F>::n == 1, ScalarOps, VecOps<acc_t>>;

template <typename scalar_t, typename F>
void forward_block(const Wkv4Params& p, int64_t b, int64_t c0) {
  using acc_t = at::opmath_type<scalar_t>;
  using Ops = OpsFor<F, acc_t>;
  const BlockInputs<scalar_t, F> in(p, b, c0);
  const F w = in.param(p.w), u = in.param(p.u);
  State<F> s = in.initial_state();
  auto* out = static_cast<scalar_t*>(p.out) + b * p.seqlen * p.channels + c0;
  for (int64_t t = 0; t < p.seqlen; ++t) {
    const F y = forward_step<Ops>(w, u, in.key(t), in.value(t), s);
    store_lanes<F, acc_t>(out + t * p.channels, 1, y);
  }
  store_lanes<F, acc_t>(in.state_ptr(p.state_out, 0), 1, s.a);
  store_lanes<F, acc_t>(in.state_ptr(p.state_out, 1), 1, s.b);
  store_lanes<F, acc_t>(in.state_ptr(p.state_out, 2), 1, s.p);
}

template <typename scalar_t, typename F>
void backward_block(const Wkv4Params& p, int64_t b, int64_t c0) {
  using acc_t = at::opmath_type<scalar_t>;
  using Ops = OpsFor<F, acc_t>;
  const BlockInputs<scalar_t, F> in(p, b, c0);
  const F w = in.param(p.w), u = in.param(p.u);
  const int64_t T = p.seqlen, n_seg = (T + kSegment - 1) / kSegment;

  // Pass 1: the state at the start of every segment.
  std::vector<State<F>> checkpoints(n_seg);
  State<F> s = in.initial_state();
  for (int64_t t = 0; t < T; ++t) {
    if (t % kSegment == 0) checkpoints[t / kSegment] = s;
    forward_step<Ops>(w, u, in.key(t), in.value(t), s);
  }

  // Pass 2: segments in reverse; replay each, then step the gradients back through it.
  StateGrad<F> g{load_lanes<F, acc_t>(in.state_ptr(p.grad_state_out, 0), 1),
                 load_lanes<F, acc_t>(in.state_ptr(p.grad_state_out, 1), 1),
                 load_lanes<F, acc_t>(in.state_ptr(p.grad_state_out, 2), 1)};
  F gw(acc_t(0)), gu(acc_t(0));
  State<F> states[kSegment];
  F keys[kSegment], values[kSegment];
  const auto* grad_out = static_cast<const scalar_t*>(p.grad_out) + b * p.go_batch_stride + c0 * p.go_chan_stride;
  auto* grad_key = static_cast<scalar_t*>(p.grad_key) + b * T * p.channels + c0;
  auto* grad_value = static_cast<scalar_t*>(p.grad_value) + b * T * p.channels + c0;
  for (int64_t seg = n_seg - 1; seg >= 0; --seg) {
    const int64_t t0 = seg * kSegment, len = std::min(kSegment, T - t0);
    s = checkpoints[seg];
    for (int64_t i = 0; i < len; ++i) {
      states[i] = s;
      keys[i] = in.key(t0 + i);
      values[i] = in.value(t0 + i);
      forward_step<Ops>(w, u, keys[i], values[i], s);
    }
    for (int64_t i = len - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      const F gy = load_lanes<F, acc_t>(grad_out + t * p.go_seq_stride, p.go_chan_stride);
      F gk, gv;
      backward_step<Ops>(w, u, keys[i], values[i], states[i], gy, g, gk, gv, gw, gu);
      store_lanes<F, acc_t>(grad_key + t * p.channels, 1, gk);
      store_lanes<F, acc_t>(grad_value + t * p.channels, 1, gv);
    }
  }
  store_lanes<F, acc_t>(static_cast<acc_t*>(p.grad_w) + b * p.channels + c0, 1, gw);
  store_lanes<F, acc_t>(static_cast<acc_t*>(p.grad_u) + b * p.channels + c0, 1, gu);
  if (p.grad_state_in != nullptr) {
    store_lanes<F, acc_t>(in.state_ptr(p.grad_state_in, 0), 1, g.a);
    store_lanes<F, acc_t>(in.state_ptr(p.grad_state_in, 1), 1, g.b);
    store_lanes<F, acc_t>(in.state_ptr(p.grad_state_in, 2), 1, g.p);
  }
}

at::ScalarType scalar_type_of(DType d) {
  switch (d) {
    case DType::kFloat32: return at::kFloat;
    case DType::kFloat16: return at::kHalf;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kFloat64: return at::kDouble;
  }
  return at::kFloat;
}

// Runs block(b, c0) over every sample and channel block: full vector blocks first,
// then the leftover channels of C one at a time.
template <typename scalar_t, template <typename, typename> class Kernel>
void for_each_block(const Wkv4Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t W = Vec::size(), C = p.channels;
  const int64_t n_full = C / W, n_tail = C - n_full * W, per_sample = n_full + n_tail;
  // Each task walks all T steps: one task per grain unless T is tiny (decoding).
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, p.seqlen * W));
  at::parallel_for(0, p.batch * per_sample, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / per_sample, i = task % per_sample;
      if (i < n_full) Kernel<scalar_t, Vec>::run(p, b, i * W);
      else Kernel<scalar_t, acc_t>::run(p, b, n_full * W + (i - n_full));
    }
  });
}

template <typename scalar_t, typename F>
struct ForwardKernel {
  static void run(const Wkv4Params& p, int64_t b, int64_t c0) { forward_block<scalar_t, F>(p, b, c0); }
};
template <typename scalar_t, typename F>
struct BackwardKernel {
  static void run(const Wkv4Params& p, int64_t b, int64_t c0) { backward_block<scalar_t, F>(p, b, c0); }
};

void forward_cpu(const Wkv4Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scalar_type_of(p.dtype), "wkv4_forward_cpu",
                                  [&] { for_each_block<scalar_t, ForwardKernel>(p); });
}

void backward_cpu(const Wkv4Params& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scalar_type_of(p.dtype), "wkv4_backward_cpu",
                                  [&] { for_each_block<scalar_t, BackwardKernel>(p); });
}

constexpr Backend kCpu{&forward_cpu, &backward_cpu};

std::tuple<at::Tensor, at::Tensor> wkv4_cpu(const at::Tensor& time_decay, const at::Tensor& time_first,
                                            const at::Tensor& key, const at::Tensor& value, const Opt& state,
                                            const Opt& key_z, const Opt& key_u, const Opt& value_z,
                                            const Opt& value_u) {
  return forward(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, kCpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_backward_cpu(
    const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& key, const at::Tensor& value,
    const Opt& state, const Opt& key_z, const Opt& key_u, const Opt& value_z, const Opt& value_u,
    const at::Tensor& grad_out, const at::Tensor& grad_state_out) {
  return backward(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, grad_out,
                  grad_state_out, kCpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CPU, m) {
  m.impl("wkv4", &wkv4_cpu);
  m.impl("wkv4_backward", &wkv4_backward_cpu);
}

}  // namespace prosg::wkv4
