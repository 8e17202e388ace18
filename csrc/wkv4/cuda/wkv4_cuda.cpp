// CUDA registration of wkv4: the shared host code (wkv4.cpp) with the CUDA kernels,
// run on the current stream of the inputs' device, workspaces from torch's allocator.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
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

std::tuple<at::Tensor, at::Tensor> wkv4_cuda(const at::Tensor& time_decay, const at::Tensor& time_first,
                                             const at::Tensor& key, const at::Tensor& value, const Opt& state,
                                             const Opt& key_z, const Opt& key_u, const Opt& value_z,
                                             const Opt& value_u) {
  // The dispatcher picks these kernels when any argument is on CUDA, whether key is
  // or not. CUDAGuard(key.device()) would then fail an internal assert for a CPU key
  // before the argument check that names the misplaced tensor, so the device guard is
  // set only for a CUDA key and validation reports the device mix (as lowrank_linear).
  c10::cuda::OptionalCUDAGuard guard;
  if (key.is_cuda()) guard.set_device(key.device());
  return forward(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, kCuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv4_backward_cuda(
    const at::Tensor& time_decay, const at::Tensor& time_first, const at::Tensor& key, const at::Tensor& value,
    const Opt& state, const Opt& key_z, const Opt& key_u, const Opt& value_z, const Opt& value_u,
    const at::Tensor& grad_out, const at::Tensor& grad_state_out) {
  c10::cuda::OptionalCUDAGuard guard;  // see wkv4_cuda
  if (key.is_cuda()) guard.set_device(key.device());
  return backward(time_decay, time_first, key, value, state, key_z, key_u, value_z, value_u, grad_out,
                  grad_state_out, kCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(prosg, CUDA, m) {
  m.impl("wkv4", &wkv4_cuda);
  m.impl("wkv4_backward", &wkv4_backward_cuda);
}

}  // namespace prosg::wkv4
