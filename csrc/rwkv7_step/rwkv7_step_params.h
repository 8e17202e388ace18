// Torch-free parameters of the fused RWKV-7 decode-step kernels. All buffers are
// contiguous; "acc" is the accumulation type (float, double for float64 inputs).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace prosg {

// out[m, b, c] = x + (shift - x) * mix[m, c] for m < n_mix (the six time-mix lerps).
struct Rwkv7MixParams {
  int64_t batch = 0, channels = 0, n_mix = 0;
  DType dtype = DType::kFloat32;  // of x, shift and out
  const void* x = nullptr;        // [B, C]
  const void* shift = nullptr;    // [B, C]
  const void* mix = nullptr;      // [n_mix, C] acc
  void* out = nullptr;            // [n_mix, B, C]
};

// The low-rank MLPs of one float32 token row (the CPU's path for a single sample;
// several rows take ATen's GEMMs): out[m] = act_m(x[m] first_m) second_m for m < count,
// with first_m [C, D_m] and second_m [D_m, C] row-major (BlinkDL's orientation).
enum class MlpActivation : int { kNone = 0, kTanh = 1, kSigmoid = 2 };

struct Rwkv7MlpParams {
  static constexpr int kMaxMlps = 4;  // decay, in-context rate, gate, value residual
  int64_t channels = 0, count = 0;
  struct Mlp {
    int64_t dim = 0;
    MlpActivation activation = MlpActivation::kNone;
    const float* x = nullptr;       // [C]
    const float* first = nullptr;   // [C, D]
    const float* second = nullptr;  // [D, C]
    float* out = nullptr;           // [C]
  } mlps[kMaxMlps];
};

// The wkv7 inputs of one step from the projections and the low-rank MLPs
// (rwkv7_step_math.h's prepare), per (sample, head).
struct Rwkv7PrepareParams {
  int64_t batch = 0, heads = 0, head_size = 0;
  DType dtype = DType::kFloat32;  // of r, k, v and v_first
  const void* r = nullptr;        // [B, C] projections
  const void* k = nullptr;
  const void* v = nullptr;
  const void* v_first = nullptr;  // [B, C] layer 0's value; null in layer 0 (no residual)
  const void* w_lin = nullptr;    // [B, C] acc: tanh(xw w1) w2
  const void* a_lin = nullptr;    // [B, C] acc: (xa a1) a2
  const void* v_lin = nullptr;    // [B, C] acc: (xv v1) v2; null with v_first
  const void* w0 = nullptr;       // [C] acc each
  const void* a0 = nullptr;
  const void* v0 = nullptr;       // null with v_first
  const void* k_k = nullptr;
  const void* k_a = nullptr;
  void* out = nullptr;            // [6, B, C] acc: r, w, k, v, a, b
};

// The time mix's output before its projection, per (sample, head): GroupNorm of the
// wkv7 output, the bonus and the gate (rwkv7_step_math.h's gated_output).
struct Rwkv7OutputParams {
  int64_t batch = 0, heads = 0, head_size = 0;
  DType dtype = DType::kFloat32;  // of out
  double eps = 0;                 // the GroupNorm's
  const void* y = nullptr;        // [B, C] acc, wkv7's output
  const void* prepared = nullptr; // [6, B, C] acc (Rwkv7PrepareParams::out): r, k, v read
  const void* g = nullptr;        // [B, C] acc: sigmoid(xg g1) g2
  const void* r_k = nullptr;      // [C] acc each
  const void* ln_weight = nullptr;
  const void* ln_bias = nullptr;
  void* out = nullptr;            // [B, C]
};

// All of a step after the mixes and the projections in one pass per (sample, head):
// prepare, the state update of wkv7_math.h (row-major, one step) and the output. The
// CPU's kernel; the CUDA backend runs prepare, wkv7 and output instead.
struct Rwkv7StepParams {
  Rwkv7PrepareParams prepare;      // its `out` is not used
  Rwkv7OutputParams output;        // its `y` and `prepared` are not used
  const void* state_in = nullptr;  // [B, H, N, N] acc, [value, key]
  void* state_out = nullptr;       // [B, H, N, N] acc
};

}  // namespace prosg
