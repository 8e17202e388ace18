// Torch-free entry points of the CUDA low-rank kernels (lowrank_linear_kernels.cu).
// Each launches on `stream` and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include "lowrank_linear/lowrank_linear_params.h"

namespace prosg::cuda {

cudaError_t launch_lowrank_shrink(const LowrankShrinkParams& p, cudaStream_t stream);
cudaError_t launch_lowrank_expand(const LowrankExpandParams& p, cudaStream_t stream);

}  // namespace prosg::cuda
