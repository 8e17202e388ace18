// Host side of the fused RWKV-7 decode steps, shared by the CPU and CUDA registrations.
// Time mix: validation, the mix kernel, the projections (lowrank_linear for per-sample
// deltas), the low-rank MLPs (the backend's single-row kernel or ATen GEMMs), then the
// backend's rest of the step (see Backend). Channel mix: the mix kernel and two
// projections around the squared ReLU.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

#include "common/torch_utils.h"
#include "lowrank_linear/lowrank_linear.h"
#include "rwkv7_step/rwkv7_step_params.h"
#include "wkv7/wkv7.h"

namespace prosg::rwkv7_step {

using Opt = std::optional<at::Tensor>;
using OptList = c10::List<std::optional<at::Tensor>>;

// A backend runs either `step` (prepare, the state update and output in one pass: the
// CPU's) or, when `step` is null, `prepare`, wkv7's own kernel with T = 1 and `output`
// one after another (the CUDA backend's).
struct Backend {
  void (*mix)(const Rwkv7MixParams&);
  void (*prepare)(const Rwkv7PrepareParams&);
  void (*output)(const Rwkv7OutputParams&);
  const wkv7::Backend& wkv7;
  const lowrank::Backend& lowrank;
  void (*step)(const Rwkv7StepParams&) = nullptr;
  // The low-rank MLPs of a single float32 row in one call (null: ATen GEMMs always).
  void (*row_mlps)(const Rwkv7MlpParams&) = nullptr;
};

// The arguments of rwkv7_time_mix_step, as the schema orders them, built once per call.
// C = H * N channels; the model's parameter names (prosg/models/rwkv7.py).
struct TimeMixInputs {
  const at::Tensor& x;          // [B, C] the ln1 output, one token per sample
  const at::Tensor& shift;      // [B, C] the previous token's
  const at::Tensor& wkv_state;  // [B, H, N, N] accumulation type
  const Opt& v_first;           // [B, C] layer 0's value; none in layer 0
  const at::Tensor &x_r, &x_w, &x_k, &x_v, &x_a, &x_g;  // C elements each
  const at::Tensor &w0, &w1, &w2;  // [C], [C, Dw], [Dw, C]: x's dtype or the accumulation type
  const at::Tensor &a0, &a1, &a2;  // [C], [C, Da], [Da, C]
  const at::Tensor &g1, &g2;       // [C, Dg], [Dg, C]
  const Opt &v0, &v1, &v2;         // [C], [C, Dv], [Dv, C]: with v_first, else none
  const at::Tensor &k_k, &k_a;     // C elements each
  const at::Tensor& r_k;           // [H, N]: gives H and N
  const at::Tensor &receptance_weight, &key_weight, &value_weight, &output_weight;  // [C, C]
  const at::Tensor &ln_x_weight, &ln_x_bias;  // C elements each
  double ln_x_eps;
  const OptList& deltas;  // (U, V) per projection: key, value, receptance, output; or empty
};

// (out [B, C], wkv_state [B, H, N, N], v [B, C]: this layer's value projection, which
// in layer 0 is the v_first of the later layers).
std::tuple<at::Tensor, at::Tensor, at::Tensor> time_mix_step(const TimeMixInputs& in, double scale,
                                                             const Backend& backend);

// The arguments of rwkv7_channel_mix_step.
struct ChannelMixInputs {
  const at::Tensor& x;             // [B, C] the ln2 output, one token per sample
  const at::Tensor& shift;         // [B, C] the previous token's
  const at::Tensor& x_k;           // C elements
  const at::Tensor& key_weight;    // [F, C]
  const at::Tensor& value_weight;  // [C, F]
  const OptList& deltas;           // (U, V) for key, value; or empty
};

// value(relu(key(x + (shift - x) x_k))^2): [B, C].
at::Tensor channel_mix_step(const ChannelMixInputs& in, double scale, const Backend& backend);

// The registered functions, with the schemas' argument lists (bindings/torch_bindings.cpp).
template <const Backend& kBackend>
at::Tensor channel_mix_step_op(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& x_k,
                               const at::Tensor& key_weight, const at::Tensor& value_weight, const OptList& deltas,
                               double scale) {
  const auto guard = device_guard_for(x);
  return channel_mix_step({x, shift, x_k, key_weight, value_weight, deltas}, scale, kBackend);
}

template <const Backend& kBackend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> time_mix_step_op(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& wkv_state, const Opt& v_first,
    const at::Tensor& x_r, const at::Tensor& x_w, const at::Tensor& x_k, const at::Tensor& x_v,
    const at::Tensor& x_a, const at::Tensor& x_g, const at::Tensor& w0, const at::Tensor& w1, const at::Tensor& w2,
    const at::Tensor& a0, const at::Tensor& a1, const at::Tensor& a2, const at::Tensor& g1, const at::Tensor& g2,
    const Opt& v0, const Opt& v1, const Opt& v2, const at::Tensor& k_k, const at::Tensor& k_a,
    const at::Tensor& r_k, const at::Tensor& receptance_weight, const at::Tensor& key_weight,
    const at::Tensor& value_weight, const at::Tensor& output_weight, const at::Tensor& ln_x_weight,
    const at::Tensor& ln_x_bias, double ln_x_eps, const OptList& deltas, double scale) {
  const auto guard = device_guard_for(x);
  return time_mix_step({x, shift, wkv_state, v_first, x_r, x_w, x_k, x_v, x_a, x_g, w0, w1, w2, a0, a1, a2, g1, g2,
                        v0, v1, v2, k_k, k_a, r_k, receptance_weight, key_weight, value_weight, output_weight,
                        ln_x_weight, ln_x_bias, ln_x_eps, deltas},
                       scale, kBackend);
}

}  // namespace prosg::rwkv7_step
