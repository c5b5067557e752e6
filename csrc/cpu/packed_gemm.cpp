#include "packed_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "target_clones.h"

// The 64-byte vector helpers below are always inlined into their callers, so no call passes
// a vector across the ABI boundary GCC warns about for builds without AVX-512.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace rnnext {
namespace cpu {
namespace {

// GCC vector extensions of 64 bytes (16 floats or 8 doubles): lowered to zmm, ymm or xmm
// registers by each target clone below.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  typedef T unaligned __attribute__((vector_size(64), aligned(sizeof(T))));
  static constexpr int64_t kLanes = 64 / sizeof(T);
};

template <typename T>
inline __attribute__((always_inline)) typename Vec<T>::type load(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::unaligned*>(p);
}

template <typename T>
inline __attribute__((always_inline)) void store(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::unaligned*>(p) = v;
}

// Rows [0, MB) of A times one column tile of R (two vectors, `valid` columns of them real). A
// is read as A[i, k] = A[i * lda + k], or A[k * lda + i] when kTransA (A^T stored [K, M]).
template <int MB, bool kTransA, typename T>
inline __attribute__((always_inline)) void tile(int64_t K, const T* A, int64_t lda, const T* R,
                                                int64_t ldr, T beta, T* C, int64_t ldc,
                                                int64_t valid, const T* bias) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::kLanes;
  V lo[MB], hi[MB];
  for (int i = 0; i < MB; ++i) lo[i] = hi[i] = V{};
  int64_t k = 0;
  if constexpr (MB == 1) {
    // One row has only two chains of dependent FMAs, each waiting out the FMA latency: odd k
    // go to a second pair of accumulators (a batch of one runs every step through here).
    V lo_odd = V{}, hi_odd = V{};
    for (; k + 2 <= K; k += 2) {
      const T a0 = A[k * (kTransA ? lda : 1)], a1 = A[(k + 1) * (kTransA ? lda : 1)];
      lo[0] += a0 * load(R + k * ldr);
      hi[0] += a0 * load(R + k * ldr + L);
      lo_odd += a1 * load(R + (k + 1) * ldr);
      hi_odd += a1 * load(R + (k + 1) * ldr + L);
    }
    lo[0] += lo_odd;
    hi[0] += hi_odd;
  }
  for (; k < K; ++k) {
    const V r_lo = load(R + k * ldr), r_hi = load(R + k * ldr + L);
    for (int i = 0; i < MB; ++i) {
      const T a = kTransA ? A[k * lda + i] : A[i * lda + k];
      lo[i] += a * r_lo;
      hi[i] += a * r_hi;
    }
  }
  if (valid == kPackedTile<T>) {
    // a whole tile: vector stores (a partial one goes through a row on the stack below)
    for (int i = 0; i < MB; ++i) {
      T* c = C + i * ldc;
      if (bias != nullptr) {
        lo[i] += load(bias);
        hi[i] += load(bias + L);
      }
      if (beta != T(0)) {
        lo[i] += beta * load(c);
        hi[i] += beta * load(c + L);
      }
      store(c, lo[i]);
      store(c + L, hi[i]);
    }
    return;
  }
  for (int i = 0; i < MB; ++i) {
    T row[kPackedTile<T>];
    std::memcpy(row, &lo[i], sizeof lo[i]);
    std::memcpy(row + L, &hi[i], sizeof hi[i]);
    if (bias != nullptr) {
      for (int64_t j = 0; j < valid; ++j) row[j] += bias[j];
    }
    T* c = C + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < valid; ++j) c[j] = row[j];
    } else {
      for (int64_t j = 0; j < valid; ++j) c[j] = beta * c[j] + row[j];
    }
  }
}

// One tile of pack_right_operand: R's columns [n0, n0 + kPackedTile) as [K, kPackedTile]
// (zeros past N).
template <typename T>
inline __attribute__((always_inline)) void pack_tile(const T* src, int64_t K, int64_t N,
                                                     bool transposed, int64_t ld, int64_t n0,
                                                     T* tile) {
  constexpr int64_t kTile = kPackedTile<T>;
  const int64_t width = std::min(kTile, N - n0);
  if (!transposed) {  // R's rows are src's: a copy of each row's slice
    for (int64_t k = 0; k < K; ++k) {
      T* row = tile + k * kTile;
      if (width == kTile) {
        std::memcpy(row, src + k * ld + n0, sizeof(T) * kTile);  // inlined, fixed size
      } else {
        std::copy_n(src + k * ld + n0, width, row);
        std::fill(row + width, row + kTile, T(0));
      }
    }
    return;
  }
  // R = src^T: a block of kBlock steps of k at a time. Each of the tile's source rows is read
  // a whole cache line at once: read element by element, rows `ld` apart (4 KB for 1024
  // floats) fall into the same few sets of the L1 cache and evict each other.
  constexpr int64_t kBlock = 64 / sizeof(T);
  T block[kTile][kBlock];
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t depth = std::min(kBlock, K - k0);
    for (int64_t n = 0; n < kTile; ++n) {
      if (n < width && depth == kBlock) {
        // a fixed-size copy the compiler inlines (with a variable size, a call to memmove)
        std::memcpy(block[n], src + (n0 + n) * ld + k0, sizeof block[n]);
      } else if (n < width) {
        std::copy_n(src + (n0 + n) * ld + k0, depth, block[n]);
      } else {
        std::fill_n(block[n], depth, T(0));
      }
    }
    for (int64_t k = 0; k < depth; ++k) {
      T* row = tile + (k0 + k) * kTile;
      for (int64_t n = 0; n < kTile; ++n) row[n] = block[n][k];
    }
  }
}

}  // namespace

// (defined with the entry points below)
void pack_tile_clone(const float* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                     int64_t n0, float* tile);
void pack_tile_clone(const double* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                     int64_t n0, double* tile);
void pack_tile_clone(const uint32_t* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                     int64_t n0, uint32_t* tile);

namespace {

template <typename T>
void pack_tiles(const T* src, int64_t K, int64_t N, bool transposed, int64_t ld, T* dst) {
  // tile by tile: [K, kPackedTile] each, contiguous, so that a tile streams through the cache
  // in order; tiles of about 64K values or more per thread (inside a parallel region, this
  // one thread)
  constexpr int64_t kTile = kPackedTile<T>;
  const int64_t tiles = (N + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * kTile));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      pack_tile_clone(src, K, N, transposed, ld, t * kTile, dst + t * kTile * K);
    }
  });
}

// Rows [0, rows) of C, tile by tile over [n_begin, n_end): 8 rows of accumulators at a time,
// then the rest of the rows. The tiles of R hold k_tile rows each, of which the first K are
// used.
template <bool kTransA, typename T>
inline __attribute__((always_inline)) void rows_times_tiles(int64_t rows, int64_t N, int64_t K,
                                                            const T* A, int64_t lda, const T* R,
                                                            int64_t k_tile, T beta, T* C,
                                                            int64_t ldc, int64_t n_begin,
                                                            int64_t n_end, const T* bias) {
  constexpr int64_t ldr = kPackedTile<T>;
  // the start of row m of A
  auto a_row = [&](int64_t m) { return kTransA ? A + m : A + m * lda; };
  for (int64_t n0 = n_begin; n0 < n_end; n0 += ldr) {
    const int64_t valid = std::min(ldr, N - n0);
    const T* r = R + n0 * k_tile;
    const T* b = bias != nullptr ? bias + n0 : nullptr;
    int64_t m = 0;
    for (; m + 8 <= rows; m += 8)
      tile<8, kTransA>(K, a_row(m), lda, r, ldr, beta, C + m * ldc + n0, ldc, valid, b);
    const T* a = a_row(m);
    T* c = C + m * ldc + n0;
    switch (rows - m) {
      case 1: tile<1, kTransA>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 2: tile<2, kTransA>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 3: tile<3, kTransA>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 4: tile<4, kTransA>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 5: tile<5, kTransA>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 6: tile<6, kTransA>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 7: tile<7, kTransA>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      default: break;
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void gemm_at(int64_t M, int64_t N, int64_t K, const T* A,
                                                   int64_t lda, const T* R, T beta, T* C,
                                                   int64_t ldc, int64_t n_begin, int64_t n_end) {
  // Groups of 8 rows of C outer: A (a block's gate gradients) is the large operand here, and
  // each 8-column strip of it is read once from memory, copied to contiguous rows (its rows
  // lda apart would crowd a few sets of the L1 cache) in chunks of kStripRows rows (a fixed
  // 64 KB buffer on the stack: nothing here allocates, so nothing can throw inside a team),
  // while the caller's tiles of R (its packed inputs) stay in cache.
  constexpr int64_t kStripRows = 8192 / sizeof(T);
  T strip[kStripRows * 8];
  for (int64_t m = 0; m < M; m += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m);
    for (int64_t k0 = 0; k0 < K; k0 += kStripRows) {
      const int64_t kc = std::min(kStripRows, K - k0);
      const T* a = A + k0 * lda + m;
      if (rows == 8) {
        // a fixed-size copy the compiler inlines; with `rows` variable, GCC made each row's
        // 32 bytes a call to memmove, about an eighth of this function's time
        for (int64_t k = 0; k < kc; ++k) std::memcpy(strip + k * 8, a + k * lda, 8 * sizeof(T));
      } else {
        for (int64_t k = 0; k < kc; ++k) {
          for (int64_t i = 0; i < rows; ++i) strip[k * rows + i] = a[k * lda + i];
        }
      }
      // the chunk's rows of each tile of R start k0 rows into the tile
      rows_times_tiles<true>(rows, N, kc, strip, rows, R + k0 * kPackedTile<T>, K,
                             k0 == 0 ? beta : T(1), C + m * ldc, ldc, n_begin, n_end,
                             static_cast<const T*>(nullptr));
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void narrow_rows(int64_t M, int64_t K, const T* A,
                                                       int64_t lda, const T* Rt, T beta, T* C,
                                                       int64_t ldc, int64_t n_begin, int64_t n_end,
                                                       const T* bias) {
  const auto store = [&](int64_t m, int64_t n, T sum) {
    if (bias != nullptr) sum += bias[n];
    T& c = C[m * ldc + n];
    c = beta == T(0) ? sum : beta * c + sum;
  };
  int64_t m = 0;
  // blocks of 4 rows x 4 columns: 16 independent sums, each a[k] and r[k] loaded once a block
  for (; m + 4 <= M; m += 4) {
    const T *a0 = A + m * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
    int64_t n = n_begin;
    for (; n + 4 <= n_end; n += 4) {
      const T *r0 = Rt + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
      T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
      T s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, \
                               s31, s32, s33)
      for (int64_t k = 0; k < K; ++k) {
        s00 += a0[k] * r0[k], s01 += a0[k] * r1[k], s02 += a0[k] * r2[k], s03 += a0[k] * r3[k];
        s10 += a1[k] * r0[k], s11 += a1[k] * r1[k], s12 += a1[k] * r2[k], s13 += a1[k] * r3[k];
        s20 += a2[k] * r0[k], s21 += a2[k] * r1[k], s22 += a2[k] * r2[k], s23 += a2[k] * r3[k];
        s30 += a3[k] * r0[k], s31 += a3[k] * r1[k], s32 += a3[k] * r2[k], s33 += a3[k] * r3[k];
      }
      const T sums[4][4] = {
          {s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23}, {s30, s31, s32, s33}};
      for (int64_t i = 0; i < 4; ++i) {
        for (int64_t j = 0; j < 4; ++j) store(m + i, n + j, sums[i][j]);
      }
    }
    for (; n < n_end; ++n) {
      const T* r = Rt + n * K;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k)
        s0 += a0[k] * r[k], s1 += a1[k] * r[k], s2 += a2[k] * r[k], s3 += a3[k] * r[k];
      store(m, n, s0), store(m + 1, n, s1), store(m + 2, n, s2), store(m + 3, n, s3);
    }
  }
  // the remaining rows, four columns at once
  for (; m < M; ++m) {
    const T* a = A + m * lda;
    int64_t n = n_begin;
    for (; n + 4 <= n_end; n += 4) {
      const T *r0 = Rt + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t k = 0; k < K; ++k)
        s0 += a[k] * r0[k], s1 += a[k] * r1[k], s2 += a[k] * r2[k], s3 += a[k] * r3[k];
      store(m, n, s0), store(m, n + 1, s1), store(m, n + 2, s2), store(m, n + 3, s3);
    }
    for (; n < n_end; ++n) {
      const T* r = Rt + n * K;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < K; ++k) sum += a[k] * r[k];
      store(m, n, sum);
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void narrow_rows_at(int64_t M, int64_t N, int64_t K,
                                                          const T* A, int64_t lda, const T* S,
                                                          int64_t lds, T* C, int64_t ldc) {
  // pieces of kPiece rows of C, each summed over all K in a block on the stack (16 KB)
  constexpr int64_t kPiece = 256;
  T acc[kNarrowMax<T>][kPiece];
  for (int64_t j0 = 0; j0 < M; j0 += kPiece) {
    const int64_t width = std::min(kPiece, M - j0);
    for (int64_t n = 0; n < N; ++n) std::fill_n(acc[n], width, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T* a = A + k * lda + j0;
      for (int64_t n = 0; n < N; ++n) {
        const T s = S[k * lds + n];
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) acc[n][j] += s * a[j];
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      for (int64_t n = 0; n < N; ++n) C[(j0 + j) * ldc + n] += acc[n][j];
    }
  }
}

}  // namespace

// The entry points, once per type: each a target clone (a template cannot be one), inlining
// its template above. (Packing clones only the tile: its parallel_for lambda would not be.)
#define RNNEXT_PACKED_GEMM_ENTRY_POINTS(T)                                                        \
  RNNEXT_CPU_CLONES void pack_tile_clone(const T* src, int64_t K, int64_t N, bool transposed,     \
                                         int64_t ld, int64_t n0, T* tile) {                       \
    pack_tile(src, K, N, transposed, ld, n0, tile);                                               \
  }                                                                                               \
  void pack_right_operand(const T* src, int64_t K, int64_t N, bool transposed, int64_t ld,        \
                          T* dst) {                                                               \
    pack_tiles(src, K, N, transposed, ld, dst);                                                   \
  }                                                                                               \
  /* tiles outer: the few rows of A stay in cache while the tiles of R stream past */             \
  RNNEXT_CPU_CLONES void packed_gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,    \
                                     const T* R, T beta, T* C, int64_t ldc, int64_t n_begin,      \
                                     int64_t n_end, const T* bias) {                              \
    rows_times_tiles<false>(M, N, K, A, lda, R, K, beta, C, ldc, n_begin, n_end, bias);           \
  }                                                                                               \
  RNNEXT_CPU_CLONES void packed_gemm_at(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, \
                                        const T* R, T beta, T* C, int64_t ldc, int64_t n_begin,   \
                                        int64_t n_end) {                                          \
    gemm_at(M, N, K, A, lda, R, beta, C, ldc, n_begin, n_end);                                    \
  }                                                                                               \
  RNNEXT_CPU_CLONES void narrow_gemm(int64_t M, int64_t K, const T* A, int64_t lda, const T* Rt,  \
                                     T beta, T* C, int64_t ldc, int64_t n_begin, int64_t n_end,   \
                                     const T* bias) {                                             \
    narrow_rows(M, K, A, lda, Rt, beta, C, ldc, n_begin, n_end, bias);                            \
  }                                                                                               \
  RNNEXT_CPU_CLONES void narrow_gemm_at(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, \
                                        const T* S, int64_t lds, T* C, int64_t ldc) {             \
    narrow_rows_at(M, N, K, A, lda, S, lds, C, ldc);                                              \
  }
RNNEXT_PACKED_GEMM_ENTRY_POINTS(float)
RNNEXT_PACKED_GEMM_ENTRY_POINTS(double)
#undef RNNEXT_PACKED_GEMM_ENTRY_POINTS

// 32-bit words, tiled as floats are: pairs of bfloat16 values (pack_right_operand_bf16)
RNNEXT_CPU_CLONES void pack_tile_clone(const uint32_t* src, int64_t K, int64_t N, bool transposed,
                                       int64_t ld, int64_t n0, uint32_t* tile) {
  pack_tile(src, K, N, transposed, ld, n0, tile);
}
void pack_right_operand(const uint32_t* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                        uint32_t* dst) {
  pack_tiles(src, K, N, transposed, ld, dst);
}

}  // namespace cpu
}  // namespace rnnext
