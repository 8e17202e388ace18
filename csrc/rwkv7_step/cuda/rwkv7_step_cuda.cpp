// CUDA registration of the fused RWKV-7 decode steps: the shared host code with the
// CUDA element kernels and the wkv7 and lowrank_linear CUDA backends, on the current
// stream.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_host.h"
#include "rwkv7_step/cuda/rwkv7_step_launch.h"
#include "rwkv7_step/rwkv7_step.h"

namespace prosg::rwkv7_step {
namespace {

void mix_cuda(const Rwkv7MixParams& p) { check_launch(cuda::launch_rwkv7_mix(p, current_stream()), "rwkv7 mix"); }

void prepare_cuda(const Rwkv7PrepareParams& p) {
  check_launch(cuda::launch_rwkv7_prepare(p, current_stream()), "rwkv7 step prepare");
}

void output_cuda(const Rwkv7OutputParams& p) {
  check_launch(cuda::launch_rwkv7_output(p, current_stream()), "rwkv7 step output");
}

// Not constexpr: it refers to the wkv7 and lowrank_linear backends, defined in other
// files (constant-initialised there, so they are ready before this one).
const Backend kCuda{&mix_cuda, &prepare_cuda, &output_cuda, wkv7::cuda_backend(), lowrank::cuda_backend()};

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CUDA, m) {
  m.impl("rwkv7_time_mix_step", &time_mix_step_op<kCuda>);
  m.impl("rwkv7_channel_mix_step", &channel_mix_step_op<kCuda>);
}

}  // namespace prosg::rwkv7_step
