#include "rwkv7_step/rwkv7_step.h"

#include <ATen/ATen.h>

#include <string>
#include <utility>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "wkv7/wkv7_math.h"

namespace prosg::rwkv7_step {
namespace {

constexpr const char* kOp = "prosg.rwkv7_time_mix_step";
constexpr const char* kChannelMixOp = "prosg.rwkv7_channel_mix_step";

struct Dims {
  int64_t batch, channels, heads, head_size;
  at::ScalarType dtype, acc;
};

// A per-channel parameter: C elements in any shape, any floating dtype (read in the
// accumulation type), on x's device.
void check_vector(const char* name, const at::Tensor& t, const Dims& d, const at::Tensor& x,
                  const char* op = kOp) {
  TORCH_CHECK_VALUE(t.numel() == d.channels, op, ": ", name, " must have C=", d.channels,
                    " elements, got shape ", shape_str(t.sizes()));
  check_same_device(op, name, t, x, "x");
  check_floating(op, name, t, /*allow_double=*/t.is_cpu());
}

void check_matrix(const char* name, const at::Tensor& t, int64_t rows, int64_t cols, at::ScalarType dtype,
                  const at::Tensor& x, const char* op = kOp) {
  check_shape(op, name, t, {rows, cols});
  check_same_device(op, name, t, x, "x");
  check_dtype(op, name, t, dtype);
}

// x [B, C] (one token per sample) and shift like it; the common start of both steps.
void check_token_rows(const char* op, const at::Tensor& x, const at::Tensor& shift) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape [B, C] (one token per sample), got ",
                    shape_str(x.sizes()));
  check_floating(op, "x", x, /*allow_double=*/x.is_cpu());
  check_shape(op, "shift", shift, {x.size(0), x.size(1)});
  check_same_device(op, "shift", shift, x, "x");
  check_dtype(op, "shift", shift, x.scalar_type());
}

// A low-rank MLP's pair: first [C, D] (D read from it), second [D, C], both `dtype`.
void check_mlp(const char* first_name, const at::Tensor& first, const char* second_name, const at::Tensor& second,
               at::ScalarType dtype, const Dims& d, const at::Tensor& x) {
  TORCH_CHECK_VALUE(first.dim() == 2, kOp, ": ", first_name, " must have shape [C=", d.channels, ", D], got ",
                    shape_str(first.sizes()));
  const int64_t D = first.size(1);
  check_matrix(first_name, first, d.channels, D, dtype, x);
  check_matrix(second_name, second, D, d.channels, dtype, x);
}

// The pair (U, V) at deltas[2i], deltas[2i+1], checked: both or neither.
std::pair<Opt, Opt> delta_pair(const OptList& deltas, size_t i, const char* what, const char* op = kOp) {
  if (deltas.size() == 0) return {std::nullopt, std::nullopt};
  Opt U = deltas.get(2 * i), V = deltas.get(2 * i + 1);
  TORCH_CHECK_VALUE(U.has_value() == V.has_value(), op, ": the ", what, " delta needs both U and V (deltas[",
                    2 * i, "] and deltas[", 2 * i + 1, "]), got only ", U ? "U" : "V");
  return {U, V};
}

Dims validate(const TimeMixInputs& in) {
  const at::Tensor& x = in.x;
  check_token_rows(kOp, x, in.shift);
  const int64_t B = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(in.r_k.dim() == 2 && in.r_k.size(0) * in.r_k.size(1) == C, kOp,
                    ": r_k must have shape [H, N] with H * N = C=", C, ", got ", shape_str(in.r_k.sizes()));
  Dims d{B, C, in.r_k.size(0), in.r_k.size(1), x.scalar_type(), acc_type(x.scalar_type())};
  TORCH_CHECK_VALUE(wkv7::supported_head_size(d.head_size), kOp,
                    ": the head size N (r_k's last dimension) must be 16, 32, 64 or 128, got ", d.head_size);
  check_same_device(kOp, "r_k", in.r_k, x, "x");
  check_floating(kOp, "r_k", in.r_k, /*allow_double=*/in.r_k.is_cpu());
  check_shape(kOp, "wkv_state", in.wkv_state, {B, d.heads, d.head_size, d.head_size});
  check_same_device(kOp, "wkv_state", in.wkv_state, x, "x");
  check_dtype(kOp, "wkv_state", in.wkv_state, d.acc);

  const bool residual = in.v_first.has_value();
  const std::pair<const char*, const Opt*> value_residual[] = {{"v0", &in.v0}, {"v1", &in.v1}, {"v2", &in.v2}};
  for (const auto& [name, t] : value_residual) {
    TORCH_CHECK_VALUE(t->has_value() == residual, kOp,
                      ": v_first, v0, v1 and v2 come together (layers after the first) or not at all (layer 0); "
                      "got v_first ", residual ? "with" : "without", " ", name);
  }
  if (residual) {
    check_shape(kOp, "v_first", *in.v_first, {B, C});
    check_same_device(kOp, "v_first", *in.v_first, x, "x");
    check_dtype(kOp, "v_first", *in.v_first, x.scalar_type());
  }
  const std::pair<const char*, const at::Tensor*> vectors[] = {
      {"x_r", &in.x_r}, {"x_w", &in.x_w}, {"x_k", &in.x_k}, {"x_v", &in.x_v}, {"x_a", &in.x_a},
      {"x_g", &in.x_g}, {"w0", &in.w0}, {"a0", &in.a0}, {"k_k", &in.k_k}, {"k_a", &in.k_a},
      {"ln_x_weight", &in.ln_x_weight}, {"ln_x_bias", &in.ln_x_bias}};
  for (const auto& [name, t] : vectors) check_vector(name, *t, d, x);
  if (residual) check_vector("v0", *in.v0, d, x);

  // The decay's MLP may be kept in the accumulation type for a 16-bit model.
  TORCH_CHECK_VALUE(in.w1.scalar_type() == x.scalar_type() || in.w1.scalar_type() == d.acc, kOp,
                    ": w1 must have x's dtype (", x.scalar_type(), ") or ", d.acc, ", got ", in.w1.scalar_type());
  check_mlp("w1", in.w1, "w2", in.w2, in.w1.scalar_type(), d, x);
  check_mlp("a1", in.a1, "a2", in.a2, x.scalar_type(), d, x);
  check_mlp("g1", in.g1, "g2", in.g2, x.scalar_type(), d, x);
  if (residual) check_mlp("v1", *in.v1, "v2", *in.v2, x.scalar_type(), d, x);
  check_matrix("receptance_weight", in.receptance_weight, C, C, x.scalar_type(), x);
  check_matrix("key_weight", in.key_weight, C, C, x.scalar_type(), x);
  check_matrix("value_weight", in.value_weight, C, C, x.scalar_type(), x);
  check_matrix("output_weight", in.output_weight, C, C, x.scalar_type(), x);
  TORCH_CHECK_VALUE(in.ln_x_eps > 0, kOp, ": ln_x_eps must be positive, got ", in.ln_x_eps);
  TORCH_CHECK_VALUE(in.deltas.size() == 0 || in.deltas.size() == 8, kOp,
                    ": deltas must be empty or hold 8 entries (U, V per projection, None for none), got ",
                    in.deltas.size());
  return d;
}

// A contiguous [C] copy of a per-channel parameter in the accumulation type (a view
// when it already is one).
at::Tensor channel_vector(const at::Tensor& t, const Dims& d) {
  // The usual case (a contiguous float32 parameter) without the three no-op dispatches.
  if (t.scalar_type() == d.acc && t.is_contiguous()) return t;
  return t.reshape({d.channels}).to(d.acc).contiguous();
}

// The backend's mix kernel: out[m] = x + (shift - x) * mixes[m] for m < n_mix, [n_mix, B, C]
// in x's dtype; `mixes` holds n_mix * C contiguous values of the accumulation type.
at::Tensor token_shift_mixes(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& mixes, int64_t n_mix,
                             const Backend& backend) {
  const int64_t B = x.size(0), C = x.size(1);
  at::Tensor out = at::empty({n_mix, B, C}, x.options());
  if (out.numel() > 0) {
    const at::Tensor xc = x.contiguous(), sc = shift.contiguous();
    Rwkv7MixParams p;
    p.batch = B;
    p.channels = C;
    p.n_mix = n_mix;
    p.dtype = to_dtype(x.scalar_type());
    p.x = xc.data_ptr();
    p.shift = sc.data_ptr();
    p.mix = mixes.data_ptr();
    p.out = out.data_ptr();
    backend.mix(p);
  }
  return out;
}

at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const std::pair<Opt, Opt>& uv, double scale,
                   const Backend& backend) {
  return lowrank::forward({x, weight, std::nullopt, uv.first, uv.second}, scale, backend.lowrank);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> time_mix_step(const TimeMixInputs& in, double scale,
                                                             const Backend& backend) {
  const Dims d = validate(in);
  const at::Tensor& x = in.x;
  const int64_t B = d.batch, C = d.channels, H = d.heads, N = d.head_size;
  const bool residual = in.v_first.has_value();
  const auto dk = delta_pair(in.deltas, 0, "key"), dv = delta_pair(in.deltas, 1, "value");
  const auto dr = delta_pair(in.deltas, 2, "receptance"), dout = delta_pair(in.deltas, 3, "output");

  // The six lerps, [6, B, C] in x's dtype: xr, xw, xk, xv, xa, xg.
  const at::Tensor mixes = at::stack({in.x_r.reshape({C}), in.x_w.reshape({C}), in.x_k.reshape({C}),
                                      in.x_v.reshape({C}), in.x_a.reshape({C}), in.x_g.reshape({C})})
                               .to(d.acc)
                               .contiguous();
  const at::Tensor xs = token_shift_mixes(x, in.shift, mixes, 6, backend);
  const at::Tensor xr = xs[0], xw = xs[1], xk = xs[2], xv = xs[3], xa = xs[4], xg = xs[5];

  const at::Tensor r = project(xr, in.receptance_weight, dr, scale, backend).contiguous();
  const at::Tensor k = project(xk, in.key_weight, dk, scale, backend).contiguous();
  const at::Tensor v = project(xv, in.value_weight, dv, scale, backend).contiguous();
  // The low-rank MLPs, their outputs in the accumulation type: w_lin = tanh(xw w1) w2,
  // a_lin = xa a1 a2, g = sigmoid(xg g1) g2, v_lin = xv v1 v2.
  at::Tensor w_lin, a_lin, g, v_lin, v_first, v0;
  const bool one_row = backend.row_mlps != nullptr && B == 1 && d.dtype == at::kFloat &&
                       in.w1.scalar_type() == at::kFloat && in.w1.is_contiguous() && in.w2.is_contiguous() &&
                       in.a1.is_contiguous() && in.a2.is_contiguous() && in.g1.is_contiguous() &&
                       in.g2.is_contiguous() && (!residual || (in.v1->is_contiguous() && in.v2->is_contiguous()));
  if (one_row) {
    // One kernel call for the MLPs of a single row (Backend::row_mlps): for one token
    // ATen's GEMV of x @ W with W [C, D] reads the weights at about half the speed.
    const at::Tensor lin = at::empty({residual ? 4 : 3, C}, x.options());
    Rwkv7MlpParams mp;
    mp.channels = C;
    mp.count = 0;
    const auto add = [&](const at::Tensor& input, const at::Tensor& first, const at::Tensor& second,
                         MlpActivation activation) {
      auto& m = mp.mlps[mp.count];
      m.dim = first.size(1);
      m.activation = activation;
      m.x = input.const_data_ptr<float>();
      m.first = first.const_data_ptr<float>();
      m.second = second.const_data_ptr<float>();
      m.out = lin.mutable_data_ptr<float>() + mp.count * C;
      ++mp.count;
    };
    add(xw, in.w1, in.w2, MlpActivation::kTanh);
    add(xa, in.a1, in.a2, MlpActivation::kNone);
    add(xg, in.g1, in.g2, MlpActivation::kSigmoid);
    if (residual) add(xv, *in.v1, *in.v2, MlpActivation::kNone);
    backend.row_mlps(mp);
    w_lin = lin[0];
    a_lin = lin[1];
    g = lin[2];
    if (residual) v_lin = lin[3];
  } else {
    // Each in its weights' dtype (the decay's may be float32 in a 16-bit model).
    w_lin = at::mm(at::mm(xw.to(in.w1.scalar_type()), in.w1).tanh_(), in.w2).to(d.acc).contiguous();
    a_lin = at::mm(at::mm(xa, in.a1), in.a2).to(d.acc).contiguous();
    g = at::mm(at::mm(xg, in.g1).sigmoid_(), in.g2).to(d.acc).contiguous();
    if (residual) v_lin = at::mm(at::mm(xv, *in.v1), *in.v2).to(d.acc).contiguous();
  }
  if (residual) {
    v_first = in.v_first->contiguous();
    v0 = channel_vector(*in.v0, d);
  }
  const at::Tensor w0 = channel_vector(in.w0, d), a0 = channel_vector(in.a0, d), k_k = channel_vector(in.k_k, d),
                   k_a = channel_vector(in.k_a, d);

  Rwkv7PrepareParams pp;
  pp.batch = B;
  pp.heads = H;
  pp.head_size = N;
  pp.dtype = to_dtype(d.dtype);
  pp.r = r.data_ptr();
  pp.k = k.data_ptr();
  pp.v = v.data_ptr();
  pp.v_first = residual ? v_first.data_ptr() : nullptr;
  pp.w_lin = w_lin.data_ptr();
  pp.a_lin = a_lin.data_ptr();
  pp.v_lin = residual ? v_lin.data_ptr() : nullptr;
  pp.w0 = w0.data_ptr();
  pp.a0 = a0.data_ptr();
  pp.v0 = residual ? v0.data_ptr() : nullptr;
  pp.k_k = k_k.data_ptr();
  pp.k_a = k_a.data_ptr();
  const at::Tensor r_k = channel_vector(in.r_k, d), ln_w = channel_vector(in.ln_x_weight, d),
                   ln_b = channel_vector(in.ln_x_bias, d);
  at::Tensor gated = at::empty({B, C}, x.options());
  Rwkv7OutputParams op;
  op.batch = B;
  op.heads = H;
  op.head_size = N;
  op.dtype = to_dtype(d.dtype);
  op.eps = in.ln_x_eps;
  op.g = g.data_ptr();
  op.r_k = r_k.data_ptr();
  op.ln_weight = ln_w.data_ptr();
  op.ln_bias = ln_b.data_ptr();
  op.out = gated.data_ptr();

  at::Tensor state_out;
  if (backend.step != nullptr) {
    const at::Tensor state_in = in.wkv_state.contiguous();
    state_out = at::empty_like(state_in);
    if (gated.numel() > 0) {
      Rwkv7StepParams sp;
      sp.prepare = pp;
      sp.output = op;
      sp.state_in = state_in.data_ptr();
      sp.state_out = state_out.data_ptr();
      backend.step(sp);
    }
  } else {
    at::Tensor prepared = at::empty({6, B, C}, x.options().dtype(d.acc));
    if (prepared.numel() > 0) {
      pp.out = prepared.data_ptr();
      backend.prepare(pp);
    }
    const auto step_input = [&](int64_t i) { return prepared[i].view({B, 1, H, N}); };
    const Opt state = in.wkv_state;
    auto [y, new_state] = wkv7::forward(
        {step_input(0), step_input(1), step_input(2), step_input(3), step_input(4), step_input(5), state},
        backend.wkv7);
    state_out = new_state;
    if (gated.numel() > 0) {
      const at::Tensor yc = y.contiguous();
      op.y = yc.data_ptr();
      op.prepared = prepared.data_ptr();
      backend.output(op);
    }
  }
  return {project(gated, in.output_weight, dout, scale, backend), state_out, v};
}

at::Tensor channel_mix_step(const ChannelMixInputs& in, double scale, const Backend& backend) {
  const char* op = kChannelMixOp;
  const at::Tensor& x = in.x;
  check_token_rows(op, x, in.shift);
  const int64_t B = x.size(0), C = x.size(1);
  const Dims d{B, C, 0, 0, x.scalar_type(), acc_type(x.scalar_type())};
  check_vector("x_k", in.x_k, d, x, op);
  TORCH_CHECK_VALUE(in.key_weight.dim() == 2, op, ": key_weight must have shape [F, C=", C, "], got ",
                    shape_str(in.key_weight.sizes()));
  const int64_t F = in.key_weight.size(0);
  check_matrix("key_weight", in.key_weight, F, C, x.scalar_type(), x, op);
  check_matrix("value_weight", in.value_weight, C, F, x.scalar_type(), x, op);
  TORCH_CHECK_VALUE(in.deltas.size() == 0 || in.deltas.size() == 4, op,
                    ": deltas must be empty or hold 4 entries (U, V per projection, None for none), got ",
                    in.deltas.size());
  const auto dk = delta_pair(in.deltas, 0, "key", op), dv = delta_pair(in.deltas, 1, "value", op);

  const at::Tensor xk = token_shift_mixes(x, in.shift, channel_vector(in.x_k, d), 1, backend)[0];
  at::Tensor k = project(xk, in.key_weight, dk, scale, backend);
  k.relu_();
  k.mul_(k);  // squared ReLU
  return project(k, in.value_weight, dv, scale, backend);
}

}  // namespace prosg::rwkv7_step
