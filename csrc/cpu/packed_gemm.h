// The GEMMs whose right-hand operand is a weight, C[M, N] = A[M, K] @ R (+ beta C), R the same
// at every step of a call. R is packed once per call into column tiles and multiplied by a
// register-blocked kernel (8 rows x 2 vectors of accumulators: 32 floats or 16 doubles per
// row) that keeps each tile of R in cache across the rows: in float measured here at 109-116
// GFLOP/s on one thread, where MKL's sgemm reached 75-101, and well ahead of a BLAS call for
// the few rows of a time step. float and double; a null packed operand goes to BLAS.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "blas.h"
#include "team.h"

namespace rnnext {
namespace cpu {

// Columns per tile of a packed operand: two 64-byte vectors, 32 floats or 16 doubles.
template <typename T>
inline constexpr int64_t kPackedTile = 128 / sizeof(T);
template <typename T>
inline int64_t packed_ld(int64_t n) {
  return (n + kPackedTile<T> - 1) / kPackedTile<T> * kPackedTile<T>;
}

// dst = R packed: packed_ld(N) / kPackedTile tiles one after the other, each R's
// [K, kPackedTile] block of columns, contiguous and zero padded past N. R [K, N] is src^T for
// src [N, K] (transposed = true) or src itself, [K, N]; src's rows are `ld` apart.
void pack_right_operand(const float* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                        float* dst);
void pack_right_operand(const double* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                        double* dst);
// The same for 32-bit words (tiles of 32 columns, as float's).
void pack_right_operand(const uint32_t* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                        uint32_t* dst);

// C[M, N] = A[M, K] @ R + beta C (+ bias [N] on every row, unless null) for the columns
// [n_begin, n_end) (n_begin a multiple of the tile; n_end one too, or N).
void packed_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* R,
                 float beta, float* C, int64_t ldc, int64_t n_begin, int64_t n_end,
                 const float* bias = nullptr);
void packed_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* R,
                 double beta, double* C, int64_t ldc, int64_t n_begin, int64_t n_end,
                 const double* bias = nullptr);

// Widths N up to which a weight operand is kept as R^T [N, K] rather than in column tiles: a
// tile would be mostly zero padding (with I = 2, a dx product did 16 times its work).
template <typename T>
inline constexpr int64_t kNarrowMax = kPackedTile<T> / 2;
template <typename T>
inline bool is_narrow(int64_t N) {
  return N <= kNarrowMax<T>;
}

// C[M, n_begin:n_end] = A[M, K] @ R + beta C (+ bias on every row, unless null), R given as
// Rt = R^T [N, K]: a dot product per element, along K, in blocks of 4 rows x 4 columns. For
// narrow N, and for the forward's products (Rt = the weight as stored) of at most 16 rows.
void narrow_gemm(int64_t M, int64_t K, const float* A, int64_t lda, const float* Rt, float beta,
                 float* C, int64_t ldc, int64_t n_begin, int64_t n_end, const float* bias);
void narrow_gemm(int64_t M, int64_t K, const double* A, int64_t lda, const double* Rt, double beta,
                 double* C, int64_t ldc, int64_t n_begin, int64_t n_end, const double* bias);

// C[M, N] += A^T @ S, A^T stored as [K, M] with row stride lda, S [K, N] (row stride lds),
// is_narrow(N): the weight-gradient form dW = dG^T X for a narrow X, summed from zero over
// all K rows and then added.
void narrow_gemm_at(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* S,
                    int64_t lds, float* C, int64_t ldc);
void narrow_gemm_at(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* S,
                    int64_t lds, double* C, int64_t ldc);

// bfloat16 operands (packed_gemm_bf16.cpp). A float layer whose weights are bfloat16 values (a
// module converted with .bfloat16()) may have its weight products take A and R rounded to
// bfloat16, as torch.nn's bfloat16 layers do: each product of two bfloat16 values is exact in
// float and the sums stay in float, on AVX512-BF16's dot-product instruction, at up to twice
// the float kernel's rate.
//
// Whether this CPU has that instruction (the build compiles the kernel for it where GCC can).
bool cpu_has_bf16_dot();
// Whether calls that ask for bfloat16 products get them: cpu_has_bf16_dot(), unless the
// environment variable RNNEXT_CPU_BF16_PRODUCTS is "0" (then they compute in float32; read
// at every call).
bool bf16_products_enabled();
// x rounded to the nearest bfloat16 (ties to even; NaN stays NaN), as its bits.
uint16_t round_to_bf16(float x);
// Pairs of rows of K (a zero row after an odd K).
inline int64_t bf16_pairs(int64_t K) {
  return (K + 1) / 2;
}
// Elements of R [K, N] packed by pack_right_operand_bf16.
int64_t packed_bf16_size(int64_t K, int64_t N);
// dst = R in bfloat16, in the column tiles of pack_right_operand (32 columns each), each tile
// bf16_pairs(K) pairs of rows: per pair, per column, its two rows' values next to each other
// (the dot-product instruction's operand layout). R [K, N] is src^T for src [N, K] (transposed)
// or src itself; src's rows are `ld` apart.
void pack_right_operand_bf16(const float* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                             uint16_t* dst);
// The same from a bfloat16 source (its bits as uint16_t): a copy, nothing rounded.
void pack_right_operand_bf16(const uint16_t* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                             uint16_t* dst);
// packed_gemm and packed_gemm_at with A rounded to bfloat16 and R packed by
// pack_right_operand_bf16.
void packed_gemm_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                      const uint16_t* R, float beta, float* C, int64_t ldc, int64_t n_begin,
                      int64_t n_end, const float* bias);
void packed_gemm_at_bf16(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         const uint16_t* R, float beta, float* C, int64_t ldc, int64_t n_begin,
                         int64_t n_end);

// The right-hand weight operand of a GEMM: `data` is R [K, N] row-major, or R^T [N, K] when
// `transposed`; `packed` its packed copy: column tiles, or R^T [N, K] itself where
// is_narrow<T>(N); or, for float, `packed_bf16` (pack_right_operand_bf16), for products in
// bfloat16. Neither: BLAS.
template <typename T>
struct RightOperand {
  const T* data = nullptr;
  bool transposed = false;
  const T* packed = nullptr;
  const uint16_t* packed_bf16 = nullptr;

  bool is_packed() const { return packed != nullptr || packed_bf16 != nullptr; }
};

// packed_gemm (or packed_gemm_bf16) of a packed, not narrow, R over the columns [n_begin, n_end).
template <typename T>
void packed_product(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                    const RightOperand<T>& R, T beta, T* C, int64_t ldc, int64_t n_begin,
                    int64_t n_end, const T* bias) {
  if constexpr (std::is_same_v<T, float>) {
    if (R.packed_bf16 != nullptr) {
      packed_gemm_bf16(M, N, K, A, lda, R.packed_bf16, beta, C, ldc, n_begin, n_end, bias);
      return;
    }
  }
  packed_gemm(M, N, K, A, lda, R.packed, beta, C, ldc, n_begin, n_end, bias);
}

// C[M, N] = A^T @ R + beta C for the columns [n_begin, n_end), A^T stored as [K, M] with row
// stride lda: the weight-gradient form dW = dG^T X, with R the packed rows of X.
void packed_gemm_at(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* R,
                    float beta, float* C, int64_t ldc, int64_t n_begin, int64_t n_end);
void packed_gemm_at(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* R,
                    double beta, double* C, int64_t ldc, int64_t n_begin, int64_t n_end);

// Calls tiles(n_begin, n_end) over ranges of the column tiles (of T) of the columns `cols`
// (begin a multiple of the tile), split among threads; macs_per_tile (the multiply-adds of
// one tile) decides how many threads pay.
template <typename T, typename F>
void parallel_over_tiles(Cols cols, int64_t macs_per_tile, const F& tiles) {
  constexpr int64_t tile = kPackedTile<T>;
  const int64_t count = (cols.size() + tile - 1) / tile;
  // at least ~64K multiply-adds per thread, or the hand-off costs more than it saves
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, macs_per_tile));
  parallel_for_leaf(0, count, grain, [&](int64_t t0, int64_t t1) {
    tiles(cols.begin + t0 * tile, std::min(cols.end, cols.begin + t1 * tile));
  });
}

// packed_product over the columns `cols`, split among threads.
template <typename T>
void parallel_packed_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                          const RightOperand<T>& R, T beta, T* C, int64_t ldc, const T* bias,
                          Cols cols) {
  if (M == 0 || cols.size() <= 0) return;
  parallel_over_tiles<T>(cols, M * K * kPackedTile<T>, [&](int64_t n0, int64_t n1) {
    packed_product(M, N, K, A, lda, R, beta, C, ldc, n0, n1, bias);
  });
}

// Adds bias [N] to every row of rows [M, N] (row stride ld).
template <typename T>
void add_rows(T* rows, int64_t M, int64_t N, int64_t ld, const T* bias) {
  parallel_for_leaf(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)),
                    [&](int64_t r0, int64_t r1) {
                      for (int64_t r = r0; r < r1; ++r) {
                        T* row = rows + r * ld;
#pragma omp simd
                        for (int64_t j = 0; j < N; ++j) row[j] += bias[j];
                      }
                    });
}

// Rows of A per chunk of a packed product: about 512 KB of A (in float), which stays in cache
// while the tiles of R stream past it.
inline int64_t packed_chunk_rows(int64_t K) {
  return std::clamp<int64_t>(131072 / std::max<int64_t>(K, 1), 64, 1024);
}

// Rows up to which a BLAS product (an unpacked weight: a call of fewer than 4 steps or 17 rows)
// has its columns split among the threads. Measured on 2 threads, one process per setting (best
// of 3 x 5), time against one BLAS call: T = 1 forward at B = 1, 4, 16 and H = 256-1024
// 0.27-0.91 (GRU (1, 1, 1024) 0.29), forward+backward 0.46-1.03; at 32 to 128 rows the
// split gained nothing beyond noise (0.82-1.13), as BLAS threads those itself.
constexpr int64_t kBlasSplitMaxRows = 16;

// C = A @ R + beta C (+ bias [N] on every row, unless null) over the columns `cols` of C (all
// N when left out; begin a multiple of the tile): the packed kernel over chunks of
// packed_chunk_rows rows where R is packed, else BLAS.
template <typename T>
void weight_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const RightOperand<T>& R,
                 T beta, T* C, int64_t ldc, const T* bias = nullptr, Cols cols = {0, -1}) {
  if (cols.end < 0) cols = {0, N};
  if (M == 0 || cols.size() <= 0) return;
  if (R.packed != nullptr && is_narrow<T>(N)) {
    narrow_gemm(M, K, A, lda, R.packed, beta, C, ldc, cols.begin, cols.end, bias);
    return;
  }
  if (R.is_packed()) {
    const int64_t chunk = packed_chunk_rows(K);
    for (int64_t r0 = 0; r0 < M; r0 += chunk) {
      parallel_packed_gemm<T>(std::min(chunk, M - r0), N, K, A + r0 * lda, lda, R, beta,
                              C + r0 * ldc, ldc, bias, cols);
    }
    return;
  }
  const auto blas_cols = [&](int64_t n0, int64_t n1) {
    const T* r = R.transposed ? R.data + n0 * K : R.data + n0;
    gemm<T>(false, R.transposed, M, n1 - n0, K, T(1), A, lda, r, R.transposed ? K : N, beta, C + n0,
            ldc);
    if (bias != nullptr) add_rows(C + n0, M, n1 - n0, ldc, bias + n0);
  };
  if (M > kBlasSplitMaxRows) {
    blas_cols(cols.begin, cols.end);
    return;
  }
  if (R.transposed) {
    // R^T = W [N, K] as stored: dot products along K (narrow_gemm's form) beat BLAS on so few
    // rows (BLAS here ran a generic, unvectorised kernel for one row). Measured forward op at
    // T = 1 (best of 7 x 500 calls): B = 1, H = 256 0.78-0.83 of the time for every cell;
    // B = 4, H = 512 0.55-0.64; B = 16, H = 512 0.90-0.93; (2, 8, 256) unchanged.
    parallel_over_tiles<T>(cols, M * K * kPackedTile<T>, [&](int64_t n0, int64_t n1) {
      narrow_gemm(M, K, A, lda, R.data, beta, C, ldc, n0, n1, bias);
    });
    return;
  }
  // BLAS ran a product of so few rows on one thread: its column tiles are shared out among
  // torch's threads instead, as for the packed kernel, each share a BLAS call of its own.
  parallel_over_tiles<T>(cols, M * K * kPackedTile<T>, blas_cols);
}

}  // namespace cpu
}  // namespace rnnext
