// Torch-free entry points of the CUDA kernels of the fused RWKV-7 decode step
// (rwkv7_step_kernels.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "rwkv7_step/rwkv7_step_params.h"

namespace prosg::cuda {

cudaError_t launch_rwkv7_mix(const Rwkv7MixParams& p, cudaStream_t stream);
cudaError_t launch_rwkv7_prepare(const Rwkv7PrepareParams& p, cudaStream_t stream);
cudaError_t launch_rwkv7_output(const Rwkv7OutputParams& p, cudaStream_t stream);

}  // namespace prosg::cuda
