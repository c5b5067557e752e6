// Shared pieces of the per-element cell maths. Framework-free: plain C++ that also compiles
// as CUDA device code, so the CPU and GPU paths run the very same formulas.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RNNEXT_HD __host__ __device__ __forceinline__
#else
#define RNNEXT_HD inline
#endif

namespace rnnext {
namespace cells {

template <typename T>
RNNEXT_HD T sigmoid(T x) {
  using std::exp;  // float overload on the host, ADL for vector types
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
RNNEXT_HD T tanh_(T x) {
  using std::tanh;
  return tanh(x);
}

// Derivatives written in terms of the saved activation y, so backward never recomputes an exp.
template <typename T>
RNNEXT_HD T sigmoid_grad(T y) {
  return y * (T(1) - y);
}

template <typename T>
RNNEXT_HD T tanh_grad(T y) {
  return T(1) - y * y;
}

}  // namespace cells
}  // namespace rnnext
