// Element arithmetic of the fused RWKV-4 decode steps, shared by the CPU and CUDA
// kernels (the recurrence itself is wkv4_math.h's forward_step).
#pragma once

#include <math.h>

#include "common/dtype.h"

namespace prosg::rwkv4_step {

// transformers' x * m + shifted * (1 - m), written as one lerp (what the model's
// sequence path computes with torch.lerp, so both paths agree).
template <typename F>
PROSG_HD F token_shift_mix(F x, F shifted, F m) {
  return shifted + m * (x - shifted);
}

PROSG_HD float sigmoid(float r) { return 1.f / (1.f + expf(-r)); }
PROSG_HD double sigmoid(double r) { return 1.0 / (1.0 + exp(-r)); }

}  // namespace prosg::rwkv4_step
