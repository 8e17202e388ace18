// CPU kernels of the per-sample low-rank product, of the shared projection of a few
// rows (base_cpu, below), and the CPU registration of lowrank_linear. The low-rank
// product's two loops are parallel over rows (b, t) with at::parallel_for and
// vectorised over the long dimension: each chunk packs the current sample's factor
// transposed, [rank, dim] in float32 (float64 for float64), so the inner loops are
// contiguous dot products (shrink) and axpys (expand) whatever the input strides; a
// sample with fewer than kUnpackedRows rows (a decode step) shrinks without packing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/torch_utils.h"
#include "common/cpu_vec.h"
#include "lowrank_linear/lowrank_linear.h"
#include "lowrank_linear/lowrank_linear_math.h"

namespace prosg::lowrank {
namespace {

// Rows per task: enough work (rows * dim * rank multiply-adds) to amortise a task and
// the factor packing, which costs dim * rank per chunk.
int64_t grain_rows(int64_t dim, int64_t rank) {
  return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, dim * rank));
}

// Packs factor F_b [dim, rank] (strided) as Ft [rank, dim] contiguous in acc_t.
template <typename scalar_t, typename acc_t>
void pack_transposed(std::vector<acc_t>& Ft, const scalar_t* F, int64_t dim_stride, int64_t rank_stride, int64_t dim,
                     int64_t rank) {
  Ft.resize(rank * dim);
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // The usual layout (contiguous [dim, rank] rows, rank a multiple of 8) in 8 x 8
    // register transposes: the strided gathers below cost a decode step's expand as
    // much as its products. Same values, so the same results.
    if (rank_stride == 1 && rank % 8 == 0) {
      int64_t d0 = 0;
      for (; d0 + 8 <= dim; d0 += 8) {
        for (int64_t j0 = 0; j0 < rank; j0 += 8) {
          at::vec::transpose_mxn<float, 8, 8>(F + d0 * dim_stride + j0, dim_stride, Ft.data() + j0 * dim + d0, dim);
        }
      }
      for (; d0 < dim; ++d0) {
        for (int64_t j = 0; j < rank; ++j) Ft[j * dim + d0] = F[d0 * dim_stride + j];
      }
      return;
    }
  }
  for (int64_t j = 0; j < rank; ++j) cpu::gather(Ft.data() + j * dim, F + j * rank_stride, dim_stride, dim);
}

// z[0:R] = sum_i x[i] V[i, 0:R] for one row, V's rows (R contiguous values) read in
// order, lanes over the rank, the sum over i sequential: without the packing, which
// for a sample with one row (a decode step) costs as much as the products.
template <typename T>
void shrink_row_unpacked(const T* x, int64_t x_stride, const T* V, int64_t v_dim_stride, int64_t D, int64_t R,
                         T* z) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t L = Vec::size(), kBlock = 4;  // 4 accumulators: ranks up to 4 L per pass
  for (int64_t j0 = 0; j0 < R; j0 += kBlock * L) {
    const int64_t width = std::min(R - j0, kBlock * L);
    Vec acc[kBlock];
    for (auto& a : acc) a = Vec(T(0));
    for (int64_t i = 0; i < D; ++i) {
      const Vec xi(x[i * x_stride]);
      const T* v = V + i * v_dim_stride + j0;
      for (int64_t q = 0; q < kBlock && q * L < width; ++q) {
        const int64_t n = std::min(L, width - q * L);
        acc[q] = at::vec::fmadd(xi, n == L ? Vec::loadu(v + q * L) : Vec::loadu(v + q * L, n), acc[q]);
      }
    }
    for (int64_t q = 0; q < kBlock && q * L < width; ++q) acc[q].store(z + j0 + q * L, std::min(L, width - q * L));
  }
}

// Rows per sample below which shrink skips the packing (shrink_row_unpacked).
constexpr int64_t kUnpackedRows = 4;

template <typename scalar_t>
void shrink_kernel(const LowrankShrinkParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* V = static_cast<const scalar_t*>(p.V);
  auto* z = static_cast<acc_t*>(p.z);
  const int64_t rows = p.batch * p.seqlen, D = p.dim, R = p.rank;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (p.seqlen < kUnpackedRows && p.v_rank_stride == 1) {
      at::parallel_for(0, rows, grain_rows(D, R), [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const int64_t b = n / p.seqlen, t = n % p.seqlen;
          shrink_row_unpacked(x + b * p.x_batch_stride + t * p.x_seq_stride, p.x_dim_stride,
                              V + b * p.v_batch_stride, p.v_dim_stride, D, R, z + n * R);
        }
      });
      return;
    }
  }
  at::parallel_for(0, rows, grain_rows(D, R), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Vt, xrow(D);
    int64_t packed = -1;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / p.seqlen, t = n % p.seqlen;
      if (b != packed) {
        pack_transposed(Vt, V + b * p.v_batch_stride, p.v_dim_stride, p.v_rank_stride, D, R);
        packed = b;
      }
      cpu::gather(xrow.data(), x + b * p.x_batch_stride + t * p.x_seq_stride, p.x_dim_stride, D);
      for (int64_t j = 0; j < R; ++j) z[n * R + j] = cpu::dot(xrow.data(), Vt.data() + j * D, D);
    }
  });
}

template <typename scalar_t>
void expand_kernel(const LowrankExpandParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const auto* U = static_cast<const scalar_t*>(p.U);
  const auto* z = static_cast<const acc_t*>(p.z);
  auto* y = static_cast<scalar_t*>(p.y);
  const int64_t rows = p.batch * p.seqlen, D = p.dim, R = p.rank;
  at::parallel_for(0, rows, grain_rows(D, R), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> Ut, coef(R), yrow(D);
    int64_t packed = -1;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / p.seqlen;
      if (b != packed) {
        pack_transposed(Ut, U + b * p.u_batch_stride, p.u_dim_stride, p.u_rank_stride, D, R);
        packed = b;
      }
      for (int64_t j = 0; j < R; ++j) coef[j] = lowrank_math::expand_coefficient(p.scale, z[n * R + j]);
      scalar_t* yn = y + n * D;
      acc_t* acc = yrow.data();
      if constexpr (std::is_same_v<acc_t, scalar_t>) acc = yn;  // update in place
      else cpu::gather(acc, yn, 1, D);
      int64_t o = 0;
      for (; o + W <= D; o += W) {
        Vec a = Vec::loadu(acc + o);
        // expand_step as one fused multiply-add per lane (Vectorized's + and * would be two).
        for (int64_t j = 0; j < R; ++j) a = at::vec::fmadd(Vec(coef[j]), Vec::loadu(Ut.data() + j * D + o), a);
        a.store(acc + o);
      }
      for (; o < D; ++o) {
        acc_t a = acc[o];
        for (int64_t j = 0; j < R; ++j) a = lowrank_math::expand_step(a, coef[j], Ut[j * D + o]);
        acc[o] = a;
      }
      if constexpr (!std::is_same_v<acc_t, scalar_t>) {
        for (int64_t i = 0; i < D; ++i) yn[i] = static_cast<scalar_t>(acc[i]);
      }
    }
  });
}

// The shared projection of a few float32 rows, y = x W^T + bias: a register block of
// MB rows of x against NB rows of W walks the common dimension once, MB * NB
// accumulators of one vector each (8 or 12 of the 16 AVX2 registers) fed by MB + NB
// loads a step. W is read from memory exactly once whatever the number of rows: for
// each block of NB rows of W the row pairs of x run against it while it is in cache.
// Each output is one accumulator's lanes summed, plus the tail past the last whole
// vector, plus the bias: a fixed order, independent of the thread count.
template <int MB, int NB>
void base_block(const float* x, int64_t ldx, const float* w, int64_t din, float* y, int64_t ldy,
                const float* bias) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t L = Vec::size();
  Vec acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) acc[m][n] = Vec(0.0f);
  int64_t k = 0;
  for (; k + L <= din; k += L) {
    Vec wv[NB];
    for (int n = 0; n < NB; ++n) wv[n] = Vec::loadu(w + n * din + k);
    for (int m = 0; m < MB; ++m) {
      const Vec xv = Vec::loadu(x + m * ldx + k);
      for (int n = 0; n < NB; ++n) acc[m][n] = at::vec::fmadd(wv[n], xv, acc[m][n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) {
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[m][n]);
      for (int64_t j = k; j < din; ++j) sum += x[m * ldx + j] * w[n * din + j];
      y[m * ldy + n] = bias != nullptr ? sum + bias[n] : sum;
    }
}

// Output columns [n0, n1) of every row: blocks of MB rows against NB columns, then
// the remaining rows one at a time, then the remaining columns one at a time.
template <int MB, int NB>
void base_columns(const LowrankBaseParams& p, int64_t n0, int64_t n1) {
  const auto* x = static_cast<const float*>(p.x);
  const auto* w = static_cast<const float*>(p.weight);
  const auto* bias = static_cast<const float*>(p.bias);
  auto* y = static_cast<float*>(p.y);
  const int64_t ldx = p.x_row_stride, din = p.din, dout = p.dout;
  auto rows_against = [&]<int nb>(int64_t n) {
    const float* b = bias != nullptr ? bias + n : nullptr;
    int64_t m = 0;
    for (; m + MB <= p.rows; m += MB) base_block<MB, nb>(x + m * ldx, ldx, w + n * din, din, y + m * dout + n, dout, b);
    for (; m < p.rows; ++m) base_block<1, nb>(x + m * ldx, ldx, w + n * din, din, y + m * dout + n, dout, b);
  };
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) rows_against.template operator()<NB>(n);
  for (; n < n1; ++n) rows_against.template operator()<1>(n);
}

void base_cpu(const LowrankBaseParams& p) {
  TORCH_CHECK(p.dtype == DType::kFloat32, "prosg.lowrank_linear: the small-batch projection is float32 only");
  // One row of x: 8 columns of W at a time (8 accumulators, the GEMV is bound by
  // reading W); more rows: pairs of rows against 6 columns (12 accumulators).
  // Columns per task: about 2^18 multiply-adds, so a small call runs inline.
  const int64_t grain = std::max<int64_t>(8, (int64_t{1} << 18) / std::max<int64_t>(1, p.rows * p.din));
  at::parallel_for(0, p.dout, grain, [&](int64_t begin, int64_t end) {
    if (p.rows == 1) base_columns<1, 8>(p, begin, end);
    else base_columns<2, 6>(p, begin, end);
  });
}

void shrink_cpu(const LowrankShrinkParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "lowrank_shrink_cpu",
                                  [&] { shrink_kernel<scalar_t>(p); });
}

void expand_cpu(const LowrankExpandParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "lowrank_expand_cpu",
                                  [&] { expand_kernel<scalar_t>(p); });
}

constexpr Backend kCpu{&shrink_cpu, &expand_cpu, &base_cpu};

}  // namespace

const Backend& cpu_backend() { return kCpu; }

TORCH_LIBRARY_IMPL(prosg, CPU, m) {
  m.impl("lowrank_linear", &forward_op<kCpu>);
  m.impl("lowrank_linear_backward", &backward_op<kCpu>);
}

}  // namespace prosg::lowrank
