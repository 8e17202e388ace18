// The one place where every prosg op's schema is defined.
//
// Kernels register themselves beside their code with TORCH_LIBRARY_IMPL
// (csrc/<op>/cpu, csrc/<op>/cuda); fake (meta) kernels and autograd formulas
// are attached from Python in prosg/ops; the ops without a derivative get their
// refusing Autograd kernel here. This file also makes the shared
// library importable as the Python module ``prosg._C``: importing it runs the
// static registrations below. No kernel is exposed through pybind.
#include <Python.h>
#include <torch/library.h>

#include "common/not_differentiable.h"

#ifndef PROSG_CUDA_ARCHS
#define PROSG_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(prosg, m) {
  // y[b,t] = x[b,t] @ weight.T + bias + scale * (x[b,t] @ V[b]) @ U[b].T
  // x [B,T,Din] or [B,Din]; weight [Dout,Din]; bias [Dout]; U [B,Dout,r]; V [B,Din,r].
  // The per-sample delta U_b V_b^T is never materialised.
  m.def("lowrank_linear(Tensor x, Tensor weight, Tensor? bias, Tensor? U, Tensor? V, float scale) -> Tensor");

  // Gradients of lowrank_linear given grad_out (shaped like its output), in the order
  // (x, weight, bias, U, V). output_mask selects which are computed; the others, and
  // those of absent inputs, come back as empty tensors.
  m.def(
      "lowrank_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? U, Tensor? V, "
      "float scale, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // RWKV-4 time-mixing recurrence with optional rank-r perturbations of key and value:
  // k_eff = key + key_z @ key_u^T (per sample), likewise v_eff. Returns (out, state_out);
  // state [B,3,C] holds (numerator, denominator, running max) in float32 (float64 for
  // float64 inputs); a missing state means (0, 0, -1e38).
  m.def(
      "wkv4(Tensor time_decay, Tensor time_first, Tensor key, Tensor value, Tensor? state, "
      "Tensor? key_z, Tensor? key_u, Tensor? value_z, Tensor? value_u) -> (Tensor, Tensor)");

  // Gradients of wkv4 given grad_out and grad_state_out, in the order (time_decay,
  // time_first, key_eff, value_eff, state): gradients with respect to the *effective*
  // key and value, from which the low-rank factor gradients follow by batched GEMMs.
  m.def(
      "wkv4_backward(Tensor time_decay, Tensor time_first, Tensor key, Tensor value, Tensor? state, "
      "Tensor? key_z, Tensor? key_u, Tensor? value_z, Tensor? value_u, Tensor grad_out, "
      "Tensor grad_state_out) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // RWKV-7 recurrence (generalized delta rule) per head: with d = exp(-exp(w)),
  // S <- S (diag(d) + a b^T) + v k^T and out = S r after each step. r, w, k, v, a, b
  // [B,T,H,N]; state [B,H,N,N] indexed [value, key], float32 (float64 for float64
  // inputs), none meaning zeros. Returns (out [B,T,H,N], state_out [B,H,N,N]).
  m.def("wkv7(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? state) -> (Tensor, Tensor)");

  // Gradients of wkv7 given grad_out and grad_state_out, in the order (r, w, k, v, a,
  // b, state); the state's is an empty tensor when no state was given.
  m.def(
      "wkv7_backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor? state, "
      "Tensor grad_out, Tensor grad_state_out) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // One RWKV-4 time-mix step for a batch of single tokens (decoding, inference only):
  // token-shift mixes, the key/value/receptance/output projections with optional
  // per-sample deltas (deltas = [U_k, V_k, U_v, V_v, U_r, V_r, U_o, V_o], each pair
  // both or neither), the WKV state update and the receptance gate. x, shift [B,H];
  // wkv_state [B,3,C] float32. Returns (out [B,H], wkv_state_out [B,3,C]).
  m.def(
      "rwkv4_time_mix_step(Tensor x, Tensor shift, Tensor wkv_state, Tensor time_mix_key, "
      "Tensor time_mix_value, Tensor time_mix_receptance, Tensor time_decay, Tensor time_first, "
      "Tensor key_weight, Tensor value_weight, Tensor receptance_weight, Tensor output_weight, "
      "Tensor?[] deltas, float scale) -> (Tensor, Tensor)");

  // One RWKV-4 channel-mix step for a batch of single tokens (inference only):
  // sigmoid(xr Wr^T) * (relu(xk Wk^T)^2 Wv^T) with the token-shift mixes and optional
  // per-sample deltas = [U_k, V_k, U_r, V_r, U_v, V_v]. x, shift [B,H]. Returns out [B,H].
  m.def(
      "rwkv4_channel_mix_step(Tensor x, Tensor shift, Tensor time_mix_key, Tensor time_mix_receptance, "
      "Tensor key_weight, Tensor receptance_weight, Tensor value_weight, Tensor?[] deltas, float scale) -> Tensor");

  // One RWKV-7 (x070) time-mix step for a batch of single tokens (decoding, inference
  // only): the six token-shift mixes, the receptance/key/value/output projections with
  // optional per-sample deltas (deltas = [U_k, V_k, U_v, V_v, U_r, V_r, U_o, V_o]), the
  // decay, in-context-rate, gate and (with v_first: layers after the first) value-residual
  // low-rank MLPs, the wkv7 step, the per-head GroupNorm, bonus and gate. x, shift,
  // v_first [B,C]; wkv_state [B,H,N,N] float32; r_k [H,N]. Returns (out [B,C],
  // wkv_state_out, v [B,C]: this layer's value projection, layer 0's being v_first).
  m.def(
      "rwkv7_time_mix_step(Tensor x, Tensor shift, Tensor wkv_state, Tensor? v_first, Tensor x_r, "
      "Tensor x_w, Tensor x_k, Tensor x_v, Tensor x_a, Tensor x_g, Tensor w0, Tensor w1, Tensor w2, "
      "Tensor a0, Tensor a1, Tensor a2, Tensor g1, Tensor g2, Tensor? v0, Tensor? v1, Tensor? v2, "
      "Tensor k_k, Tensor k_a, Tensor r_k, Tensor receptance_weight, Tensor key_weight, Tensor value_weight, "
      "Tensor output_weight, Tensor ln_x_weight, Tensor ln_x_bias, float ln_x_eps, Tensor?[] deltas, "
      "float scale) -> (Tensor, Tensor, Tensor)");

  // One RWKV-7 channel-mix step for a batch of single tokens (inference only):
  // value(relu(key(x + (shift - x) x_k))^2) with optional per-sample deltas =
  // [U_k, V_k, U_v, V_v]. x, shift [B,C]; key_weight [F,C]; value_weight [C,F]. Returns out [B,C].
  m.def(
      "rwkv7_channel_mix_step(Tensor x, Tensor shift, Tensor x_k, Tensor key_weight, Tensor value_weight, "
      "Tensor?[] deltas, float scale) -> Tensor");
}

// The ops without a derivative: refused while grad mode is on and an argument requires
// grad, run below autograd otherwise (csrc/common/not_differentiable.h).
namespace {

using prosg::NotDifferentiable;

constexpr const char* kInferenceOnly4 =
    "is inference-only (no backward): call it under torch.no_grad() or torch.inference_mode(), or use the "
    "sequence path (prosg.ops.wkv4 / lowrank_linear) for training";
constexpr const char* kInferenceOnly7 =
    "is inference-only (no backward): call it under torch.no_grad() or torch.inference_mode(), or use the "
    "sequence path (prosg.ops.wkv7 / lowrank_linear) for training";

const NotDifferentiable kLowrankBackward{
    "has no derivative: differentiate prosg.ops.lowrank_linear itself with create_graph=True for higher "
    "derivatives"};
const NotDifferentiable kWkv4Backward{
    "has no derivative (double backward through prosg.ops.wkv4 is not supported)"};
const NotDifferentiable kWkv7Backward{
    "has no derivative (double backward through prosg.ops.wkv7 is not supported)"};
const NotDifferentiable kRwkv4TimeMix{kInferenceOnly4, {"key", "value", "receptance", "output"}};
const NotDifferentiable kRwkv4ChannelMix{kInferenceOnly4, {"key", "receptance", "value"}};
const NotDifferentiable kRwkv7TimeMix{kInferenceOnly7, {"key", "value", "receptance", "output"}};
const NotDifferentiable kRwkv7ChannelMix{kInferenceOnly7, {"key", "value"}};

template <const NotDifferentiable& spec>
torch::CppFunction refusing() {
  return torch::CppFunction::makeFromBoxedFunction<&prosg::not_differentiable<spec>>();
}

}  // namespace

TORCH_LIBRARY_IMPL(prosg, Autograd, m) {
  m.impl("lowrank_linear_backward", refusing<kLowrankBackward>());
  m.impl("wkv4_backward", refusing<kWkv4Backward>());
  m.impl("wkv7_backward", refusing<kWkv7Backward>());
  m.impl("rwkv4_time_mix_step", refusing<kRwkv4TimeMix>());
  m.impl("rwkv4_channel_mix_step", refusing<kRwkv4ChannelMix>());
  m.impl("rwkv7_time_mix_step", refusing<kRwkv7TimeMix>());
  m.impl("rwkv7_channel_mix_step", refusing<kRwkv7ChannelMix>());
}

// ``import prosg._C`` loads this library (and so runs the registrations above). The
// module carries only facts about the build, read by prosg.backends().
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "prosg kernels (ops live in torch.ops.prosg)", -1,
                               nullptr};
  PyObject* mod = PyModule_Create(&module);
  if (mod == nullptr) return nullptr;
#ifdef PROSG_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(mod, "cuda_archs", PROSG_CUDA_ARCHS);
#ifdef _OPENMP
  PyModule_AddIntConstant(mod, "openmp", _OPENMP);
#else
  PyModule_AddIntConstant(mod, "openmp", 0);
#endif
  PyModule_AddStringConstant(mod, "torch_version", PROSG_TORCH_VERSION);
  PyModule_AddStringConstant(mod, "cpu_isa", PROSG_CPU_ISA);
  return mod;
}
