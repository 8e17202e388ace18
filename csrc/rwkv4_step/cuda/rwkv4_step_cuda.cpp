// CUDA registration of the fused RWKV-4 decode steps: the shared host code with the
// CUDA element kernels and lowrank_linear's CUDA backend, on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_host.h"
#include "rwkv4_step/cuda/rwkv4_step_launch.h"
#include "rwkv4_step/rwkv4_step.h"

namespace prosg::rwkv4_step {
namespace {

void mix_cuda(const Rwkv4MixParams& p) {
  check_launch(cuda::launch_rwkv4_mix(p, current_stream()), "rwkv4 token-shift mix");
}

void gate_cuda(const Rwkv4GateParams& p) {
  check_launch(cuda::launch_rwkv4_gate(p, current_stream()), "rwkv4 wkv gate");
}

Backend cuda_backend() { return Backend{&mix_cuda, &gate_cuda, lowrank::cuda_backend()}; }


std::tuple<at::Tensor, at::Tensor> time_mix_step_cuda(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& wkv_state, const at::Tensor& time_mix_key,
    const at::Tensor& time_mix_value, const at::Tensor& time_mix_receptance, const at::Tensor& time_decay,
    const at::Tensor& time_first, const at::Tensor& key_weight, const at::Tensor& value_weight,
    const at::Tensor& receptance_weight, const at::Tensor& output_weight, const OptList& deltas, double scale) {
  // The CUDA kernel is picked when any argument is on CUDA: guard only a CUDA x, so a
  // CPU x reaches the validation that names the misplaced tensor.
  c10::cuda::OptionalCUDAGuard guard;
  if (x.is_cuda()) guard.set_device(x.device());
  return time_mix_step(x, shift, wkv_state, time_mix_key, time_mix_value, time_mix_receptance, time_decay,
                       time_first, key_weight, value_weight, receptance_weight, output_weight, deltas, scale,
                       cuda_backend());
}

at::Tensor channel_mix_step_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& time_mix_key,
                                 const at::Tensor& time_mix_receptance, const at::Tensor& key_weight,
                                 const at::Tensor& receptance_weight, const at::Tensor& value_weight,
                                 const OptList& deltas, double scale) {
  // The CUDA kernel is picked when any argument is on CUDA: guard only a CUDA x, so a
  // CPU x reaches the validation that names the misplaced tensor.
  c10::cuda::OptionalCUDAGuard guard;
  if (x.is_cuda()) guard.set_device(x.device());
  return channel_mix_step(x, shift, time_mix_key, time_mix_receptance, key_weight, receptance_weight, value_weight,
                          deltas, scale, cuda_backend());
}

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CUDA, m) {
  m.impl("rwkv4_time_mix_step", &time_mix_step_cuda);
  m.impl("rwkv4_channel_mix_step", &channel_mix_step_cuda);
}

}  // namespace prosg::rwkv4_step
