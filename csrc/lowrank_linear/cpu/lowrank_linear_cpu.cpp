// CPU kernels of the per-sample low-rank product and the CPU registration of
// lowrank_linear. Both loops are parallel over rows (b, t) with at::parallel_for and
// vectorised over the long dimension: each chunk packs the current sample's factor
// transposed, [rank, dim] in float32 (float64 for float64), so the inner loops are
// contiguous dot products (shrink) and axpys (expand) whatever the input strides.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
  for (int64_t j = 0; j < rank; ++j) cpu::gather(Ft.data() + j * dim, F + j * rank_stride, dim_stride, dim);
}

template <typename scalar_t>
void shrink_kernel(const LowrankShrinkParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* V = static_cast<const scalar_t*>(p.V);
  auto* z = static_cast<acc_t*>(p.z);
  const int64_t rows = p.batch * p.seqlen, D = p.dim, R = p.rank;
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

void shrink_cpu(const LowrankShrinkParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "lowrank_shrink_cpu",
                                  [&] { shrink_kernel<scalar_t>(p); });
}

void expand_cpu(const LowrankExpandParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "lowrank_expand_cpu",
                                  [&] { expand_kernel<scalar_t>(p); });
}

constexpr Backend kCpu{&shrink_cpu, &expand_cpu};

}  // namespace

const Backend& cpu_backend() { return kCpu; }

TORCH_LIBRARY_IMPL(prosg, CPU, m) {
  m.impl("lowrank_linear", &forward_op<kCpu>);
  m.impl("lowrank_linear_backward", &backward_op<kCpu>);
}

}  // namespace prosg::lowrank
