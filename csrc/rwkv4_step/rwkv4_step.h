// Host side of the fused RWKV-4 decode steps, shared by the CPU and CUDA
// registrations: validation, the projections (ATen GEMMs plus the lowrank_linear
// shrink/expand kernels for per-sample deltas) and the two element kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

#include "common/torch_utils.h"
#include "lowrank_linear/lowrank_linear.h"
#include "rwkv4_step/rwkv4_step_params.h"

namespace prosg::rwkv4_step {

struct Backend {
  void (*mix)(const Rwkv4MixParams&);
  void (*gate)(const Rwkv4GateParams&);
  const lowrank::Backend& lowrank;
};

using OptList = c10::List<std::optional<at::Tensor>>;

// The arguments of rwkv4_time_mix_step, as the schema orders them, built once per call.
struct TimeMixInputs {
  const at::Tensor& x;      // [B, H], one token per sample
  const at::Tensor& shift;  // [B, H], the previous token's x
  const at::Tensor& wkv_state;  // [B, 3, C], accumulation type
  const at::Tensor &time_mix_key, &time_mix_value, &time_mix_receptance;  // H elements each
  const at::Tensor &time_decay, &time_first;                            // [C]
  const at::Tensor &key_weight, &value_weight, &receptance_weight;      // [C, H]
  const at::Tensor& output_weight;                                      // [H, C]
  const OptList& deltas;  // (U, V) per projection: key, value, receptance, output; or empty
};

// The arguments of rwkv4_channel_mix_step, as the schema orders them.
struct ChannelMixInputs {
  const at::Tensor &x, &shift;                         // [B, H]
  const at::Tensor &time_mix_key, &time_mix_receptance;  // H elements each
  const at::Tensor& key_weight;         // [F, H]
  const at::Tensor& receptance_weight;  // [H, H]
  const at::Tensor& value_weight;       // [H, F]
  const OptList& deltas;  // (U, V) per projection: key, receptance, value; or empty
};

std::tuple<at::Tensor, at::Tensor> time_mix_step(const TimeMixInputs& in, double scale, const Backend& backend);
at::Tensor channel_mix_step(const ChannelMixInputs& in, double scale, const Backend& backend);

// The registered functions, with the schema's argument lists (bindings/torch_bindings.cpp);
// each backend registers these with its kernels.
template <const Backend& kBackend>
std::tuple<at::Tensor, at::Tensor> time_mix_step_op(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& wkv_state, const at::Tensor& time_mix_key,
    const at::Tensor& time_mix_value, const at::Tensor& time_mix_receptance, const at::Tensor& time_decay,
    const at::Tensor& time_first, const at::Tensor& key_weight, const at::Tensor& value_weight,
    const at::Tensor& receptance_weight, const at::Tensor& output_weight, const OptList& deltas, double scale) {
  const auto guard = device_guard_for(x);
  return time_mix_step({x, shift, wkv_state, time_mix_key, time_mix_value, time_mix_receptance, time_decay,
                        time_first, key_weight, value_weight, receptance_weight, output_weight, deltas},
                       scale, kBackend);
}

template <const Backend& kBackend>
at::Tensor channel_mix_step_op(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& time_mix_key,
                               const at::Tensor& time_mix_receptance, const at::Tensor& key_weight,
                               const at::Tensor& receptance_weight, const at::Tensor& value_weight,
                               const OptList& deltas, double scale) {
  const auto guard = device_guard_for(x);
  return channel_mix_step({x, shift, time_mix_key, time_mix_receptance, key_weight, receptance_weight, value_weight,
                           deltas},
                          scale, kBackend);
}

}  // namespace prosg::rwkv4_step
