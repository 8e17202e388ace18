// CUDA registration of lowrank_linear: the shared host code (lowrank_linear.cpp) with
// the CUDA shrink/expand kernels, run on the current stream of the inputs' device.
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

}  // namespace

const Backend& cuda_backend() { return kCuda; }

TORCH_LIBRARY_IMPL(prosg, CUDA, m) {
  m.impl("lowrank_linear", &forward_op<kCuda>);
  m.impl("lowrank_linear_backward", &backward_op<kCuda>);
}

}  // namespace prosg::lowrank
