// Torch-free description of a tensor element type, passed from the host wrappers to
// the CUDA launchers (which are compiled without torch headers to keep nvcc fast).
#pragma once

namespace prosg {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace prosg

// __host__ __device__ for the shared math headers; plain inline for the host compiler.
#if defined(__CUDACC__)
#define PROSG_HD __host__ __device__ __forceinline__
#else
#define PROSG_HD inline
#endif
