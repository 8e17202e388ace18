// Torch-free entry points of the CUDA decode-step kernels (rwkv4_step_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "rwkv4_step/rwkv4_step_params.h"

namespace prosg::cuda {

cudaError_t launch_rwkv4_mix(const Rwkv4MixParams& p, cudaStream_t stream);
cudaError_t launch_rwkv4_gate(const Rwkv4GateParams& p, cudaStream_t stream);

}  // namespace prosg::cuda
