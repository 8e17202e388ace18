// Torch-free parameters of the two halves of the per-sample low-rank product
// (the BGMV pattern of Punica): shrink z = x V_b, then expand y += scale * z U_b^T.
// Rows are n = b * seqlen + t. Strides are in elements. z is always a contiguous
// [batch, seqlen, rank] buffer in the accumulation type (float32, or float64 for
// float64 inputs); y is always the contiguous output of the shared GEMM.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace prosg {

struct LowrankShrinkParams {
  int64_t batch, seqlen, dim, rank;
  DType dtype;            // of x and V
  const void* x;          // [batch, seqlen, dim]
  int64_t x_batch_stride, x_seq_stride, x_dim_stride;
  const void* V;          // [batch, dim, rank]
  int64_t v_batch_stride, v_dim_stride, v_rank_stride;
  void* z;                // [batch, seqlen, rank], contiguous, accumulation type
};

struct LowrankExpandParams {
  int64_t batch, seqlen, dim, rank;
  DType dtype;            // of U and y
  double scale;
  const void* z;          // [batch, seqlen, rank], contiguous, accumulation type
  const void* U;          // [batch, dim, rank]
  int64_t u_batch_stride, u_dim_stride, u_rank_stride;
  void* y;                // [batch, seqlen, dim], contiguous; updated in place
};

}  // namespace prosg
