// Torch-free entry points of the CUDA wkv4 kernels (wkv4_kernels.cu). Each launches
// on `stream` and returns the launch status. Workspaces are allocated by the caller
// (through torch's caching allocator) with the sizes these functions give.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "wkv4/wkv4_params.h"

namespace prosg::cuda {

// How many time chunks the forward scans in parallel on a device with `sm_count`
// SMs: enough (sample, channel, chunk) threads to fill it, at least kMinChunkLen steps
// each, and no empty chunk. The caller queries the SM count (once per device).
int64_t wkv4_forward_chunks(int64_t batch, int64_t channels, int64_t seqlen, int sm_count);
// Floats of forward workspace for `chunks` chunks (0 when chunks == 1).
int64_t wkv4_forward_workspace(int64_t batch, int64_t channels, int64_t chunks);
cudaError_t launch_wkv4_forward(const Wkv4Params& p, int64_t chunks, float* workspace, cudaStream_t stream);

// Floats of backward workspace (the state checkpoints).
int64_t wkv4_backward_workspace(int64_t batch, int64_t channels, int64_t seqlen);
cudaError_t launch_wkv4_backward(const Wkv4Params& p, float* workspace, cudaStream_t stream);

}  // namespace prosg::cuda
