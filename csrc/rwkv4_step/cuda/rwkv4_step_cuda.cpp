// CUDA registration of the fused RWKV-4 decode steps: the shared host code with the
// CUDA element kernels and lowrank_linear's CUDA backend, on the current stream.
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

// Not constexpr: it refers to lowrank_linear's backend, defined in another file
// (constant-initialised there, so it is ready before this one).
const Backend kCuda{&mix_cuda, &gate_cuda, lowrank::cuda_backend()};

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CUDA, m) {
  m.impl("rwkv4_time_mix_step", &time_mix_step_op<kCuda>);
  m.impl("rwkv4_channel_mix_step", &channel_mix_step_op<kCuda>);
}

}  // namespace prosg::rwkv4_step
