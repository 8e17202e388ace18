// The arithmetic of the per-sample low-rank product, written once for the CPU and CUDA
// kernels (__host__ __device__, torch-free): the shrink is a dot product per (row, rank),
// z[n, j] = sum_i x[n, i] V_b[i, j]; the expand adds
//   y[n, o] += sum_j (scale z[n, j]) U_b[o, j]
// with the scale folded into each row's z once (r multiplies per row instead of one per
// output element and rank). F is float or double, or at::vec::Vectorized on the CPU.
#pragma once

#include "common/dtype.h"

namespace prosg::lowrank_math {

// The expand's coefficient of rank j for one row: scale * z[n, j].
template <typename F>
PROSG_HD F expand_coefficient(double scale, F z) {
  return static_cast<F>(scale) * z;
}

// One rank's contribution to an output element: acc + coef * u.
template <typename F>
PROSG_HD F expand_step(F acc, F coef, F u) {
  return acc + coef * u;
}

}  // namespace prosg::lowrank_math
