// Host-side argument validation shared by every op. Each failure names the op, the
// argument and the expected versus actual value, and raises c10::Error (a Python
// RuntimeError / ValueError), never a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace prosg {

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

// A dimension of -1 in `expected` matches any size (printed as "*").
inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<int64_t> expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  if (ok) {
    int64_t d = 0;
    for (int64_t e : expected) {
      ok = ok && (e < 0 || t.size(d) == e);
      ++d;
    }
  }
  if (!ok) {
    std::ostringstream want;
    want << "[";
    int64_t d = 0;
    for (int64_t e : expected) {
      want << (d++ ? ", " : "");
      if (e < 0) want << "*"; else want << e;
    }
    want << "]";
    TORCH_CHECK_VALUE(false, op, ": ", name, " must have shape ", want.str(), ", got ", shape_str(t.sizes()));
  }
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the same device as ", ref_name,
                    " (", ref.device(), "), got ", t.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_VALUE(t.scalar_type() == expected, op, ": ", name, " must have dtype ", expected, ", got ",
                    t.scalar_type());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t, bool allow_double) {
  auto s = t.scalar_type();
  bool ok = s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || (allow_double && s == at::kDouble);
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must be float32, float16 or bfloat16",
                    allow_double ? " (or float64 on the CPU)" : "", ", got ", s);
}

}  // namespace prosg
