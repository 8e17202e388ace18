// The CUDA wkv7 launchers (csrc/wkv7/cuda/wkv7_kernels.cu), executed on the CPU
// (cuda_emu.h) against float64 references, as test_cuda_kernels.cpp does for the
// other ops: float32, float16 and bfloat16; contiguous, padded, transposed (time
// innermost) and expanded (batch stride 0) inputs; every supported head size; odd
// batch, head and length counts around the backward's 16-step segments; both fiber
// schedules (a missing barrier reads another thread's unwritten data); NaN-filled
// outputs and workspaces (an element left unwritten fails); empty work.
//
// The references: the forward is the recurrence written out in float64 (the matrix
// form, row by row); the backward is wkv7_math.h's backward_row/backward_column in
// float64 (checked against finite differences in test_wkv7_math.cpp) over all T stored
// states, with none of the kernel's segmenting or thread mapping.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/cuda_types.cuh"
#include "tests/harness.h"
#include "emu_test.h"
#include "wkv7/cuda/wkv7_launch.h"
#include "wkv7/wkv7_math.h"

std::mt19937_64& prosg::emu_test::rng() {
  static std::mt19937_64 g(4321);
  return g;
}

namespace {

using prosg::DType;
using prosg::cuda::from_float;
using prosg::cuda::to_float;
namespace wk = prosg::wkv7;

using namespace prosg::emu_test;

// A [B, T, H, N] input of element type E in one of the layouts, over storage of exactly
// the size the layout needs (so ASan sees a read past it). Values are set in float64
// through set() and rounded to E; at() reads the rounded value.
template <typename E>
struct Input4 {
  int64_t B, T, H, N;
  int64_t sb = 0, st = 0, sh = 0, sn = 0;
  std::vector<E> storage;

  Input4(int64_t b, int64_t t, int64_t h, int64_t n, Layout layout) : B(b), T(t), H(h), N(n) {
    int64_t size = 0;
    switch (layout) {
      case Layout::kContiguous: sn = 1, sh = n, st = h * n, sb = t * h * n, size = b * t * h * n; break;
      case Layout::kPadded: sn = 1, sh = n + 3, st = h * (n + 3), sb = t * h * (n + 3), size = b * sb; break;
      case Layout::kTransposed: st = 1, sn = t, sh = n * t, sb = h * n * t, size = b * sb; break;  // [B, H, N, T]
      case Layout::kExpanded: sb = 0, sn = 1, sh = n, st = h * n, size = t * h * n; break;          // one sample
    }
    storage.assign(static_cast<size_t>(std::max<int64_t>(size, 1)), from_float<E>(0.f));
  }
  int64_t index(int64_t b, int64_t t, int64_t h, int64_t n) const { return b * sb + t * st + h * sh + n * sn; }
  void set(int64_t b, int64_t t, int64_t h, int64_t n, double x) {
    storage[index(b, t, h, n)] = from_float<E>(static_cast<float>(x));
  }
  double at(int64_t b, int64_t t, int64_t h, int64_t n) const { return to_float(storage[index(b, t, h, n)]); }
  prosg::Wkv7Input param() const { return {storage.data(), sb, st, sh, sn}; }
};

struct Case {
  int64_t B, T, H, N;
  bool state = false;
  Layout layout = Layout::kContiguous;
  DType dtype = DType::kFloat32;
  bool backward = true;

  std::string name() const {
    std::ostringstream o;
    o << "wkv7 B" << B << "-T" << T << "-H" << H << "-N" << N << (state ? "-state" : "") << "-" << layout_name(layout)
      << "-" << dtype_name(dtype);
    return o.str();
  }
};

// The problem in float64 after rounding: [B][T][H][N] inputs, [B][H][N][N] state.
struct Problem {
  int64_t B, T, H, N;
  std::vector<double> r, w, k, v, a, b, s0;
  int64_t at(int64_t bb, int64_t t, int64_t h, int64_t n) const { return ((bb * T + t) * H + h) * N + n; }
};

void reference_forward(const Problem& pr, std::vector<double>& out, std::vector<double>& state) {
  const int64_t N = pr.N;
  out.assign(pr.B * pr.T * pr.H * N, 0);
  state = pr.s0;
  std::vector<double> sa(N);
  for (int64_t b = 0; b < pr.B; ++b)
    for (int64_t h = 0; h < pr.H; ++h) {
      double* S = state.data() + (b * pr.H + h) * N * N;
      for (int64_t t = 0; t < pr.T; ++t) {
        for (int64_t i = 0; i < N; ++i) {
          sa[i] = 0;
          for (int64_t j = 0; j < N; ++j) sa[i] += pr.a[pr.at(b, t, h, j)] * S[i * N + j];
        }
        for (int64_t i = 0; i < N; ++i) {
          double y = 0;
          for (int64_t j = 0; j < N; ++j) {
            double& s = S[i * N + j];
            s = s * std::exp(-std::exp(pr.w[pr.at(b, t, h, j)])) + pr.v[pr.at(b, t, h, i)] * pr.k[pr.at(b, t, h, j)] +
                sa[i] * pr.b[pr.at(b, t, h, j)];
            y += s * pr.r[pr.at(b, t, h, j)];
          }
          out[pr.at(b, t, h, i)] = y;
        }
      }
    }
}

struct RefGrads {
  std::vector<double> r, w, k, v, a, b, s0;
};

template <int N>
RefGrads reference_backward(const Problem& pr, const std::vector<double>& gy, const std::vector<double>& gS) {
  using wk::ScalarOps;
  RefGrads g;
  for (auto* x : {&g.r, &g.w, &g.k, &g.v, &g.a, &g.b}) x->assign(pr.B * pr.T * pr.H * N, 0);
  g.s0.assign(pr.B * pr.H * N * N, 0);
  for (int64_t b = 0; b < pr.B; ++b)
    for (int64_t h = 0; h < pr.H; ++h) {
      auto vecs = [&](int64_t t, double* r, double* w, double* d, double* k, double* a, double* bb) {
        for (int j = 0; j < N; ++j) {
          const int64_t e = pr.at(b, t, h, j);
          r[j] = pr.r[e], w[j] = pr.w[e], d[j] = wk::decay<ScalarOps>(w[j]), k[j] = pr.k[e], a[j] = pr.a[e],
          bb[j] = pr.b[e];
        }
      };
      std::vector<std::vector<double>> states(pr.T);
      std::vector<double> S(pr.s0.begin() + (b * pr.H + h) * N * N, pr.s0.begin() + (b * pr.H + h + 1) * N * N);
      double r[N], w[N], d[N], k[N], a[N], bb[N];
      for (int64_t t = 0; t < pr.T; ++t) {
        states[t] = S;
        vecs(t, r, w, d, k, a, bb);
        for (int i = 0; i < N; ++i) wk::forward_row<ScalarOps, N>(S.data() + i * N, r, d, k, a, bb, pr.v[pr.at(b, t, h, i)]);
      }
      std::vector<double> G(gS.begin() + (b * pr.H + h) * N * N, gS.begin() + (b * pr.H + h + 1) * N * N);
      std::vector<wk::RowGrad<double>> rows(N);
      for (int64_t t = pr.T - 1; t >= 0; --t) {
        vecs(t, r, w, d, k, a, bb);
        const std::vector<double>& prev = states[t];
        for (int i = 0; i < N; ++i) {
          rows[i] = wk::backward_row<ScalarOps, N>(prev.data() + i * N, G.data() + i * N, r, k, a, bb, gy[pr.at(b, t, h, i)]);
          g.v[pr.at(b, t, h, i)] = rows[i].dv;
        }
        for (int j = 0; j < N; ++j) {
          wk::ColumnGrad<double> acc{0, 0, 0, 0, 0};
          for (int i = 0; i < N; ++i)
            G[i * N + j] = wk::backward_column<ScalarOps>(prev[i * N + j], G[i * N + j], gy[pr.at(b, t, h, i)],
                                                          pr.v[pr.at(b, t, h, i)], rows[i], d[j], k[j], a[j], bb[j], acc);
          const int64_t e = pr.at(b, t, h, j);
          g.r[e] = acc.dr, g.k[e] = acc.dk, g.a[e] = acc.da, g.b[e] = acc.db;
          g.w[e] = wk::decay_grad<ScalarOps>(w[j], acc.dd);
        }
      }
      std::copy(G.begin(), G.end(), g.s0.begin() + (b * pr.H + h) * N * N);
    }
  return g;
}

RefGrads reference_backward(const Problem& pr, const std::vector<double>& gy, const std::vector<double>& gS) {
  switch (pr.N) {
    case 16: return reference_backward<16>(pr, gy, gS);
    case 32: return reference_backward<32>(pr, gy, gS);
    case 64: return reference_backward<64>(pr, gy, gS);
    default: return reference_backward<128>(pr, gy, gS);
  }
}

// Runs the forward (and the backward) launcher on one case under `order` and compares
// every output with the references. Returns false on a mismatch.
template <typename E>
bool run_case_typed(const Case& cs, cuda_emu::Schedule order) {
  cuda_emu::set_schedule(order);
  const int64_t B = cs.B, T = cs.T, H = cs.H, N = cs.N, M = B * T * H * N, SS = B * H * N * N;
  // The expanded layout has one sample's storage: draw sample 0 and read it back for all.
  Input4<E> r(B, T, H, N, cs.layout), w(B, T, H, N, cs.layout), k(B, T, H, N, cs.layout), v(B, T, H, N, cs.layout),
      a(B, T, H, N, cs.layout), b(B, T, H, N, cs.layout);
  const int64_t draw_b = cs.layout == Layout::kExpanded ? 1 : B;
  const double scale = 1.0 / std::sqrt(static_cast<double>(N));
  for (int64_t bb = 0; bb < draw_b; ++bb)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        // The model's stable pair: a = -kk, b = kk * sigma with kk unit-norm.
        std::vector<double> kk(N);
        double norm = 0;
        for (int64_t n = 0; n < N; ++n) norm += (kk[n] = normal()) * kk[n];
        norm = std::sqrt(norm);
        for (int64_t n = 0; n < N; ++n) {
          r.set(bb, t, h, n, normal() * scale);
          w.set(bb, t, h, n, uniform(-6.0, 1.0));
          k.set(bb, t, h, n, normal() * scale);
          v.set(bb, t, h, n, normal());
          a.set(bb, t, h, n, -kk[n] / norm);
          b.set(bb, t, h, n, kk[n] / norm * uniform(0.0, 1.0));
        }
      }
  Problem pr{B, T, H, N, {}, {}, {}, {}, {}, {}, {}};
  for (auto* x : {&pr.r, &pr.w, &pr.k, &pr.v, &pr.a, &pr.b}) x->resize(M);
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t e = pr.at(bb, t, h, n);
          pr.r[e] = r.at(bb, t, h, n), pr.w[e] = w.at(bb, t, h, n), pr.k[e] = k.at(bb, t, h, n);
          pr.v[e] = v.at(bb, t, h, n), pr.a[e] = a.at(bb, t, h, n), pr.b[e] = b.at(bb, t, h, n);
        }
  std::vector<float> s0(SS, 0.f);
  if (cs.state)
    for (auto& x : s0) x = static_cast<float>(normal() * 0.5);
  pr.s0.assign(s0.begin(), s0.end());

  prosg::Wkv7Params p;
  p.batch = B, p.seqlen = T, p.heads = H, p.head_size = N, p.dtype = cs.dtype;
  p.r = r.param(), p.w = w.param(), p.k = k.param(), p.v = v.param(), p.a = a.param(), p.b = b.param();
  p.state_in = cs.state ? s0.data() : nullptr;
  std::vector<E> out = poisoned<E>(M);
  std::vector<float> state_out = poisoned<float>(SS);
  p.out = out.data(), p.state_out = state_out.data();
  const std::string name = cs.name() + (order == cuda_emu::Schedule::kReverse ? " (reverse schedule)" : "");
  expect_launch(prosg::cuda::launch_wkv7_forward(p, nullptr), name + " forward");
  std::vector<double> ref_out, ref_state;
  reference_forward(pr, ref_out, ref_state);
  const double tol = tol_of(cs.dtype);
  bool ok = close(name + " out", as_double(out, M), ref_out, tol);
  ok = close(name + " state_out", as_double(state_out, SS), ref_state, tol_of(DType::kFloat32)) && ok;
  if (!cs.backward) return ok;

  // Cotangents: grad_out strided like the inputs (its own layout), grad_state_out contiguous.
  Input4<E> go(B, T, H, N, cs.layout == Layout::kExpanded ? Layout::kContiguous : cs.layout);
  std::vector<double> gy(M);
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t n = 0; n < N; ++n) {
          go.set(bb, t, h, n, normal());
          gy[pr.at(bb, t, h, n)] = go.at(bb, t, h, n);
        }
  std::vector<float> gso(SS);
  std::vector<double> gS(SS);
  for (int64_t e = 0; e < SS; ++e) gS[e] = gso[e] = static_cast<float>(normal());
  p.grad_out = go.param();
  p.grad_state_out = gso.data();
  std::vector<E> gr = poisoned<E>(M), gw = poisoned<E>(M), gk = poisoned<E>(M), gv = poisoned<E>(M),
                 ga = poisoned<E>(M), gb = poisoned<E>(M);
  std::vector<float> gs = poisoned<float>(SS);
  p.grad_r = gr.data(), p.grad_w = gw.data(), p.grad_k = gk.data(), p.grad_v = gv.data(), p.grad_a = ga.data(),
  p.grad_b = gb.data();
  p.grad_state_in = cs.state ? gs.data() : nullptr;
  std::vector<float> ws = poisoned<float>(prosg::cuda::wkv7_backward_workspace(B, H, N, T));
  expect_launch(prosg::cuda::launch_wkv7_backward(p, ws.data(), nullptr), name + " backward");
  const RefGrads ref = reference_backward(pr, gy, gS);
  ok = close(name + " grad r", as_double(gr, M), ref.r, tol) && ok;
  ok = close(name + " grad w", as_double(gw, M), ref.w, tol) && ok;
  ok = close(name + " grad k", as_double(gk, M), ref.k, tol) && ok;
  ok = close(name + " grad v", as_double(gv, M), ref.v, tol) && ok;
  ok = close(name + " grad a", as_double(ga, M), ref.a, tol) && ok;
  ok = close(name + " grad b", as_double(gb, M), ref.b, tol) && ok;
  if (cs.state) ok = close(name + " grad state", as_double(gs, SS), ref.s0, tol_of(DType::kFloat32)) && ok;
  return ok;
}

bool run_case(const Case& cs, cuda_emu::Schedule order = cuda_emu::Schedule::kForward) {
  bool ok;
  switch (cs.dtype) {
    case DType::kFloat16: ok = run_case_typed<__half>(cs, order); break;
    case DType::kBFloat16: ok = run_case_typed<__nv_bfloat16>(cs, order); break;
    default: ok = run_case_typed<float>(cs, order); break;
  }
  cuda_emu::set_schedule(cuda_emu::Schedule::kForward);
  return ok;
}

const Layout kLayouts[] = {Layout::kContiguous, Layout::kPadded, Layout::kTransposed, Layout::kExpanded};
const DType kDtypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

}  // namespace

// Every dtype and layout at N = 16 with odd counts (B = 3, H = 5, T = 19: a full
// 16-step segment and a 3-step one), with and without a start state.
PROSG_TEST(wkv7_dtypes_and_layouts) {
  for (DType dt : kDtypes)
    for (Layout layout : kLayouts)
      for (bool state : {false, true}) run_case({3, 19, 5, 16, state, layout, dt});
}

// Every supported head size (the template instantiations), forward and backward, in
// both fiber schedules: each step's shared inputs and dL/dS are written by one thread
// mapping and read by another, so a missing barrier shows in one order or the other.
PROSG_TEST(wkv7_every_head_size) {
  for (int64_t n : {16, 32, 64, 128})
    for (auto order : {cuda_emu::Schedule::kForward, cuda_emu::Schedule::kReverse})
      run_case({2, n == 128 ? 9 : 17, n == 128 ? 1 : 3, n, true, Layout::kPadded, DType::kFloat32}, order);
  run_case({1, 5, 1, 128, false, Layout::kTransposed, DType::kBFloat16});
}

// The backward's 16-step segments: lengths on and around their boundaries.
PROSG_TEST(wkv7_backward_segment_boundaries) {
  for (int64_t t : {1, 2, 15, 16, 17, 31, 32, 33, 48, 49, 100})
    run_case({1, t, 2, 16, t % 2 == 1, Layout::kContiguous, t % 3 == 0 ? DType::kBFloat16 : DType::kFloat32});
}

// Empty work launches nothing and fails nothing; an unsupported head size is refused.
PROSG_TEST(wkv7_empty_work_and_bad_head_size) {
  prosg::Wkv7Params p;
  p.batch = 0, p.seqlen = 5, p.heads = 3, p.head_size = 16;
  cuda_emu::stats() = {};
  PROSG_EXPECT(prosg::cuda::launch_wkv7_forward(p, nullptr) == cudaSuccess);
  PROSG_EXPECT(prosg::cuda::launch_wkv7_backward(p, nullptr, nullptr) == cudaSuccess);
  p.batch = 2, p.heads = 0;
  PROSG_EXPECT(prosg::cuda::launch_wkv7_forward(p, nullptr) == cudaSuccess);
  p.heads = 3, p.seqlen = 0;
  PROSG_EXPECT(prosg::cuda::launch_wkv7_forward(p, nullptr) == cudaSuccess);
  PROSG_EXPECT(prosg::cuda::launch_wkv7_backward(p, nullptr, nullptr) == cudaSuccess);
  PROSG_EXPECT(cuda_emu::stats().launches == 0);
  PROSG_EXPECT(prosg::cuda::wkv7_backward_workspace(0, 3, 16, 5) == 0);
  p.seqlen = 4, p.head_size = 48;
  PROSG_EXPECT(prosg::cuda::launch_wkv7_forward(p, nullptr) == cudaErrorInvalidValue);
  PROSG_EXPECT(cuda_emu::stats().launches == 0);
}

PROSG_TEST_MAIN()
