// CPU kernels of wkv7 and their registration. A task is one (sample, head): its N x N
// state lives in a task-local buffer (N^2 floats, 16 KiB at N = 64: L1/L2-resident),
// stepped through the shared header wkv7_math.h that the CUDA kernels use too. The
// forward and the backward's checkpoint pass run key-major (S^T, lanes over value rows
// i: forward_keys); the backward's segment replay and gradient steps run row-major (S,
// lanes over keys j: forward_rows_to, backward_rows, backward_column_given), from
// checkpoints transposed once each. Tasks are split over threads with
// at::parallel_for; nothing is reduced across tasks, so results do not depend on the
// thread count.
//
// Arithmetic and state are float32 for float32/float16/bfloat16 inputs (each step's
// inputs are converted once) and float64 for float64 inputs.
//
// The backward recomputes instead of storing: pass 1 runs the forward again and keeps
// the state every kSegment steps (O(T / kSegment) states of N^2 per task), pass 2 replays
// the segments last to first, keeping each one's kSegment + 1 states, and steps the
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
#include "wkv7/cpu/wkv7_cpu_ops.h"
#include "wkv7/wkv7.h"
#include "wkv7/wkv7_math.h"

namespace prosg::wkv7 {
namespace {

// Checkpoint spacing of the backward. With K = 16 the checkpoints take 1/16 of what
// storing every state would (T/16 states of N^2 per task), and the segment being
// replayed 16 states (256 KiB at N = 64, float32: within L2), while the replay costs
// one extra forward pass whatever K is.
constexpr int64_t kSegment = 16;

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
    const acc_t* src = view(x, t, tmp);
    for (int q = 0; q < R; ++q) dst[q] = Vec::loadu(src + q * W);
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

  static void save_state(acc_t* dst, const Vec* S) {
    for (int q = 0; q < N * R; ++q) S[q].store(dst + q * W);
  }

  // Rows stepped together (forward_rows): 4 independent chains hide the FMA latency
  // and share each load of the step's inputs; every head size is a multiple of 4.
  static constexpr int kRows = 4;
  // Rows of a block of the backward's two phases (a multiple of kRows dividing N).
  static constexpr int kColumnRows = N < 16 ? N : 16;

  // One row-major forward step of the whole head from S into S_next (the backward's
  // replay, which keeps every state); y receives the N outputs.
  static void step_to(const Vec* S, Vec* S_next, const Step& s, acc_t* y) {
    for (int i = 0; i < N; i += kRows)
      forward_rows_to<Ops, R, kRows>(S + i * R, S_next + i * R, s.r, s.d, s.k, s.a, s.b, s.v + i, y + i);
  }

  // The forward runs key-major (wkv7_math.h's forward_keys): S is transposed on entry
  // and on exit and every step is one pass over it, lanes over value rows, kBlock
  // register groups of rows a pass, with no sums across lanes (the row-major step
  // above, the backward's, needs a reduction across lanes for every sa_i and y_i).
  // One form for every length, so a sequence run in pieces gives the state of one
  // call bit for bit. Measurements in benchmarks/RESULTS.md.
  static constexpr int kBlock = R >= 2 ? 2 : 1;

  // S (row-major, contiguous) transposed into dst, 8 x 8 blocks at a time
  // (at::vec's register transpose where the ISA has one).
  static void transpose(const acc_t* src, acc_t* dst) {
    static_assert(N % 8 == 0);
    for (int i = 0; i < N; i += 8)
      for (int j = 0; j < N; j += 8) at::vec::transpose_mxn<acc_t, 8, 8>(src + i * N + j, N, dst + j * N + i, N);
  }
  void init_state_keys(Vec* st) const {
    if (p.state_in == nullptr) {
      for (int q = 0; q < N * R; ++q) st[q] = Vec(acc_t(0));
      return;
    }
    alignas(64) acc_t tmp[N * N];
    transpose(static_cast<const acc_t*>(p.state_in) + state_offset(), tmp);
    for (int q = 0; q < N * R; ++q) st[q] = Vec::loadu(tmp + q * W);
  }
  static void save_state_keys(acc_t* dst, const Vec* st) {
    alignas(64) acc_t tmp[N * N];
    for (int q = 0; q < N * R; ++q) st[q].store(tmp + q * W);
    transpose(tmp, dst);
  }

  // N values of input x at step t as contiguous acc_t: the input itself when it is
  // already that (no copy: a copy written in halves and read back whole stalls store
  // forwarding), else converted into buf.
  const acc_t* view(const Wkv7Input& x, int64_t t, acc_t* buf) const {
    const auto* src = static_cast<const scalar_t*>(x.ptr) + b * x.sb + t * x.st + h * x.sh;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (x.sn == 1) return src;
    }
    cpu::gather(buf, src, x.sn, N);
    return buf;
  }

  // A step's inputs by key for the key-major form: r, k, b, a' (a of the next step, 0
  // after the last) as scalars, in place or converted; d = exp(-exp(w)) as scalars;
  // v as register groups.
  struct KeyStep {
    alignas(64) acc_t r_buf[N], k_buf[N], b_buf[N], a_buf[N], d[N], tmp[N], zeros[N] = {};
    const acc_t *r, *k, *b, *a_next;
    Vec v[R];
  };
  void load_key_step(KeyStep& s, int64_t t) const {
    s.r = view(p.r, t, s.r_buf);
    s.k = view(p.k, t, s.k_buf);
    s.b = view(p.b, t, s.b_buf);
    // The last step's pass sums with a' = 0: one wasted multiply-add an entry.
    s.a_next = t + 1 < p.seqlen ? view(p.a, t + 1, s.a_buf) : s.zeros;
    const acc_t* w = view(p.w, t, s.tmp);
    for (int q = 0; q < R; ++q) decay<Ops>(Vec::loadu(w + q * W)).store(s.d + q * W);
    const acc_t* v = view(p.v, t, s.tmp);
    for (int q = 0; q < R; ++q) s.v[q] = Vec::loadu(v + q * W);
  }

  // The key-major scan's state: S^T and the sa_i of the next step.
  struct KeyScan {
    std::vector<Vec> st = std::vector<Vec>(N * R);
    Vec sa[R];
  };
  void start_keys(KeyScan& ks) const {
    init_state_keys(ks.st.data());
    alignas(64) acc_t a_buf[N];
    const acc_t* a = view(p.a, 0, a_buf);
    for (int q = 0; q < R; q += kBlock) key_sums<Ops, kBlock>(ks.st.data() + q, N, R, a, ks.sa + q);
  }
  // Step t of the scan; y receives the outputs as R register groups.
  void step_keys(KeyScan& ks, KeyStep& s, int64_t t, Vec* y) const {
    load_key_step(s, t);
    Vec sa_next[R];
    for (int q = 0; q < R; q += kBlock)
      forward_keys<Ops, kBlock>(ks.st.data() + q, N, R, s.r, s.d, s.k, s.b, s.a_next, s.v + q, ks.sa + q, y + q,
                                sa_next + q);
    std::copy_n(sa_next, R, ks.sa);
  }

  void forward() const {
    KeyScan ks;
    start_keys(ks);
    KeyStep s;
    Vec y[R];
    auto* out = static_cast<scalar_t*>(p.out);
    for (int64_t t = 0; t < p.seqlen; ++t) {
      step_keys(ks, s, t, y);
      scalar_t* dst = out + row(t);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        for (int q = 0; q < R; ++q) y[q].store(dst + q * W);
      } else {
        store(dst, y);
      }
    }
    save_state_keys(static_cast<acc_t*>(p.state_out) + state_offset(), ks.st.data());
  }

  // S^T as register groups (the key-major scan's) to S as register groups (the backward's).
  static void keys_to_rows(const Vec* st, Vec* S) {
    alignas(64) acc_t tmp[N * N], rows[N * N];
    for (int q = 0; q < N * R; ++q) st[q].store(tmp + q * W);
    transpose(tmp, rows);
    for (int q = 0; q < N * R; ++q) S[q] = Vec::loadu(rows + q * W);
  }

  void backward() const {
    const int64_t T = p.seqlen, n_seg = (T + kSegment - 1) / kSegment, words = N * R;
    // Pass 1, the checkpoints: the forward's key-major scan up to the last segment's start.
    std::vector<Vec> checkpoints(n_seg * words);
    {
      KeyScan ks;
      start_keys(ks);
      KeyStep ks_step;
      Vec y_unused[R];
      for (int64_t t = 0;; ++t) {
        if (t % kSegment == 0) keys_to_rows(ks.st.data(), checkpoints.data() + (t / kSegment) * words);
        if (t == (n_seg - 1) * kSegment) break;
        step_keys(ks, ks_step, t, y_unused);
      }
    }
    alignas(64) acc_t y[N];  // not needed: the forward's outputs are not recomputed

    // seg_states: the replay's state before each step of the segment, then after its last.
    std::vector<Vec> g(words), seg_states((kSegment + 1) * words);  // g: dL/dS, carried backwards
    std::vector<Step> seg_steps(kSegment);  // the replay's inputs, read again by the gradient steps
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
      std::copy_n(checkpoints.begin() + seg * words, words, seg_states.begin());
      for (int64_t j = 0; j < steps; ++j) {
        load_step(seg_steps[j], t0 + j);
        step_to(seg_states.data() + j * words, seg_states.data() + (j + 1) * words, seg_steps[j], y);
      }
      for (int64_t j = steps - 1; j >= 0; --j) {
        const int64_t t = t0 + j;
        const Step& s = seg_steps[j];
        gather(gy, p.grad_out, t);
        const Vec* prev = seg_states.data() + j * words;
        const Vec* next = seg_states.data() + (j + 1) * words;  // the state after step t
        ColumnGrad<Vec> acc[R];
        for (int q = 0; q < R; ++q) acc[q] = {Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0)), Vec(acc_t(0))};
        // Row i's column contributions need only row i's scalars, so both phases run
        // per block of kColumnRows rows: the block's rows stay in L1 between the
        // phases, and the column sums load and store their accumulators once per
        // block, not once per row.
        for (int i0 = 0; i0 < N; i0 += kColumnRows) {
          RowGrad<acc_t> rg[kColumnRows];
          for (int m = 0; m < kColumnRows; m += kRows)
            backward_rows<Ops, R, kRows>(prev + (i0 + m) * R, g.data() + (i0 + m) * R, s.r, s.k, s.a, s.b,
                                         gy + i0 + m, rg + m);
          for (int m = 0; m < kColumnRows; ++m) dv[i0 + m] = rg[m].dv;
          for (int q = 0; q < R; ++q) {
            ColumnGrad<Vec> c = acc[q];
            const Vec dq = s.d[q], aq = s.a[q];
            for (int m = 0; m < kColumnRows; ++m) {
              const int i = i0 + m;
              Vec& G = g[i * R + q];
              G = backward_column_given<Ops>(prev[i * R + q], next[i * R + q], G, gy[i], s.v[i], rg[m], dq, aq, c);
            }
            acc[q] = c;
          }
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

const Backend& cpu_backend() { return kCpu; }

TORCH_LIBRARY_IMPL(prosg, CPU, m) {
  m.impl("wkv7", &forward_op<kCpu>);
  m.impl("wkv7_backward", &backward_op<kCpu>);
}

}  // namespace prosg::wkv7
