// Torch-free entry points of the CUDA wkv7 kernels (wkv7_kernels.cu). Each launches
// on `stream` and returns the launch status. The backward's workspace is allocated by
// the caller (through torch's caching allocator) with the size this header gives.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "wkv7/wkv7_params.h"

namespace prosg::cuda {

cudaError_t launch_wkv7_forward(const Wkv7Params& p, cudaStream_t stream);

// Floats of backward workspace: the state checkpoints (every kSegment steps of each
// (sample, head)) and each block's replayed segment.
int64_t wkv7_backward_workspace(int64_t batch, int64_t heads, int64_t head_size, int64_t seqlen);
cudaError_t launch_wkv7_backward(const Wkv7Params& p, float* workspace, cudaStream_t stream);

}  // namespace prosg::cuda
