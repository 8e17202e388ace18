// CUDA registration of wkv4: the shared host code (wkv4.cpp) with the CUDA kernels,
// run on the current stream of the inputs' device, workspaces from torch's allocator.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_host.h"
#include "wkv4/cuda/wkv4_launch.h"
#include "wkv4/wkv4.h"

namespace prosg::wkv4 {
namespace {

at::Tensor workspace(int64_t floats) {
  return at::empty({floats}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
}

void forward_cuda(const Wkv4Params& p) {
  const int64_t chunks = cuda::wkv4_forward_chunks(p.batch, p.channels, p.seqlen, multiprocessor_count());
  const at::Tensor ws = workspace(cuda::wkv4_forward_workspace(p.batch, p.channels, chunks));
  check_launch(cuda::launch_wkv4_forward(p, chunks, ws.data_ptr<float>(), current_stream()),
               "wkv4 forward");
}

void backward_cuda(const Wkv4Params& p) {
  const at::Tensor ws = workspace(cuda::wkv4_backward_workspace(p.batch, p.channels, p.seqlen));
  check_launch(cuda::launch_wkv4_backward(p, ws.data_ptr<float>(), current_stream()),
               "wkv4 backward");
}

constexpr Backend kCuda{&forward_cuda, &backward_cuda};

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CUDA, m) {
  m.impl("wkv4", &forward_op<kCuda>);
  m.impl("wkv4_backward", &backward_op<kCuda>);
}

}  // namespace prosg::wkv4
