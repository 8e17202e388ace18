// What the CPU-executed CUDA suites (test_cuda_*.cpp) share: dtype names, the
// tolerances of tests/tolerances.py, random draws, NaN-poisoned outputs, the
// elementwise comparison with a float64 reference, the launch check, input layouts.
//
// Each suite defines its own generator (its own seed), so its inputs do not depend on
// another suite's draws:
//   std::mt19937_64& prosg::emu_test::rng() { static std::mt19937_64 g(SEED); return g; }
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/cuda_types.cuh"  // the CUDA stand-ins: cuda_emu.h
#include "tests/harness.h"

namespace prosg::emu_test {

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    default: return "float64";
  }
}

// Tolerances as tests/tolerances.py: float32 accumulation, and 4 roundings' worth
// (4u) for an output stored in float16/bfloat16.
inline double tol_of(DType d) {
  switch (d) {
    case DType::kFloat16: return 4 * std::ldexp(1.0, -11);
    case DType::kBFloat16: return 4 * std::ldexp(1.0, -8);
    default: return 2e-5;
  }
}

std::mt19937_64& rng();  // defined by each suite

inline double normal() {
  static std::normal_distribution<double> d(0.0, 1.0);
  return d(rng());
}
inline double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng()); }

// How a multi-dimensional input is laid out in memory (each suite's input structs map
// these to strides).
enum class Layout { kContiguous, kPadded, kTransposed, kExpanded };
inline const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous: return "contiguous";
    case Layout::kPadded: return "padded";
    case Layout::kTransposed: return "transposed";
    default: return "expanded";
  }
}

// A NaN-filled output of n elements of E (at least one, so data() is never null): an
// element a kernel leaves unwritten fails the comparison.
template <typename E>
std::vector<E> poisoned(int64_t n) {
  return std::vector<E>(static_cast<size_t>(std::max<int64_t>(n, 1)), cuda::from_float<E>(NAN));
}

template <typename E>
std::vector<double> as_double(const std::vector<E>& v, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = cuda::to_float(v[i]);
  return out;
}

// actual ~ expected elementwise: |a - e| <= atol + tol |e|, a NaN on either side a
// failure. By default atol = tol * max(1, max|expected|) (results that are sums of O(1)
// terms; see tests/test_wkv4.py's check); pass `atol` for a fixed one.
inline bool close(const std::string& what, const std::vector<double>& actual, const std::vector<double>& expected,
                  double tol, double atol = -1) {
  if (atol < 0) {
    double scale = 1.0;
    for (double e : expected) scale = std::max(scale, std::fabs(e));
    atol = tol * scale;
  }
  int64_t bad = 0, first = -1;
  double worst = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double a = actual[i], e = expected[i];
    const bool ok = !std::isnan(a) && !std::isnan(e) && std::fabs(a - e) <= atol + tol * std::fabs(e);
    if (!ok) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++bad;
      worst = std::max(worst, std::isnan(a) ? INFINITY : std::fabs(a - e));
    }
  }
  PROSG_EXPECT(bad == 0) << what << ":" << bad << "of" << expected.size() << "elements off, first at" << first
                         << "(got" << (first >= 0 ? actual[first] : 0) << "expected"
                         << (first >= 0 ? expected[first] : 0) << "), worst |diff|" << worst << "atol" << atol;
  return bad == 0;
}

inline void expect_launch(cudaError_t err, const std::string& what) {
  PROSG_EXPECT(err == cudaSuccess) << what << ":" << cudaGetErrorName(err) << cuda_emu::failure_message();
}

}  // namespace prosg::emu_test
