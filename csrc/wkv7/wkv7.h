// Host side of wkv7 shared by the CPU and CUDA registrations: the op's arguments as one
// inputs struct, validation, buffers and the params. A backend supplies only the two
// kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common/torch_utils.h"
#include "wkv7/wkv7_params.h"

namespace prosg::wkv7 {

using Opt = std::optional<at::Tensor>;

// The op's tensor arguments, as the schema orders them, built once per call.
struct Wkv7Inputs {
  const at::Tensor& r;  // [B, T, H, N] receptance
  const at::Tensor& w;  // [B, T, H, N] log-log decay: d = exp(-exp(w))
  const at::Tensor& k;  // [B, T, H, N] key
  const at::Tensor& v;  // [B, T, H, N] value
  const at::Tensor& a;  // [B, T, H, N] the rank-one pair: S <- S (diag(d) + a b^T) + v k^T
  const at::Tensor& b;  // [B, T, H, N]
  const Opt& state;     // [B, H, N, N] [value, key] in the accumulation type, or none (zeros)
};

struct Backend {
  void (*forward)(const Wkv7Params&);
  void (*backward)(const Wkv7Params&);
};

// The registered backends, for other ops' host code that runs the recurrence
// (rwkv7_step).
const Backend& cpu_backend();
const Backend& cuda_backend();  // defined only in CUDA builds

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> forward(const Wkv7Inputs& in, const Backend& backend);

Grads backward(const Wkv7Inputs& in, const at::Tensor& grad_out, const at::Tensor& grad_state_out,
               const Backend& backend);

// The registered functions, with the schema's argument lists (bindings/torch_bindings.cpp);
// each backend registers these with its kernels.
template <const Backend& kBackend>
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& a, const at::Tensor& b,
                                              const Opt& state) {
  const auto guard = device_guard_for(r);
  return forward({r, w, k, v, a, b, state}, kBackend);
}

template <const Backend& kBackend>
Grads backward_op(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& a, const at::Tensor& b, const Opt& state, const at::Tensor& grad_out,
                  const at::Tensor& grad_state_out) {
  const auto guard = device_guard_for(r);
  return backward({r, w, k, v, a, b, state}, grad_out, grad_state_out, kBackend);
}

}  // namespace prosg::wkv7
