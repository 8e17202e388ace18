// Torch-free parameters of the fused decode-step kernels. All buffers are contiguous.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace prosg {

// out[m, b, h] = shift[b, h] + mix[m, h] * (x[b, h] - shift[b, h]) for m < n_mix.
struct Rwkv4MixParams {
  int64_t batch = 0, hidden = 0, n_mix = 0;
  DType dtype = DType::kFloat32;  // of x, shift and out
  const void* x = nullptr;        // [B, H]
  const void* shift = nullptr;    // [B, H]
  const void* mix = nullptr;      // [n_mix, H] in the accumulation type
  void* out = nullptr;            // [n_mix, B, H]
};

// One WKV step per (b, c) and the receptance gate: out = sigmoid(r) * wkv.
struct Rwkv4GateParams {
  int64_t batch = 0, channels = 0;
  DType dtype = DType::kFloat32;   // of key, value, receptance and out
  const void* w = nullptr;         // [C] -exp(time_decay), accumulation type
  const void* u = nullptr;         // [C] time_first, accumulation type
  const void* key = nullptr;       // [B, C]
  const void* value = nullptr;     // [B, C]
  const void* receptance = nullptr;  // [B, C], before the sigmoid
  const void* state_in = nullptr;  // [B, 3, C] accumulation type
  void* state_out = nullptr;       // [B, 3, C]
  void* out = nullptr;             // [B, C]
};

}  // namespace prosg
