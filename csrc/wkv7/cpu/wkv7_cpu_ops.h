// The CPU side of wkv7_math.h, shared by the CPU kernels that step RWKV-7 states
// (wkv7_cpu.cpp, rwkv7_step_cpu.cpp): the Ops of at::vec vectors (one key index j
// per lane) and the dispatch of a runtime head size to the template argument N.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace prosg::wkv7 {

template <typename T>
struct VecOps {
  using V = at::vec::Vectorized<T>;
  // exp_u20 (2 ulp) is about twice as fast as exp (1 ulp) and as exact as CUDA's expf.
  static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) return x.exp_u20();
    else return x.exp();
  }
  static V neg(const V& x) { return x.neg(); }
  static V fma(const V& x, const V& y, const V& z) { return at::vec::fmadd(x, y, z); }
  static T sum(const V& x) {
    return at::vec::vec_reduce_all<T>([](V& u, V& v) { return u + v; }, x);
  }
  template <int M>
  static void sum_all(const V* acc, T* out) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float> && M == 4) {
      // Three horizontal adds and one lane add reduce four registers at once: a
      // separate reduction per row cost as much as the row's arithmetic at N = 64.
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
      return;
    }
#endif
    for (int m = 0; m < M; ++m) out[m] = sum(acc[m]);
  }
};

template <typename Fn>
void dispatch_head_size(int64_t n, Fn&& fn) {
  switch (n) {
    case 16: return fn.template operator()<16>();
    case 32: return fn.template operator()<32>();
    case 64: return fn.template operator()<64>();
    case 128: return fn.template operator()<128>();
    default: TORCH_CHECK(false, "prosg.wkv7: unsupported head size ", n);
  }
}

}  // namespace prosg::wkv7
