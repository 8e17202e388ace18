// CUDA registration of wkv7: the shared host code (wkv7.cpp) with the CUDA kernels,
// run on the current stream of the inputs' device (the op's device guard), the
// backward's workspace from torch's allocator.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_host.h"
#include "wkv7/cuda/wkv7_launch.h"
#include "wkv7/wkv7.h"

namespace prosg::wkv7 {
namespace {

void forward_cuda(const Wkv7Params& p) {
  check_launch(cuda::launch_wkv7_forward(p, current_stream()), "wkv7 forward");
}

void backward_cuda(const Wkv7Params& p) {
  const int64_t floats = cuda::wkv7_backward_workspace(p.batch, p.heads, p.head_size, p.seqlen);
  const at::Tensor ws =
      at::empty({floats}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, c10::cuda::current_device()));
  check_launch(cuda::launch_wkv7_backward(p, ws.data_ptr<float>(), current_stream()), "wkv7 backward");
}

constexpr Backend kCuda{&forward_cuda, &backward_cuda};

}  // namespace

const Backend& cuda_backend() { return kCuda; }

TORCH_LIBRARY_IMPL(prosg, CUDA, m) {
  m.impl("wkv7", &forward_op<kCuda>);
  m.impl("wkv7_backward", &backward_op<kCuda>);
}

}  // namespace prosg::wkv7
