// Host side of lowrank_linear shared by the CPU and CUDA registrations: argument
// validation, the shared GEMM, and the backward formulas. The per-sample low-rank
// part is delegated to a backend's hand-written shrink/expand kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/torch_utils.h"
#include "lowrank_linear/lowrank_linear_params.h"

namespace prosg::lowrank {

using Opt = std::optional<at::Tensor>;

// The op's tensor arguments, as the schema orders them, built once per call.
struct LowrankInputs {
  const at::Tensor& x;       // [B, T, Din] or [B, Din]
  const at::Tensor& weight;  // [Dout, Din]
  const Opt& bias;           // [Dout] or none
  const Opt& U;              // [B, Dout, r] or none (no delta)
  const Opt& V;              // [B, Din, r], with U
};

struct Backend {
  void (*shrink)(const LowrankShrinkParams&);
  void (*expand)(const LowrankExpandParams&);
  // The shared projection of at most kBaseMaxRows float32 rows, or null: ATen's GEMM.
  void (*base)(const LowrankBaseParams&) = nullptr;
};

// Rows up to which a backend's `base` kernel replaces ATen's GEMM (decoding a batch).
constexpr int64_t kBaseMaxRows = 16;

// The registered backends, for other ops' host code that runs perturbed projections.
const Backend& cpu_backend();
const Backend& cuda_backend();  // defined only in CUDA builds

at::Tensor forward(const LowrankInputs& in, double scale, const Backend& backend);

// Gradients (x, weight, bias, U, V) for those `output_mask` asks for; in.bias is not used.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const LowrankInputs& in, double scale, std::array<bool, 5> output_mask,
    const Backend& backend);

// The registered functions, with the schema's argument lists (bindings/torch_bindings.cpp);
// each backend registers these with its kernels.
template <const Backend& kBackend>
at::Tensor forward_op(const at::Tensor& x, const at::Tensor& weight, const Opt& bias, const Opt& U, const Opt& V,
                      double scale) {
  const auto guard = device_guard_for(x);
  return forward({x, weight, bias, U, V}, scale, kBackend);
}

template <const Backend& kBackend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const Opt& U, const Opt& V,
    double scale, std::array<bool, 5> mask) {
  const auto guard = device_guard_for(x);
  return backward(grad_out, {x, weight, std::nullopt, U, V}, scale, mask, kBackend);
}

}  // namespace prosg::lowrank
