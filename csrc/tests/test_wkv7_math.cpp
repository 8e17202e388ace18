// Torch-free tests of csrc/wkv7/wkv7_math.h, the arithmetic that the CPU and CUDA
// wkv7 kernels share, compiled here with the host compiler for float and double:
//   - forward_row against the step written as matrices, S (diag(d) + a b^T) + v k^T,
//   - backward_row + backward_column (composed as the kernels compose them) against
//     central finite differences of a loss over a short sequence, in every input,
//     the decay w and the start state included,
//   - decay and decay_grad at extreme w: exact limits, never NaN,
//   - range: 100k steps with decays near 0 and near 1, |k|, |v| up to 10 and the
//     model's stable pair (a = -kk, b = kk * sigma, kk unit-norm) stay finite and
//     the float recurrence tracks the double one.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "tests/harness.h"
#include "wkv7/wkv7_math.h"

namespace {

namespace wk = prosg::wkv7;
using wk::ScalarOps;

// One head's problem: T steps of (r, w, k, v, a, b), each N values, and a start state.
template <int N>
struct Problem {
  int T = 0;
  std::vector<double> r, w, k, v, a, b;  // [T][N]
  std::vector<double> s0;                // [N][N] (value, key)
  double* at(std::vector<double>& x, int t) { return x.data() + t * N; }
  const double* at(const std::vector<double>& x, int t) const { return x.data() + t * N; }
};

// kk unit-norm, a = -kk, b = kk * sigma with sigma in [0, 1]: diag(d) - kk (kk sigma)^T
// has norm <= 1, the model's stable transition.
template <int N>
Problem<N> random_problem(std::mt19937_64& rng, int T, double w_lo, double w_hi, double kv_scale, bool state) {
  std::uniform_real_distribution<double> U(-1.0, 1.0), P(0.0, 1.0), Wd(w_lo, w_hi);
  Problem<N> pr;
  pr.T = T;
  for (auto* x : {&pr.r, &pr.w, &pr.k, &pr.v, &pr.a, &pr.b}) x->resize(T * N);
  for (int t = 0; t < T; ++t) {
    double norm = 0;
    std::vector<double> kk(N);
    for (int j = 0; j < N; ++j) norm += (kk[j] = U(rng)) * kk[j];
    norm = std::sqrt(norm);
    for (int j = 0; j < N; ++j) {
      pr.r[t * N + j] = U(rng);
      pr.w[t * N + j] = Wd(rng);
      pr.k[t * N + j] = kv_scale * U(rng);
      pr.v[t * N + j] = kv_scale * U(rng);
      pr.a[t * N + j] = -kk[j] / norm;
      pr.b[t * N + j] = kk[j] / norm * P(rng);
    }
  }
  pr.s0.assign(N * N, 0.0);
  if (state)
    for (auto& x : pr.s0) x = U(rng);
  return pr;
}

// The forward over the problem in type F, as the kernels run it (rows through
// forward_row). Returns the outputs [T][N]; leaves the end state in `S`.
template <typename F, int N>
std::vector<F> scan(const Problem<N>& pr, std::vector<F>& S) {
  S.assign(pr.s0.begin(), pr.s0.end());
  std::vector<F> y(pr.T * N);
  F r[N], d[N], k[N], a[N], b[N];
  for (int t = 0; t < pr.T; ++t) {
    for (int j = 0; j < N; ++j) {
      r[j] = F(pr.r[t * N + j]), k[j] = F(pr.k[t * N + j]), a[j] = F(pr.a[t * N + j]), b[j] = F(pr.b[t * N + j]);
      d[j] = wk::decay<ScalarOps>(F(pr.w[t * N + j]));
    }
    for (int i = 0; i < N; ++i) y[t * N + i] = wk::forward_row<ScalarOps, N>(S.data() + i * N, r, d, k, a, b, F(pr.v[t * N + i]));
  }
  return y;
}

PROSG_TEST(forward_row_matches_matrix_form) {
  constexpr int N = 16;
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 10; ++trial) {
    const Problem<N> pr = random_problem<N>(rng, 1 + trial * 3, -6.0, 2.0, 2.0, trial % 2 == 1);
    std::vector<double> S;
    const std::vector<double> y = scan<double>(pr, S);
    // Matrix form in long double: M = diag(d) + a b^T; S <- S M + v k^T; y = S r.
    std::vector<long double> X(pr.s0.begin(), pr.s0.end()), M(N * N), Y(N * N);
    for (int t = 0; t < pr.T; ++t) {
      for (int j = 0; j < N; ++j)
        for (int l = 0; l < N; ++l)
          M[j * N + l] = (j == l ? std::exp(-std::exp((long double)pr.w[t * N + j])) : 0.0L) +
                         (long double)pr.a[t * N + j] * pr.b[t * N + l];
      for (int i = 0; i < N; ++i)
        for (int l = 0; l < N; ++l) {
          long double acc = (long double)pr.v[t * N + i] * pr.k[t * N + l];
          for (int j = 0; j < N; ++j) acc += X[i * N + j] * M[j * N + l];
          Y[i * N + l] = acc;
        }
      X = Y;
      for (int i = 0; i < N; ++i) {
        long double yi = 0;
        for (int j = 0; j < N; ++j) yi += X[i * N + j] * pr.r[t * N + j];
        PROSG_EXPECT_NEAR(y[t * N + i], (double)yi, 1e-12, 1e-11) << "trial" << trial << "t" << t << "i" << i;
      }
    }
    for (int e = 0; e < N * N; ++e) PROSG_EXPECT_NEAR(S[e], (double)X[e], 1e-12, 1e-11) << "state trial" << trial;
  }
}

// The forward over the problem in the key-major form (forward_keys, key_sums), with
// value rows in groups of C scalars: what the CPU's sequence kernel runs, one lane a
// group member. Returns the outputs [T][N]; leaves the end state, row-major, in `S`.
template <typename F, int N, int C>
std::vector<F> scan_keys(const Problem<N>& pr, std::vector<F>& S) {
  std::vector<F> st(N * N);  // st[j * N + i] = S_ij
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) st[j * N + i] = F(pr.s0[i * N + j]);
  std::vector<F> y(pr.T * N), sa(N), sa_next(N), v(N);
  F r[N], d[N], k[N], a[N], b[N], a_next[N];
  for (int j = 0; j < N; ++j) a[j] = F(pr.a[j]);
  for (int i = 0; i < N; i += C) wk::key_sums<ScalarOps, C>(st.data() + i, N, N, a, sa.data() + i);
  for (int t = 0; t < pr.T; ++t) {
    for (int j = 0; j < N; ++j) {
      r[j] = F(pr.r[t * N + j]), k[j] = F(pr.k[t * N + j]), b[j] = F(pr.b[t * N + j]), v[j] = F(pr.v[t * N + j]);
      d[j] = wk::decay<ScalarOps>(F(pr.w[t * N + j]));
      a_next[j] = t + 1 < pr.T ? F(pr.a[(t + 1) * N + j]) : F(0);
    }
    for (int i = 0; i < N; i += C)
      wk::forward_keys<ScalarOps, C>(st.data() + i, N, N, r, d, k, b, a_next, v.data() + i, sa.data() + i,
                                     y.data() + t * N + i, sa_next.data() + i);
    std::swap(sa, sa_next);
  }
  S.resize(N * N);
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) S[i * N + j] = st[j * N + i];
  return y;
}

// The key-major form is the row-major one reordered: states bitwise equal after one
// step from zero, and within rounding of each other over long runs, for blocks of 1,
// 2 and 4 rows and with or without a start state.
template <int C>
void check_key_major(int trials) {
  constexpr int N = 16;
  std::mt19937_64 rng(11 + C);
  for (int trial = 0; trial < trials; ++trial) {
    const Problem<N> pr = random_problem<N>(rng, 1 + trial * 37, -6.0, 2.0, 2.0, trial % 2 == 1);
    std::vector<double> S_rows, S_keys;
    const std::vector<double> y_rows = scan<double>(pr, S_rows);
    const std::vector<double> y_keys = scan_keys<double, N, C>(pr, S_keys);
    for (int e = 0; e < pr.T * N; ++e)
      PROSG_EXPECT_NEAR(y_keys[e], y_rows[e], 1e-12, 1e-11) << "C" << C << "trial" << trial << "y" << e;
    for (int e = 0; e < N * N; ++e)
      PROSG_EXPECT_NEAR(S_keys[e], S_rows[e], 1e-12, 1e-11) << "C" << C << "trial" << trial << "state" << e;
    if (pr.T == 1 && trial % 2 == 0) {
      for (int e = 0; e < N * N; ++e) PROSG_EXPECT(S_keys[e] == S_rows[e]) << "one step from zero, entry" << e;
    }
  }
}

PROSG_TEST(forward_keys_matches_forward_rows) {
  check_key_major<1>(6);
  check_key_major<2>(6);
  check_key_major<4>(6);
}

PROSG_TEST(decay_limits_are_exact_and_finite) {
  PROSG_EXPECT(wk::decay<ScalarOps>(100.0f) == 0.0f);
  PROSG_EXPECT(wk::decay<ScalarOps>(-100.0f) == 1.0f);
  PROSG_EXPECT(wk::decay<ScalarOps>(1e30) == 0.0 && wk::decay<ScalarOps>(-1e30) == 1.0);
  PROSG_EXPECT_NEAR(wk::decay<ScalarOps>(0.0), std::exp(-1.0), 1e-15, 1e-15);
  for (float w : {-1e30f, -1000.0f, -100.0f, -20.0f, 0.0f, 20.0f, 88.0f, 89.0f, 100.0f, 1000.0f, 1e30f}) {
    const float g = wk::decay_grad<ScalarOps>(w, 1.0f);
    PROSG_EXPECT(std::isfinite(g) && g <= 0.0f) << "w" << w << "grad" << g;
    // -exp(w) exp(-exp(w)) in double where it is representable.
    const double expect = -std::exp(double(w)) * std::exp(-std::exp(double(w)));
    if (std::isfinite(expect)) {
      PROSG_EXPECT_NEAR(g, expect, 1e-30, 1e-5) << "w" << w;
    }
  }
  // Large dd times a vanishing derivative stays 0, not inf * 0 = NaN.
  PROSG_EXPECT(wk::decay_grad<ScalarOps>(1000.0f, 1e30f) == 0.0f);
}

// ---- Backward --------------------------------------------------------------------

template <int N>
struct Loss {
  std::vector<double> gy;  // [T][N]
  std::vector<double> gS;  // [N][N] dL/d(end state)
};

template <int N>
double loss_value(const Problem<N>& pr, const Loss<N>& L) {
  std::vector<double> S;
  const std::vector<double> y = scan<double>(pr, S);
  double total = 0;
  for (size_t e = 0; e < y.size(); ++e) total += L.gy[e] * y[e];
  for (size_t e = 0; e < S.size(); ++e) total += L.gS[e] * S[e];
  return total;
}

template <typename F, int N>
struct Grads {
  std::vector<F> r, w, k, v, a, b;  // [T][N]
  std::vector<F> s0;                // [N][N]
};

// The backward as the kernels compose it: the states recomputed (all of them here),
// then per step the row phase for every row and the column phase for every (i, j).
template <typename F, int N>
Grads<F, N> backward(const Problem<N>& pr, const Loss<N>& L) {
  const int T = pr.T;
  std::vector<std::vector<F>> states(T + 1);
  std::vector<F> S(pr.s0.begin(), pr.s0.end());
  {
    for (int t = 0; t < T; ++t) {
      states[t] = S;
      F r[N], d[N], k[N], a[N], b[N];
      for (int j = 0; j < N; ++j) {
        r[j] = F(pr.r[t * N + j]), k[j] = F(pr.k[t * N + j]), a[j] = F(pr.a[t * N + j]), b[j] = F(pr.b[t * N + j]);
        d[j] = wk::decay<ScalarOps>(F(pr.w[t * N + j]));
      }
      for (int i = 0; i < N; ++i) wk::forward_row<ScalarOps, N>(S.data() + i * N, r, d, k, a, b, F(pr.v[t * N + i]));
    }
  }
  Grads<F, N> g;
  for (auto* x : {&g.r, &g.w, &g.k, &g.v, &g.a, &g.b}) x->assign(T * N, F(0));
  std::vector<F> G(L.gS.begin(), L.gS.end());
  for (int t = T - 1; t >= 0; --t) {
    F r[N], w[N], d[N], k[N], a[N], b[N];
    for (int j = 0; j < N; ++j) {
      r[j] = F(pr.r[t * N + j]), w[j] = F(pr.w[t * N + j]), k[j] = F(pr.k[t * N + j]);
      a[j] = F(pr.a[t * N + j]), b[j] = F(pr.b[t * N + j]);
      d[j] = wk::decay<ScalarOps>(w[j]);
    }
    const std::vector<F>& prev = states[t];
    std::vector<wk::RowGrad<F>> rows(N);
    for (int i = 0; i < N; ++i) {
      rows[i] = wk::backward_row<ScalarOps, N>(prev.data() + i * N, G.data() + i * N, r, k, a, b, F(L.gy[t * N + i]));
      g.v[t * N + i] = rows[i].dv;
    }
    for (int j = 0; j < N; ++j) {
      wk::ColumnGrad<F> acc{F(0), F(0), F(0), F(0), F(0)};
      for (int i = 0; i < N; ++i)
        G[i * N + j] = wk::backward_column<ScalarOps>(prev[i * N + j], G[i * N + j], F(L.gy[t * N + i]),
                                                      F(pr.v[t * N + i]), rows[i], d[j], k[j], a[j], b[j], acc);
      g.r[t * N + j] = acc.dr, g.k[t * N + j] = acc.dk, g.a[t * N + j] = acc.da, g.b[t * N + j] = acc.db;
      g.w[t * N + j] = wk::decay_grad<ScalarOps>(w[j], acc.dd);
    }
  }
  g.s0 = G;
  return g;
}

template <int N>
Loss<N> random_loss(std::mt19937_64& rng, int T) {
  std::uniform_real_distribution<double> U(-1.0, 1.0);
  Loss<N> L;
  L.gy.resize(T * N);
  L.gS.resize(N * N);
  for (auto& x : L.gy) x = U(rng);
  for (auto& x : L.gS) x = U(rng);
  return L;
}

PROSG_TEST(backward_double_matches_finite_differences) {
  constexpr int N = 4;
  std::mt19937_64 rng(11);
  const double h = 1e-6, atol = 1e-7, rtol = 1e-6;
  for (int trial = 0; trial < 8; ++trial) {
    // Unconstrained a, b too (the backward does not rely on stability).
    Problem<N> pr = random_problem<N>(rng, 1 + trial, -3.0, 1.5, 1.5, trial % 2 == 0);
    if (trial >= 4)
      for (auto* x : {&pr.a, &pr.b})
        for (auto& e : *x) e *= 1.3;
    const Loss<N> L = random_loss<N>(rng, pr.T);
    const Grads<double, N> g = backward<double, N>(pr, L);
    auto fd = [&](std::vector<double> Problem<N>::*field, int e) {
      Problem<N> plus = pr, minus = pr;
      (plus.*field)[e] += h;
      (minus.*field)[e] -= h;
      return (loss_value(plus, L) - loss_value(minus, L)) / (2 * h);
    };
    struct Field {
      const char* name;
      std::vector<double> Problem<N>::*p;
      const std::vector<double>* g;
    };
    const Field fields[] = {{"r", &Problem<N>::r, &g.r}, {"w", &Problem<N>::w, &g.w}, {"k", &Problem<N>::k, &g.k},
                            {"v", &Problem<N>::v, &g.v}, {"a", &Problem<N>::a, &g.a}, {"b", &Problem<N>::b, &g.b},
                            {"s0", &Problem<N>::s0, &g.s0}};
    for (const Field& f : fields)
      for (size_t e = 0; e < f.g->size(); ++e)
        PROSG_EXPECT_NEAR((*f.g)[e], fd(f.p, static_cast<int>(e)), atol, rtol) << "d" << f.name << e << "trial" << trial;
  }
}

PROSG_TEST(backward_float_matches_double) {
  constexpr int N = 16;
  std::mt19937_64 rng(13);
  for (int trial = 0; trial < 6; ++trial) {
    const Problem<N> pr = random_problem<N>(rng, 5 + trial * 20, -5.0, 1.0, 2.0, trial % 2 == 1);
    const Loss<N> L = random_loss<N>(rng, pr.T);
    const Grads<double, N> gd = backward<double, N>(pr, L);
    const Grads<float, N> gf = backward<float, N>(pr, L);
    const double tol = 2e-5 * std::sqrt(double(pr.T * N));
    auto cmp = [&](const char* what, const std::vector<float>& x, const std::vector<double>& y) {
      double scale = 1;
      for (double e : y) scale = std::max(scale, std::fabs(e));
      for (size_t e = 0; e < y.size(); ++e)
        PROSG_EXPECT_NEAR(x[e], y[e], tol * scale, tol) << what << e << "trial" << trial;
    };
    cmp("dr", gf.r, gd.r);
    cmp("dw", gf.w, gd.w);
    cmp("dk", gf.k, gd.k);
    cmp("dv", gf.v, gd.v);
    cmp("da", gf.a, gd.a);
    cmp("db", gf.b, gd.b);
    cmp("ds0", gf.s0, gd.s0);
  }
}

// ---- Range -----------------------------------------------------------------------

PROSG_TEST(long_sequences_stay_finite_and_track_double) {
  constexpr int N = 16;
  const int T = 100000;
  std::mt19937_64 rng(23);
  // Decays near 1 (w = -12: d = 1 - 6e-6, a memory of ~10^5 steps), near 0 (w = 3:
  // d = 2e-9) and a spread.
  const double ranges[][2] = {{-12.0, -10.0}, {2.0, 3.0}, {-12.0, 3.0}};
  for (const auto& range : ranges) {
    const Problem<N> pr = random_problem<N>(rng, T, range[0], range[1], 10.0, true);
    std::vector<float> Sf;
    std::vector<double> Sd;
    const std::vector<float> yf = scan<float>(pr, Sf);
    const std::vector<double> yd = scan<double>(pr, Sd);
    double worst = 0, scale = 1;
    int bad = 0;
    for (size_t e = 0; e < yd.size(); ++e) {
      bad += !std::isfinite(yf[e]);
      scale = std::max(scale, std::fabs(yd[e]));
      worst = std::max(worst, std::fabs(double(yf[e]) - yd[e]));
    }
    PROSG_EXPECT(bad == 0) << bad << "non-finite outputs, w in" << range[0] << range[1];
    // Relative to the largest output: the state's norm is bounded (|| M || <= 1) and
    // rounding does not grow with T.
    PROSG_EXPECT(worst <= 1e-4 * scale) << "max |y_float - y_double| =" << worst << "scale" << scale << "w in"
                                        << range[0] << range[1];
    // The backward over (the first 20k steps of) the same sequence stays finite too.
    // (This test's backward stores every state: 20k of them are 20 MB.)
    Problem<N> head = pr;
    head.T = 20000;
    Loss<N> L;
    L.gy.assign(head.T * N, 1.0);
    L.gS.assign(N * N, 0.5);
    const Grads<float, N> g = backward<float, N>(head, L);
    bool finite = true;
    for (const auto* x : {&g.r, &g.w, &g.k, &g.v, &g.a, &g.b, &g.s0})
      for (float e : *x) finite = finite && std::isfinite(e);
    PROSG_EXPECT(finite) << "non-finite gradient, w in" << range[0] << range[1];
  }
}

}  // namespace

PROSG_TEST_MAIN()
