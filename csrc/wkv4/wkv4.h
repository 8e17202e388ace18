// Host side of wkv4 shared by the CPU and CUDA registrations: the op's arguments as one
// inputs struct, validation, buffers, and the reductions of the per-sample parameter
// gradients. A backend supplies only the two kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/torch_utils.h"
#include "wkv4/wkv4_params.h"

namespace prosg::wkv4 {

using Opt = std::optional<at::Tensor>;

// One optional rank-r perturbation: the effective x[b,t,c] = x + sum_j z[b,t,j] U[b,c,j].
struct LowRankArg {
  const Opt& z;  // [B, T, r]
  const Opt& U;  // [B, C, r]
};

// The op's tensor arguments, as the schema orders them, built once per call.
struct Wkv4Inputs {
  const at::Tensor& time_decay;  // [C]
  const at::Tensor& time_first;  // [C]
  const at::Tensor& key;         // [B, T, C]
  const at::Tensor& value;       // [B, T, C]
  const Opt& state;              // [B, 3, C] in the accumulation type, or none
  LowRankArg key_lr, value_lr;
};

struct Backend {
  void (*forward)(const Wkv4Params&);
  void (*backward)(const Wkv4Params&);
};

std::tuple<at::Tensor, at::Tensor> forward(const Wkv4Inputs& in, const Backend& backend);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const Wkv4Inputs& in,
                                                                                const at::Tensor& grad_out,
                                                                                const at::Tensor& grad_state_out,
                                                                                const Backend& backend);

// The registered functions, with the schema's argument lists (bindings/torch_bindings.cpp);
// each backend registers these with its kernels.
template <const Backend& kBackend>
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& time_decay, const at::Tensor& time_first,
                                              const at::Tensor& key, const at::Tensor& value, const Opt& state,
                                              const Opt& key_z, const Opt& key_u, const Opt& value_z,
                                              const Opt& value_u) {
  const auto guard = device_guard_for(key);
  return forward({time_decay, time_first, key, value, state, {key_z, key_u}, {value_z, value_u}}, kBackend);
}

template <const Backend& kBackend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& key, const at::Tensor& value,
    const Opt& state, const Opt& key_z, const Opt& key_u, const Opt& value_z, const Opt& value_u,
    const at::Tensor& grad_out, const at::Tensor& grad_state_out) {
  const auto guard = device_guard_for(key);
  return backward({time_decay, time_first, key, value, state, {key_z, key_u}, {value_z, value_u}}, grad_out,
                  grad_state_out, kBackend);
}

}  // namespace prosg::wkv4
