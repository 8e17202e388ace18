// Torch-free parameters of the shared projection of a few rows, y = x W^T + bias (the
// CPU's decoding path), and of the two halves of the per-sample low-rank product
// (the BGMV pattern of Punica): shrink z = x V_b, then expand y += scale * z U_b^T.
// Rows are n = b * seqlen + t. Strides are in elements. z is always a contiguous
// [batch, seqlen, rank] buffer in the accumulation type (float32, or float64 for
// float64 inputs); y is always the contiguous output of the shared GEMM.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace prosg {

struct LowrankBaseParams {
  int64_t rows, din, dout;
  DType dtype;            // of x, weight, bias and y
  const void* x;          // [rows, din], rows x_row_stride apart, unit stride within a row
  int64_t x_row_stride;
  const void* weight;     // [dout, din], contiguous
  const void* bias;       // [dout] contiguous, or null
  void* y;                // [rows, dout], contiguous
};

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
