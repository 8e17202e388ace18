// Torch-free parameters of the wkv4 kernels (CPU and CUDA). Strides are in elements.
// All state-like buffers (w, u, states, state gradients, per-sample parameter
// gradients) are contiguous and in the accumulation type: float32, or float64 for
// float64 inputs. Inputs may have any strides; out/grad_key/grad_value are contiguous.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace prosg {

// One rank-r perturbation: the effective x[b,t,c] is x + sum_j z[b,t,j] * U[b,c,j].
struct Wkv4LowRank {
  int64_t rank = 0;  // 0: absent
  const void* z = nullptr;  // [B, T, r]
  int64_t z_batch_stride = 0, z_seq_stride = 0, z_rank_stride = 0;
  const void* U = nullptr;  // [B, C, r]
  int64_t u_batch_stride = 0, u_chan_stride = 0, u_rank_stride = 0;
};

struct Wkv4Params {
  int64_t batch = 0, seqlen = 0, channels = 0;
  DType dtype = DType::kFloat32;  // of key, value, the factors, out and the key/value gradients
  const void* w = nullptr;        // [C] -exp(time_decay)
  const void* u = nullptr;        // [C] time_first
  const void* key = nullptr;      // [B, T, C]
  int64_t k_batch_stride = 0, k_seq_stride = 0, k_chan_stride = 0;
  const void* value = nullptr;    // [B, T, C]
  int64_t v_batch_stride = 0, v_seq_stride = 0, v_chan_stride = 0;
  Wkv4LowRank key_lr, value_lr;
  const void* state_in = nullptr;  // [B, 3, C] or null: (0, 0, -1e38)

  // Forward outputs.
  void* out = nullptr;        // [B, T, C]
  void* state_out = nullptr;  // [B, 3, C]

  // Backward inputs and outputs.
  const void* grad_out = nullptr;  // [B, T, C]
  int64_t go_batch_stride = 0, go_seq_stride = 0, go_chan_stride = 0;
  const void* grad_state_out = nullptr;  // [B, 3, C]
  void* grad_key = nullptr;              // [B, T, C], w.r.t. the effective key
  void* grad_value = nullptr;            // [B, T, C], w.r.t. the effective value
  void* grad_w = nullptr;                // [B, C] per-sample sums of dL/dw
  void* grad_u = nullptr;                // [B, C] per-sample sums of dL/du
  void* grad_state_in = nullptr;         // [B, 3, C] or null when no state was given
};

}  // namespace prosg
