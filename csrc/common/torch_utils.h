// Host helpers that need torch: the dtype rules and the device guard every op shares.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/dtype.h"

namespace prosg {

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "prosg: unsupported dtype ", s);
  }
}

inline at::ScalarType to_scalar_type(DType d) {
  switch (d) {
    case DType::kFloat32: return at::kFloat;
    case DType::kFloat16: return at::kHalf;
    case DType::kBFloat16: return at::kBFloat16;
    case DType::kFloat64: return at::kDouble;
  }
  TORCH_CHECK(false, "prosg: unknown DType ", static_cast<int>(d));
}

// The type of every state and accumulator: float64 for float64 inputs, else float32
// (also for float16/bfloat16 inputs).
inline at::ScalarType acc_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

// The device guard of an op's kernels, on `t`'s device when that is a CUDA device. The
// dispatcher picks the CUDA kernels when *any* argument is on CUDA; a CUDA guard on a
// CPU `t` would fail an internal assert before validation names the misplaced tensor.
inline c10::OptionalDeviceGuard device_guard_for(const at::Tensor& t) {
  return c10::OptionalDeviceGuard(t.is_cuda() ? std::optional<c10::Device>(t.device()) : std::nullopt);
}

}  // namespace prosg
