// Host-side CUDA helpers shared by the CUDA registrations (torch headers allowed here,
// unlike in the .cu kernel files).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace prosg {

// Raises with the CUDA error's text when a launcher reports a failed launch.
inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "prosg: CUDA launch of ", what, " failed: ", cudaGetErrorString(err));
}

// SMs of the current device: torch queries each device's properties once and caches
// them, so a decode step (wkv4 with T = 1 per token) makes no driver call for it.
inline int multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// The stream every prosg kernel runs on: torch's current stream of the current device.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace prosg
