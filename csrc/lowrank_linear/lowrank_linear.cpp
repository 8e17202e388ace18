#include "lowrank_linear/lowrank_linear.h"

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/torch_utils.h"

namespace prosg::lowrank {
namespace {

constexpr const char* kOp = "prosg.lowrank_linear";

struct Dims {
  int64_t batch, seqlen, din, dout, rank;
  bool has_delta;
};

Dims validate(const char* op, const LowrankInputs& in) {
  const at::Tensor &x = in.x, &weight = in.weight;
  const Opt &bias = in.bias, &U = in.U, &V = in.V;
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op, ": x must have shape [B, T, Din] or [B, Din], got ",
                    shape_str(x.sizes()));
  check_floating(op, "x", x, /*allow_double=*/x.is_cpu());
  Dims d{};
  d.batch = x.size(0);
  d.seqlen = x.dim() == 3 ? x.size(1) : 1;
  d.din = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must have shape [Dout, ", d.din, "], got ",
                    shape_str(weight.sizes()));
  check_shape(op, "weight", weight, {-1, d.din});
  check_same_device(op, "weight", weight, x, "x");
  check_dtype(op, "weight", weight, x.scalar_type());
  d.dout = weight.size(0);
  if (bias) {
    check_shape(op, "bias", *bias, {d.dout});
    check_same_device(op, "bias", *bias, x, "x");
    check_dtype(op, "bias", *bias, x.scalar_type());
  }
  TORCH_CHECK_VALUE(U.has_value() == V.has_value(), op, ": U and V must be given together (got ",
                    U ? "U" : "V", " without ", U ? "V" : "U", ")");
  d.has_delta = U.has_value();
  d.rank = 0;
  if (d.has_delta) {
    TORCH_CHECK_VALUE(U->dim() == 3, op, ": U must have shape [B=", d.batch, ", Dout=", d.dout, ", r], got ",
                      shape_str(U->sizes()));
    TORCH_CHECK_VALUE(V->dim() == 3, op, ": V must have shape [B=", d.batch, ", Din=", d.din, ", r], got ",
                      shape_str(V->sizes()));
    TORCH_CHECK_VALUE(U->size(2) == V->size(2), op, ": U and V must have the same rank r, got U ",
                      shape_str(U->sizes()), " (r=", U->size(2), ") and V ", shape_str(V->sizes()), " (r=",
                      V->size(2), ")");
    d.rank = U->size(2);
    check_shape(op, "U", *U, {d.batch, d.dout, d.rank});
    check_shape(op, "V", *V, {d.batch, d.din, d.rank});
    check_same_device(op, "U", *U, x, "x");
    check_same_device(op, "V", *V, x, "x");
    check_dtype(op, "U", *U, x.scalar_type());
    check_dtype(op, "V", *V, x.scalar_type());
  }
  return d;
}

// z = x3 @ V (per sample), z contiguous [B, T, r] in the accumulation type.
at::Tensor shrink(const at::Tensor& x3, const at::Tensor& V, const Backend& backend) {
  at::Tensor z = at::empty({x3.size(0), x3.size(1), V.size(2)}, x3.options().dtype(acc_type(x3.scalar_type())));
  if (z.numel() == 0) return z;
  if (x3.size(2) == 0) return z.zero_();
  LowrankShrinkParams p{};
  p.batch = x3.size(0);
  p.seqlen = x3.size(1);
  p.dim = x3.size(2);
  p.rank = V.size(2);
  p.dtype = to_dtype(x3.scalar_type());
  p.x = x3.data_ptr();
  p.x_batch_stride = x3.stride(0);
  p.x_seq_stride = x3.stride(1);
  p.x_dim_stride = x3.stride(2);
  p.V = V.data_ptr();
  p.v_batch_stride = V.stride(0);
  p.v_dim_stride = V.stride(1);
  p.v_rank_stride = V.stride(2);
  p.z = z.data_ptr();
  backend.shrink(p);
  return z;
}

// y3 += scale * z @ U^T (per sample), in place; y3 contiguous.
void expand(const at::Tensor& z, const at::Tensor& U, double scale, at::Tensor& y3, const Backend& backend) {
  if (y3.numel() == 0 || z.size(2) == 0) return;
  TORCH_INTERNAL_ASSERT(y3.is_contiguous() && z.is_contiguous());
  LowrankExpandParams p{};
  p.batch = y3.size(0);
  p.seqlen = y3.size(1);
  p.dim = y3.size(2);
  p.rank = z.size(2);
  p.dtype = to_dtype(y3.scalar_type());
  p.scale = scale;
  p.z = z.data_ptr();
  p.U = U.data_ptr();
  p.u_batch_stride = U.stride(0);
  p.u_dim_stride = U.stride(1);
  p.u_rank_stride = U.stride(2);
  p.y = y3.data_ptr();
  backend.expand(p);
}

at::Tensor empty_like_nothing(const at::Tensor& x) { return at::empty({0}, x.options()); }

// x3 [B, T, Din] @ weight^T + bias as a contiguous [B, T, Dout]: the backend's kernel
// for at most kBaseMaxRows float32 rows of a contiguous weight (MKL's single-thread
// GEMV and small-M GEMM run at half the memory bandwidth on some CPUs, see
// benchmarks/RESULTS.md), ATen's GEMM otherwise.
at::Tensor base_projection(const at::Tensor& x3, const at::Tensor& weight, const Opt& bias, const Backend& backend) {
  const int64_t B = x3.size(0), T = x3.size(1), din = x3.size(2), dout = weight.size(0), rows = B * T;
  const bool fits = backend.base != nullptr && rows > 0 && rows <= kBaseMaxRows && dout > 0 &&
                    x3.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                    (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous())) &&
                    (din <= 1 || x3.stride(2) == 1);
  // Rows of x one stride apart: [B, T] viewed as one row dimension.
  const bool one_row_stride = T == 1 || B == 1 || x3.stride(0) == T * x3.stride(1);
  if (!fits || !one_row_stride) return at::linear(x3, weight, bias).contiguous();
  at::Tensor y3 = at::empty({B, T, dout}, x3.options());
  LowrankBaseParams p{};
  p.rows = rows, p.din = din, p.dout = dout;
  p.dtype = to_dtype(x3.scalar_type());
  p.x = x3.data_ptr();
  p.x_row_stride = T == 1 ? x3.stride(0) : x3.stride(1);
  p.weight = weight.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.y = y3.data_ptr();
  backend.base(p);
  return y3;
}

}  // namespace

at::Tensor forward(const LowrankInputs& in, double scale, const Backend& backend) {
  const Dims d = validate(kOp, in);
  const at::Tensor &x = in.x, &weight = in.weight;
  const Opt &bias = in.bias, &U = in.U, &V = in.V;
  const at::Tensor x3 = x.dim() == 3 ? x : x.unsqueeze(1);
  // The shared projection is ATen's GEMM, or the backend's own kernel for a few rows;
  // its fresh output is what the expand kernel accumulates into, so no [B, T, Dout]
  // temporary exists besides the output.
  at::Tensor y3 = base_projection(x3, weight, bias, backend);
  if (d.has_delta && d.rank > 0 && y3.numel() > 0) {
    const at::Tensor z = shrink(x3, *V, backend);
    expand(z, *U, scale, y3, backend);
  }
  return x.dim() == 3 ? y3 : y3.squeeze(1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const LowrankInputs& in, double scale, std::array<bool, 5> mask,
    const Backend& backend) {
  constexpr const char* op = "prosg.lowrank_linear_backward";
  const Dims d = validate(op, {in.x, in.weight, std::nullopt, in.U, in.V});
  const at::Tensor &x = in.x, &weight = in.weight;
  const Opt &U = in.U, &V = in.V;
  if (x.dim() == 3) {
    check_shape(op, "grad_out", grad_out, {d.batch, d.seqlen, d.dout});
  } else {
    check_shape(op, "grad_out", grad_out, {d.batch, d.dout});
  }
  check_same_device(op, "grad_out", grad_out, x, "x");
  check_dtype(op, "grad_out", grad_out, x.scalar_type());

  const at::Tensor x3 = x.dim() == 3 ? x : x.unsqueeze(1);
  const at::Tensor g3 = grad_out.dim() == 3 ? grad_out : grad_out.unsqueeze(1);
  at::Tensor gx = empty_like_nothing(x), gw = empty_like_nothing(x), gb = empty_like_nothing(x);
  at::Tensor gu = empty_like_nothing(x), gv = empty_like_nothing(x);

  // dL/dx = g (W + scale U_b V_b^T) = g W + scale (g U_b) V_b^T;
  // dL/dU_b = scale g_b^T (x_b V_b);  dL/dV_b = scale x_b^T (g_b U_b).
  // gz = g U_b serves both dL/dx and dL/dV, so it is computed once.
  const bool delta = d.has_delta && d.rank > 0;
  const at::Tensor gz = delta && (mask[0] || mask[4]) ? shrink(g3, *U, backend) : at::Tensor();
  if (mask[0]) {
    at::Tensor gx3 = at::linear(g3, weight.t()).contiguous();
    if (gz.defined() && gx3.numel() > 0) expand(gz, *V, scale, gx3, backend);
    gx = x.dim() == 3 ? gx3 : gx3.squeeze(1);
  }
  if (mask[1] || mask[2]) {
    // Explicit row count: reshape(-1, 0) is ambiguous when Dout or Din is 0.
    const int64_t rows = d.batch * d.seqlen;
    const at::Tensor g2 = g3.reshape({rows, d.dout});
    if (mask[1]) gw = at::mm(g2.t(), x3.reshape({rows, d.din}));
    if (mask[2]) gb = g2.sum(0);
  }
  if (d.has_delta) {
    const auto acc = acc_type(x.scalar_type());
    if (mask[3]) {
      gu = delta ? at::bmm(g3.transpose(1, 2).to(acc), shrink(x3, *V, backend)).mul_(scale).to(x.scalar_type())
                 : at::zeros_like(*U, at::MemoryFormat::Contiguous);
    }
    if (mask[4]) {
      gv = delta ? at::bmm(x3.transpose(1, 2).to(acc), gz).mul_(scale).to(x.scalar_type())
                 : at::zeros_like(*V, at::MemoryFormat::Contiguous);
    }
  }
  return {gx, gw, gb, gu, gv};
}

}  // namespace prosg::lowrank
