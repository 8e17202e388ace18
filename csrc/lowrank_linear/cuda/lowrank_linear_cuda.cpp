// CUDA registration of lowrank_linear: the shared host code (lowrank_linear.cpp) with
// the CUDA shrink/expand kernels, run on the current stream of the inputs' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_host.h"
#include "lowrank_linear/cuda/lowrank_linear_launch.h"
#include "lowrank_linear/lowrank_linear.h"

namespace prosg::lowrank {
namespace {

// One block per row of x on gridDim.x: B*T rows at most 2^31 - 1.
void check_rows(int64_t batch, int64_t seqlen) {
  TORCH_CHECK_VALUE(batch * seqlen < (1LL << 31), "prosg.lowrank_linear: x has B*T = ", batch, "*", seqlen, " = ",
                    batch * seqlen, " rows; CUDA's grid limit is 2^31 - 1");
}

void shrink_cuda(const LowrankShrinkParams& p) {
  check_rows(p.batch, p.seqlen);
  check_launch(cuda::launch_lowrank_shrink(p, current_stream()), "lowrank shrink");
}

void expand_cuda(const LowrankExpandParams& p) {
  check_rows(p.batch, p.seqlen);
  check_launch(cuda::launch_lowrank_expand(p, current_stream()), "lowrank expand");
}

constexpr Backend kCuda{&shrink_cuda, &expand_cuda};

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& U, const std::optional<at::Tensor>& V, double scale) {
  // The dispatcher picks these kernels when any argument is on CUDA, whether x is or
  // not. CUDAGuard(x.device()) would then fail an internal assert for a CPU x before
  // the argument check that names the misplaced tensor, so the device guard is set
  // only for a CUDA x and validation reports the device mix.
  c10::cuda::OptionalCUDAGuard guard;
  if (x.is_cuda()) guard.set_device(x.device());
  return forward(x, weight, bias, U, V, scale, kCuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& U,
    const std::optional<at::Tensor>& V, double scale, std::array<bool, 5> mask) {
  c10::cuda::OptionalCUDAGuard guard;  // see lowrank_linear_cuda
  if (x.is_cuda()) guard.set_device(x.device());
  return backward(grad_out, x, weight, U, V, scale, mask, kCuda);
}

}  // namespace

const Backend& cuda_backend() { return kCuda; }

TORCH_LIBRARY_IMPL(prosg, CUDA, m) {
  m.impl("lowrank_linear", &lowrank_linear_cuda);
  m.impl("lowrank_linear_backward", &lowrank_linear_backward_cuda);
}

}  // namespace prosg::lowrank
