#include "rwkv4_step/rwkv4_step.h"

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/torch_utils.h"

namespace prosg::rwkv4_step {
namespace {

using Opt = std::optional<at::Tensor>;

at::ScalarType acc_type(const at::Tensor& t) { return prosg::acc_type(t.scalar_type()); }

void check_input(const char* op, const at::Tensor& x, const at::Tensor& shift) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape [B, H] (one token per sample), got ",
                    shape_str(x.sizes()));
  check_floating(op, "x", x, x.is_cpu());
  check_shape(op, "shift", shift, {x.size(0), x.size(1)});
  check_same_device(op, "shift", shift, x, "x");
  check_dtype(op, "shift", shift, x.scalar_type());
}

void check_weight(const char* op, const char* name, const at::Tensor& w, int64_t rows, int64_t cols,
                  const at::Tensor& x) {
  check_shape(op, name, w, {rows, cols});
  check_same_device(op, name, w, x, "x");
  check_dtype(op, name, w, x.scalar_type());
}

// The time_mix_* parameters ([1, 1, H] in the model, any shape of H elements) as one
// contiguous [n, H] tensor in the accumulation type.
at::Tensor stack_mixes(const char* op, const std::vector<std::pair<const char*, at::Tensor>>& mixes,
                       const at::Tensor& x) {
  std::vector<at::Tensor> rows;
  for (const auto& [name, m] : mixes) {
    TORCH_CHECK_VALUE(m.numel() == x.size(1), op, ": ", name, " must have H=", x.size(1), " elements, got shape ",
                      shape_str(m.sizes()));
    check_same_device(op, name, m, x, "x");
    rows.push_back(m.reshape({x.size(1)}).to(acc_type(x)));
  }
  return at::stack(rows).contiguous();
}

// The pair (U, V) at deltas[2i], deltas[2i+1], checked: both or neither.
std::pair<Opt, Opt> delta_pair(const char* op, const OptList& deltas, size_t i, const char* what) {
  if (deltas.size() == 0) return {std::nullopt, std::nullopt};
  Opt U = deltas.get(2 * i), V = deltas.get(2 * i + 1);
  TORCH_CHECK_VALUE(U.has_value() == V.has_value(), op, ": the ", what, " delta needs both U and V (deltas[",
                    2 * i, "] and deltas[", 2 * i + 1, "]), got only ", U ? "U" : "V");
  return {U, V};
}

void check_delta_count(const char* op, const OptList& deltas, size_t pairs) {
  TORCH_CHECK_VALUE(deltas.size() == 0 || deltas.size() == 2 * pairs, op, ": deltas must be empty or hold ",
                    2 * pairs, " entries (U, V per projection, None for none), got ", deltas.size());
}

at::Tensor mix(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& mixes, const Backend& backend) {
  const at::Tensor xc = x.contiguous(), sc = shift.contiguous();
  at::Tensor out = at::empty({mixes.size(0), x.size(0), x.size(1)}, x.options());
  if (out.numel() == 0) return out;
  Rwkv4MixParams p;
  p.batch = x.size(0);
  p.hidden = x.size(1);
  p.n_mix = mixes.size(0);
  p.dtype = to_dtype(x.scalar_type());
  p.x = xc.data_ptr();
  p.shift = sc.data_ptr();
  p.mix = mixes.data_ptr();
  p.out = out.data_ptr();
  backend.mix(p);
  return out;
}

at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const std::pair<Opt, Opt>& uv, double scale,
                   const Backend& backend) {
  return lowrank::forward({x, weight, std::nullopt, uv.first, uv.second}, scale, backend.lowrank);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> time_mix_step(const TimeMixInputs& in, double scale, const Backend& backend) {
  constexpr const char* op = "prosg.rwkv4_time_mix_step";
  const at::Tensor &x = in.x, &shift = in.shift, &wkv_state = in.wkv_state, &time_decay = in.time_decay,
                   &time_first = in.time_first, &key_weight = in.key_weight, &value_weight = in.value_weight,
                   &receptance_weight = in.receptance_weight, &output_weight = in.output_weight;
  const OptList& deltas = in.deltas;
  check_input(op, x, shift);
  const int64_t B = x.size(0), H = x.size(1);
  TORCH_CHECK_VALUE(key_weight.dim() == 2, op, ": key_weight must have shape [C, H=", H, "], got ",
                    shape_str(key_weight.sizes()));
  const int64_t C = key_weight.size(0);
  check_weight(op, "key_weight", key_weight, C, H, x);
  check_weight(op, "value_weight", value_weight, C, H, x);
  check_weight(op, "receptance_weight", receptance_weight, C, H, x);
  check_weight(op, "output_weight", output_weight, H, C, x);
  check_shape(op, "wkv_state", wkv_state, {B, 3, C});
  check_same_device(op, "wkv_state", wkv_state, x, "x");
  check_dtype(op, "wkv_state", wkv_state, acc_type(x));
  check_shape(op, "time_decay", time_decay, {C});
  check_shape(op, "time_first", time_first, {C});
  check_same_device(op, "time_decay", time_decay, x, "x");
  check_same_device(op, "time_first", time_first, x, "x");
  check_delta_count(op, deltas, 4);
  const auto dk = delta_pair(op, deltas, 0, "key"), dv = delta_pair(op, deltas, 1, "value");
  const auto dr = delta_pair(op, deltas, 2, "receptance"), dout = delta_pair(op, deltas, 3, "output");
  const at::Tensor mixes =
      stack_mixes(op, {{"time_mix_key", in.time_mix_key}, {"time_mix_value", in.time_mix_value},
                       {"time_mix_receptance", in.time_mix_receptance}}, x);

  const at::Tensor xs = mix(x, shift, mixes, backend);  // [3, B, H]: xk, xv, xr
  const at::Tensor k = project(xs[0], key_weight, dk, scale, backend).contiguous();
  const at::Tensor v = project(xs[1], value_weight, dv, scale, backend).contiguous();
  const at::Tensor r = project(xs[2], receptance_weight, dr, scale, backend).contiguous();
  const at::Tensor w = time_decay.to(acc_type(x)).exp().neg_().contiguous();
  const at::Tensor u = time_first.to(acc_type(x)).contiguous();
  const at::Tensor s = wkv_state.contiguous();
  at::Tensor gated = at::empty({B, C}, x.options());
  at::Tensor state_out = at::empty({B, 3, C}, s.options());
  if (B > 0 && C > 0) {
    Rwkv4GateParams p;
    p.batch = B;
    p.channels = C;
    p.dtype = to_dtype(x.scalar_type());
    p.w = w.data_ptr();
    p.u = u.data_ptr();
    p.key = k.data_ptr();
    p.value = v.data_ptr();
    p.receptance = r.data_ptr();
    p.state_in = s.data_ptr();
    p.state_out = state_out.data_ptr();
    p.out = gated.data_ptr();
    backend.gate(p);
  }
  return {project(gated, output_weight, dout, scale, backend), state_out};
}

at::Tensor channel_mix_step(const ChannelMixInputs& in, double scale, const Backend& backend) {
  constexpr const char* op = "prosg.rwkv4_channel_mix_step";
  const at::Tensor &x = in.x, &shift = in.shift, &key_weight = in.key_weight,
                   &receptance_weight = in.receptance_weight, &value_weight = in.value_weight;
  const OptList& deltas = in.deltas;
  check_input(op, x, shift);
  const int64_t H = x.size(1);
  TORCH_CHECK_VALUE(key_weight.dim() == 2, op, ": key_weight must have shape [F, H=", H, "], got ",
                    shape_str(key_weight.sizes()));
  const int64_t F = key_weight.size(0);
  check_weight(op, "key_weight", key_weight, F, H, x);
  check_weight(op, "receptance_weight", receptance_weight, H, H, x);
  check_weight(op, "value_weight", value_weight, H, F, x);
  check_delta_count(op, deltas, 3);
  const auto dk = delta_pair(op, deltas, 0, "key"), dr = delta_pair(op, deltas, 1, "receptance");
  const auto dv = delta_pair(op, deltas, 2, "value");
  const at::Tensor mixes =
      stack_mixes(op, {{"time_mix_key", in.time_mix_key}, {"time_mix_receptance", in.time_mix_receptance}}, x);

  const at::Tensor xs = mix(x, shift, mixes, backend);  // [2, B, H]: xk, xr
  at::Tensor k = project(xs[0], key_weight, dk, scale, backend);
  k.relu_();
  k.mul_(k);  // squared ReLU
  const at::Tensor v = project(k, value_weight, dv, scale, backend);
  at::Tensor r = project(xs[1], receptance_weight, dr, scale, backend);
  return r.sigmoid_().mul_(v);
}

}  // namespace prosg::rwkv4_step
