// Shared pieces of the per-element cell maths. Framework-free: plain C++ that also compiles
// as CUDA device code, so the CPU and GPU paths run the very same formulas.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Always inlined: the CPU pointwise loops are compiled once per instruction set (target
// clones), and GCC vectorises a cell's maths there only when it is inlined into each clone.
#if defined(__CUDACC__)
#define RNNEXT_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RNNEXT_HD inline __attribute__((always_inline))
#else
#define RNNEXT_HD inline
#endif

namespace rnnext {
namespace cells {

#if !defined(__CUDA_ARCH__)
namespace host_float {

// float exp, tanh and sigmoid for the CPU as branch-free polynomials (Cody-Waite reduction,
// Cephes coefficients), within about 1 ulp of the exact value (relative error under 1.4e-7 on
// [-20, 20]). Unlike libm's calls, the compiler vectorises them inside the pointwise loops.
RNNEXT_HD float from_bits(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

RNNEXT_HD float exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);                     // keeps 2^n a normal float
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;           // x - n ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  return p * from_bits((static_cast<int32_t>(n) + 127) << 23);
}

RNNEXT_HD float tanh(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;  // odd polynomial, accurate for |x| < 0.625
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = 1.f - 2.f / (exp(2.f * a) + 1.f);
  return a < 0.625f ? small : std::copysign(large, x);
}

}  // namespace host_float
#endif

template <typename T>
RNNEXT_HD T sigmoid(T x) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return 1.f / (1.f + host_float::exp(-x));
#endif
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

template <typename T>
RNNEXT_HD T tanh_(T x) {
#if !defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) return host_float::tanh(x);
#endif
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
