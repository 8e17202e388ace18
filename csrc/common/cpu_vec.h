// Small vectorised loops for the CPU kernels (at::vec picks AVX2/AVX512 at runtime).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace prosg::cpu {

// sum_i a[i] * b[i] over contiguous arrays.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc0(T(0)), acc1(T(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + W), Vec::loadu(b + i + W), acc1);
  }
  for (; i + W <= n; i += W) acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  T s = at::vec::vec_reduce_all<T>([](Vec& u, Vec& v) { return u + v; }, acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Strided elements of any floating type, converted to the contiguous accumulation type.
template <typename acc_t, typename T>
inline void gather(acc_t* dst, const T* src, int64_t stride, int64_t n) {
  if constexpr (std::is_same_v<acc_t, T>) {
    if (stride == 1) {
      std::copy(src, src + n, dst);
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i * stride]);
}

}  // namespace prosg::cpu
