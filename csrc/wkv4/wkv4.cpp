#include "wkv4/wkv4.h"

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "wkv4/wkv4_math.h"

namespace prosg::wkv4 {
namespace {

struct Dims {
  int64_t batch, seqlen, channels;
  at::ScalarType acc;
};

void validate_lowrank(const char* op, const char* z_name, const char* u_name, const LowRankArg& lr,
                      const at::Tensor& key, const Dims& d) {
  const Opt &z = lr.z, &U = lr.U;
  TORCH_CHECK_VALUE(z.has_value() == U.has_value(), op, ": ", z_name, " and ", u_name,
                    " must be given together (got ", z ? z_name : u_name, " alone)");
  if (!z) return;
  TORCH_CHECK_VALUE(z->dim() == 3, op, ": ", z_name, " must have shape [B=", d.batch, ", T=", d.seqlen,
                    ", r], got ", shape_str(z->sizes()));
  TORCH_CHECK_VALUE(U->dim() == 3, op, ": ", u_name, " must have shape [B=", d.batch, ", C=", d.channels,
                    ", r], got ", shape_str(U->sizes()));
  TORCH_CHECK_VALUE(z->size(2) == U->size(2), op, ": ", z_name, " and ", u_name,
                    " must have the same rank r, got ", shape_str(z->sizes()), " and ", shape_str(U->sizes()));
  check_shape(op, z_name, *z, {d.batch, d.seqlen, z->size(2)});
  check_shape(op, u_name, *U, {d.batch, d.channels, z->size(2)});
  check_same_device(op, z_name, *z, key, "key");
  check_same_device(op, u_name, *U, key, "key");
  check_dtype(op, z_name, *z, key.scalar_type());
  check_dtype(op, u_name, *U, key.scalar_type());
}

Dims validate(const char* op, const Wkv4Inputs& in) {
  const at::Tensor& key = in.key;
  TORCH_CHECK_VALUE(key.dim() == 3, op, ": key must have shape [B, T, C], got ", shape_str(key.sizes()));
  check_floating(op, "key", key, /*allow_double=*/key.is_cpu());
  Dims d{key.size(0), key.size(1), key.size(2), acc_type(key.scalar_type())};
  check_shape(op, "value", in.value, {d.batch, d.seqlen, d.channels});
  check_same_device(op, "value", in.value, key, "key");
  check_dtype(op, "value", in.value, key.scalar_type());
  check_shape(op, "time_decay", in.time_decay, {d.channels});
  check_shape(op, "time_first", in.time_first, {d.channels});
  check_same_device(op, "time_decay", in.time_decay, key, "key");
  check_same_device(op, "time_first", in.time_first, key, "key");
  check_floating(op, "time_decay", in.time_decay, key.is_cpu());
  check_floating(op, "time_first", in.time_first, key.is_cpu());
  if (in.state) {
    check_shape(op, "state", *in.state, {d.batch, 3, d.channels});
    check_same_device(op, "state", *in.state, key, "key");
    check_dtype(op, "state", *in.state, d.acc);
  }
  validate_lowrank(op, "key_z", "key_u", in.key_lr, key, d);
  validate_lowrank(op, "value_z", "value_u", in.value_lr, key, d);
  return d;
}

Wkv4LowRank lowrank_params(const LowRankArg& lr) {
  Wkv4LowRank p;
  if (!lr.z || lr.z->size(2) == 0) return p;
  const at::Tensor &z = *lr.z, &U = *lr.U;
  p.rank = z.size(2);
  p.z = z.data_ptr();
  p.z_batch_stride = z.stride(0);
  p.z_seq_stride = z.stride(1);
  p.z_rank_stride = z.stride(2);
  p.U = U.data_ptr();
  p.u_batch_stride = U.stride(0);
  p.u_chan_stride = U.stride(1);
  p.u_rank_stride = U.stride(2);
  return p;
}

// What both directions hand the kernels besides the inputs themselves: w = -exp(time_decay)
// and u = time_first in the accumulation type, and the start state, all contiguous.
struct Prepared {
  at::Tensor w, u;
  Opt state;
};

Prepared prepare(const Dims& d, const Wkv4Inputs& in) {
  return {in.time_decay.to(d.acc).exp().neg_().contiguous(), in.time_first.to(d.acc).contiguous(),
          in.state ? Opt(in.state->contiguous()) : std::nullopt};
}

// Fills the input half of the params; `prep` must outlive the launch.
Wkv4Params input_params(const Dims& d, const Prepared& prep, const Wkv4Inputs& in) {
  Wkv4Params p;
  p.batch = d.batch;
  p.seqlen = d.seqlen;
  p.channels = d.channels;
  p.dtype = to_dtype(in.key.scalar_type());
  p.w = prep.w.data_ptr();
  p.u = prep.u.data_ptr();
  p.key = in.key.data_ptr();
  p.k_batch_stride = in.key.stride(0);
  p.k_seq_stride = in.key.stride(1);
  p.k_chan_stride = in.key.stride(2);
  p.value = in.value.data_ptr();
  p.v_batch_stride = in.value.stride(0);
  p.v_seq_stride = in.value.stride(1);
  p.v_chan_stride = in.value.stride(2);
  p.key_lr = lowrank_params(in.key_lr);
  p.value_lr = lowrank_params(in.value_lr);
  p.state_in = prep.state ? prep.state->data_ptr() : nullptr;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const Wkv4Inputs& in, const Backend& backend) {
  const Dims d = validate("prosg.wkv4", in);
  const Prepared prep = prepare(d, in);
  at::Tensor out = at::empty({d.batch, d.seqlen, d.channels}, in.value.options());
  at::Tensor state_out = at::empty({d.batch, 3, d.channels}, in.key.options().dtype(d.acc));
  if (d.batch == 0 || d.channels == 0) return {out, state_out};
  if (d.seqlen == 0) {
    // Nothing to scan: the state passes through unchanged.
    if (prep.state) state_out.copy_(*prep.state);
    else {
      state_out.select(1, 0).zero_();
      state_out.select(1, 1).zero_();
      state_out.select(1, 2).fill_(static_cast<double>(kEmptyMax));
    }
    return {out, state_out};
  }
  Wkv4Params p = input_params(d, prep, in);
  p.out = out.data_ptr();
  p.state_out = state_out.data_ptr();
  backend.forward(p);
  return {out, state_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const Wkv4Inputs& in,
                                                                                const at::Tensor& grad_out,
                                                                                const at::Tensor& grad_state_out,
                                                                                const Backend& backend) {
  constexpr const char* op = "prosg.wkv4_backward";
  const Dims d = validate(op, in);
  check_shape(op, "grad_out", grad_out, {d.batch, d.seqlen, d.channels});
  check_same_device(op, "grad_out", grad_out, in.key, "key");
  check_dtype(op, "grad_out", grad_out, in.value.scalar_type());
  check_shape(op, "grad_state_out", grad_state_out, {d.batch, 3, d.channels});
  check_same_device(op, "grad_state_out", grad_state_out, in.key, "key");
  check_dtype(op, "grad_state_out", grad_state_out, d.acc);

  const Prepared prep = prepare(d, in);
  const at::Tensor gso = grad_state_out.contiguous();
  auto acc_opts = in.key.options().dtype(d.acc);
  at::Tensor g_key = at::empty({d.batch, d.seqlen, d.channels}, in.key.options());
  at::Tensor g_value = at::empty({d.batch, d.seqlen, d.channels}, in.value.options());
  at::Tensor g_w = at::zeros({d.batch, d.channels}, acc_opts);
  at::Tensor g_u = at::zeros({d.batch, d.channels}, acc_opts);
  at::Tensor g_state = in.state ? at::empty({d.batch, 3, d.channels}, acc_opts) : at::empty({0}, acc_opts);
  if (d.batch > 0 && d.channels > 0) {
    if (d.seqlen == 0) {
      if (in.state) g_state.copy_(gso);
    } else {
      Wkv4Params p = input_params(d, prep, in);
      p.grad_out = grad_out.data_ptr();
      p.go_batch_stride = grad_out.stride(0);
      p.go_seq_stride = grad_out.stride(1);
      p.go_chan_stride = grad_out.stride(2);
      p.grad_state_out = gso.data_ptr();
      p.grad_key = g_key.data_ptr();
      p.grad_value = g_value.data_ptr();
      p.grad_w = g_w.data_ptr();
      p.grad_u = g_u.data_ptr();
      p.grad_state_in = in.state ? g_state.data_ptr() : nullptr;
      backend.backward(p);
    }
  }
  // w = -exp(time_decay), so dL/dtime_decay = dL/dw * w.
  at::Tensor g_td = (g_w.sum(0) * prep.w).to(in.time_decay.scalar_type());
  at::Tensor g_tf = g_u.sum(0).to(in.time_first.scalar_type());
  return {g_td, g_tf, g_key, g_value, g_state};
}

}  // namespace prosg::wkv4
