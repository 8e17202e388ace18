// Host side of lowrank_linear shared by the CPU and CUDA registrations: argument
// validation, the shared GEMM, and the backward formulas. The per-sample low-rank
// part is delegated to a backend's hand-written shrink/expand kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "lowrank_linear/lowrank_params.h"

namespace prosg::lowrank {

struct Backend {
  void (*shrink)(const LowrankShrinkParams&);
  void (*expand)(const LowrankExpandParams&);
};

// The registered backends, for other ops' host code that runs perturbed projections.
const Backend& cpu_backend();
const Backend& cuda_backend();  // defined only in CUDA builds

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& U, const std::optional<at::Tensor>& V, double scale,
                   const Backend& backend);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& U,
    const std::optional<at::Tensor>& V, double scale, std::array<bool, 5> output_mask, const Backend& backend);

}  // namespace prosg::lowrank
