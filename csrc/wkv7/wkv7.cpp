#include "wkv7/wkv7.h"

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "wkv7/wkv7_math.h"

namespace prosg::wkv7 {
namespace {

struct Dims {
  int64_t batch, seqlen, heads, head_size;
  at::ScalarType acc;
};

Dims validate(const char* op, const Wkv7Inputs& in) {
  const at::Tensor& r = in.r;
  TORCH_CHECK_VALUE(r.dim() == 4, op, ": r must have shape [B, T, H, N], got ", shape_str(r.sizes()));
  check_floating(op, "r", r, /*allow_double=*/r.is_cpu());
  Dims d{r.size(0), r.size(1), r.size(2), r.size(3), acc_type(r.scalar_type())};
  TORCH_CHECK_VALUE(supported_head_size(d.head_size), op,
                    ": the head size N (r's last dimension) must be 16, 32, 64 or 128, got ", d.head_size);
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"w", &in.w}, {"k", &in.k}, {"v", &in.v}, {"a", &in.a}, {"b", &in.b}};
  for (const auto& [name, t] : others) {
    check_shape(op, name, *t, {d.batch, d.seqlen, d.heads, d.head_size});
    check_same_device(op, name, *t, r, "r");
    check_dtype(op, name, *t, r.scalar_type());
  }
  if (in.state) {
    check_shape(op, "state", *in.state, {d.batch, d.heads, d.head_size, d.head_size});
    check_same_device(op, "state", *in.state, r, "r");
    check_dtype(op, "state", *in.state, d.acc);
  }
  return d;
}

Wkv7Input input_of(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Fills the input half of the params; `state` (contiguous) must outlive the launch.
Wkv7Params input_params(const Dims& d, const Wkv7Inputs& in, const Opt& state) {
  Wkv7Params p;
  p.batch = d.batch;
  p.seqlen = d.seqlen;
  p.heads = d.heads;
  p.head_size = d.head_size;
  p.dtype = to_dtype(in.r.scalar_type());
  p.r = input_of(in.r);
  p.w = input_of(in.w);
  p.k = input_of(in.k);
  p.v = input_of(in.v);
  p.a = input_of(in.a);
  p.b = input_of(in.b);
  p.state_in = state ? state->data_ptr() : nullptr;
  return p;
}

Opt contiguous_state(const Wkv7Inputs& in) { return in.state ? Opt(in.state->contiguous()) : std::nullopt; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const Wkv7Inputs& in, const Backend& backend) {
  const Dims d = validate("prosg.wkv7", in);
  const Opt state = contiguous_state(in);
  at::Tensor out = at::empty({d.batch, d.seqlen, d.heads, d.head_size}, in.r.options());
  at::Tensor state_out = at::empty({d.batch, d.heads, d.head_size, d.head_size}, in.r.options().dtype(d.acc));
  if (d.batch == 0 || d.heads == 0) return {out, state_out};
  if (d.seqlen == 0) {
    // Nothing to scan: the state passes through unchanged.
    if (state) state_out.copy_(*state);
    else state_out.zero_();
    return {out, state_out};
  }
  Wkv7Params p = input_params(d, in, state);
  p.out = out.data_ptr();
  p.state_out = state_out.data_ptr();
  backend.forward(p);
  return {out, state_out};
}

Grads backward(const Wkv7Inputs& in, const at::Tensor& grad_out, const at::Tensor& grad_state_out,
               const Backend& backend) {
  constexpr const char* op = "prosg.wkv7_backward";
  const Dims d = validate(op, in);
  check_shape(op, "grad_out", grad_out, {d.batch, d.seqlen, d.heads, d.head_size});
  check_same_device(op, "grad_out", grad_out, in.r, "r");
  check_dtype(op, "grad_out", grad_out, in.r.scalar_type());
  check_shape(op, "grad_state_out", grad_state_out, {d.batch, d.heads, d.head_size, d.head_size});
  check_same_device(op, "grad_state_out", grad_state_out, in.r, "r");
  check_dtype(op, "grad_state_out", grad_state_out, d.acc);

  const Opt state = contiguous_state(in);
  const at::Tensor gso = grad_state_out.contiguous();
  const auto shape = std::vector<int64_t>{d.batch, d.seqlen, d.heads, d.head_size};
  auto make = [&] { return at::empty(shape, in.r.options()); };
  at::Tensor g_r = make(), g_w = make(), g_k = make(), g_v = make(), g_a = make(), g_b = make();
  auto acc_opts = in.r.options().dtype(d.acc);
  at::Tensor g_state = state ? at::empty({d.batch, d.heads, d.head_size, d.head_size}, acc_opts)
                             : at::empty({0}, acc_opts);
  if (d.batch > 0 && d.heads > 0) {
    if (d.seqlen == 0) {
      if (state) g_state.copy_(gso);
    } else {
      Wkv7Params p = input_params(d, in, state);
      p.grad_out = input_of(grad_out);
      p.grad_state_out = gso.data_ptr();
      p.grad_r = g_r.data_ptr();
      p.grad_w = g_w.data_ptr();
      p.grad_k = g_k.data_ptr();
      p.grad_v = g_v.data_ptr();
      p.grad_a = g_a.data_ptr();
      p.grad_b = g_b.data_ptr();
      p.grad_state_in = state ? g_state.data_ptr() : nullptr;
      backend.backward(p);
    }
  }
  return {g_r, g_w, g_k, g_v, g_a, g_b, g_state};
}

}  // namespace prosg::wkv7
