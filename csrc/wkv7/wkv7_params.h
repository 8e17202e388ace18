// Torch-free parameters of the wkv7 kernels (CPU and CUDA). Strides are in elements.
// The six step inputs (r, w, k, v, a, b) and grad_out may have any strides (expanded
// ones included); states and state gradients are contiguous [B, H, N, N] in the
// accumulation type (float32, or float64 for float64 inputs); out and the input
// gradients are contiguous [B, T, H, N] in the inputs' dtype.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace prosg {

// One [B, T, H, N] input: element (b, t, h, n) is ptr[b*sb + t*st + h*sh + n*sn].
struct Wkv7Input {
  const void* ptr = nullptr;
  int64_t sb = 0, st = 0, sh = 0, sn = 0;
};

struct Wkv7Params {
  int64_t batch = 0, seqlen = 0, heads = 0, head_size = 0;
  DType dtype = DType::kFloat32;  // of the six inputs, out, grad_out and the input gradients
  Wkv7Input r, w, k, v, a, b;     // [B, T, H, N]; w is the log-log decay: d = exp(-exp(w))
  const void* state_in = nullptr;  // [B, H, N, N] or null: zeros

  // Forward outputs.
  void* out = nullptr;        // [B, T, H, N]
  void* state_out = nullptr;  // [B, H, N, N]

  // Backward inputs and outputs.
  Wkv7Input grad_out;                    // [B, T, H, N]
  const void* grad_state_out = nullptr;  // [B, H, N, N]
  void *grad_r = nullptr, *grad_w = nullptr, *grad_k = nullptr, *grad_v = nullptr, *grad_a = nullptr,
       *grad_b = nullptr;                // [B, T, H, N]
  void* grad_state_in = nullptr;         // [B, H, N, N] or null when no state was given
};

}  // namespace prosg
