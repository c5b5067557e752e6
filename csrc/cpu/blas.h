// Row-major GEMM for the time loops: C[M, N] = alpha * op(A) @ op(B) + beta * C, where op(X) is
// X or X^T. It calls the BLAS that torch ships (sgemm_/dgemm_) directly, skipping the ATen
// dispatcher and its per-call cost of several microseconds; where that BLAS is not exported it
// falls back to ATen.
#pragma once

#include <cstdint>

namespace rnnext {
namespace cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace cpu
}  // namespace rnnext
