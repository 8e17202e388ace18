// Host side of the fused RWKV-4 decode steps, shared by the CPU and CUDA
// registrations: validation, the projections (ATen GEMMs plus the lowrank_linear
// shrink/expand kernels for per-sample deltas) and the two element kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

#include "lowrank_linear/lowrank_linear.h"
#include "rwkv4_step/rwkv4_step_params.h"

namespace prosg::rwkv4_step {

struct Backend {
  void (*mix)(const Rwkv4MixParams&);
  void (*gate)(const Rwkv4GateParams&);
  const lowrank::Backend& lowrank;
};

using OptList = c10::List<std::optional<at::Tensor>>;

std::tuple<at::Tensor, at::Tensor> time_mix_step(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& wkv_state, const at::Tensor& time_mix_key,
    const at::Tensor& time_mix_value, const at::Tensor& time_mix_receptance, const at::Tensor& time_decay,
    const at::Tensor& time_first, const at::Tensor& key_weight, const at::Tensor& value_weight,
    const at::Tensor& receptance_weight, const at::Tensor& output_weight, const OptList& deltas, double scale,
    const Backend& backend);

at::Tensor channel_mix_step(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& time_mix_key,
                            const at::Tensor& time_mix_receptance, const at::Tensor& key_weight,
                            const at::Tensor& receptance_weight, const at::Tensor& value_weight,
                            const OptList& deltas, double scale, const Backend& backend);

}  // namespace prosg::rwkv4_step
