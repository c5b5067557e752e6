// Float GEMMs A B^T with few rows through cuBLASLt: in rnnext the forward's recurrent product
// h W_hh^T of a small batch (and x W_ih^T and m W_hr^T where they have as few rows). Without
// TF32, cuBLAS's own heuristic picks kernels for many of them that run far slower than the
// ones cuBLASLt's picks: on an H200, [8, 256] x [256, 768] took 26 us against 3 us,
// [8, 128] x [128, 128] 52 us against 2.4 us; of 48 shapes of 1 to 16 rows, cuBLASLt's choice
// was slower by more than 2% in two and by at most 1.2% in 11 (benchmarks/cuda_small_gemm.py,
// which times torch's own cuBLASLt path; docs/internals.md). The backward's products of few
// rows (dgates W) stay with cuBLAS: through cuBLASLt they measured slower at some sizes.
// Framework-free header; the per-thread cache of plans lives in lt_gemm.cpp.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace rnnext {
namespace cuda {

// Products with at most this many rows go to cuBLASLt. At 32 and 64 rows its choice was
// slower in 21 of 24 shapes (up to 2.75x); at 16, slower by more than 2% once ([16, 1024] x
// [1024, 4096], 20 us against 17).
constexpr int64_t kLtMaxRows = 16;

// Whether lt_gemm may take products that would otherwise run on `blas`: only cuBLAS's
// default math mode was measured (with TF32 allowed, say, cuBLAS keeps them all). Asked once
// per call of the time loop, not per product.
bool lt_gemm_applies(cublasHandle_t blas);

// Queues row-major C[M, N] = A B^T + beta C on `stream` of device `device`, A stored [M, K]
// and B stored [N, K] (rows of ld lda and ldb), all float, through cuBLASLt with `workspace`
// as its scratch. Returns false, having queued nothing, where cuBLASLt finds or accepts no
// algorithm for the product; the caller then runs cuBLAS itself. Other cuBLAS errors throw
// std::runtime_error.
bool lt_gemm(int device, cudaStream_t stream, void* workspace, size_t workspace_bytes, int64_t M,
             int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
             float beta, float* C, int64_t ldc);

}  // namespace cuda
}  // namespace rnnext
