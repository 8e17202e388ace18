// Host side of wkv4 shared by the CPU and CUDA registrations: validation, buffers,
// and the reductions of the per-sample parameter gradients.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "wkv4/wkv4_params.h"

namespace prosg::wkv4 {

struct Backend {
  void (*forward)(const Wkv4Params&);
  void (*backward)(const Wkv4Params&);
};

using Opt = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& time_decay, const at::Tensor& time_first,
                                           const at::Tensor& key, const at::Tensor& value, const Opt& state,
                                           const Opt& key_z, const Opt& key_u, const Opt& value_z,
                                           const Opt& value_u, const Backend& backend);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& key, const at::Tensor& value,
    const Opt& state, const Opt& key_z, const Opt& key_u, const Opt& value_z, const Opt& value_u,
    const at::Tensor& grad_out, const at::Tensor& grad_state_out, const Backend& backend);

}  // namespace prosg::wkv4
