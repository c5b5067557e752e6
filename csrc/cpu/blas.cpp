#include "blas.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

// Fortran BLAS entry points, weak so that the library still loads against a torch build that
// does not export them; a null address selects the ATen fallback.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace rnnext {
namespace cpu {
namespace {

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                             const T*, const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
FortranGemm<T> fortran_gemm();
template <>
FortranGemm<float> fortran_gemm<float>() {
  return &sgemm_;
}
template <>
FortranGemm<double> fortran_gemm<double>() {
  return &dgemm_;
}

bool fits_int(std::initializer_list<int64_t> values) {
  return std::all_of(values.begin(), values.end(),
                     [](int64_t v) { return v <= std::numeric_limits<int>::max(); });
}

template <typename T>
at::Tensor matrix_view(const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  auto t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return trans ? t.t() : t;
}

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0 || (K == 0 && beta == T(1))) return;
  const FortranGemm<T> blas = fortran_gemm<T>();
  if (blas != nullptr && K > 0 && fits_int({M, N, K, lda, ldb, ldc})) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    blas(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  at::Tensor c = matrix_view(C, M, N, ldc, false);
  at::Tensor a = trans_a ? matrix_view(A, K, M, lda, true) : matrix_view(A, M, K, lda, false);
  at::Tensor b = trans_b ? matrix_view(B, N, K, ldb, true) : matrix_view(B, K, N, ldb, false);
  c.addmm_(a, b, beta, alpha);
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

}  // namespace cpu
}  // namespace rnnext
