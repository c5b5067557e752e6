#include "packed_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "target_clones.h"

namespace rnnext {
namespace cpu {
namespace {

// GCC vector extensions: lowered to zmm, ymm or xmm registers by each target clone below.
typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec16Unaligned __attribute__((vector_size(64), aligned(4)));

inline Vec16 load16(const float* p) {
  return *reinterpret_cast<const Vec16Unaligned*>(p);
}

inline void store16(float* p, Vec16 v) {
  *reinterpret_cast<Vec16Unaligned*>(p) = v;
}

// Rows [0, MB) of A times one column tile of R (32 columns, `valid` of them real). A is read
// as A[i, k] = A[i * lda + k], or A[k * lda + i] when kTransA (A^T stored [K, M]).
template <int MB, bool kTransA>
inline __attribute__((always_inline)) void tile(int64_t K, const float* A, int64_t lda,
                                                const float* R, int64_t ldr, float beta, float* C,
                                                int64_t ldc, int64_t valid, const float* bias) {
  Vec16 lo[MB], hi[MB];
  for (int i = 0; i < MB; ++i) lo[i] = hi[i] = Vec16{};
  for (int64_t k = 0; k < K; ++k) {
    const Vec16 r_lo = load16(R + k * ldr), r_hi = load16(R + k * ldr + 16);
    for (int i = 0; i < MB; ++i) {
      const float a = kTransA ? A[k * lda + i] : A[i * lda + k];
      lo[i] += a * r_lo;
      hi[i] += a * r_hi;
    }
  }
  if (valid == kPackedTile) {
    // a whole tile: vector stores (a partial one goes through a row on the stack below)
    for (int i = 0; i < MB; ++i) {
      float* c = C + i * ldc;
      if (bias != nullptr) {
        lo[i] += load16(bias);
        hi[i] += load16(bias + 16);
      }
      if (beta != 0.f) {
        lo[i] += beta * load16(c);
        hi[i] += beta * load16(c + 16);
      }
      store16(c, lo[i]);
      store16(c + 16, hi[i]);
    }
    return;
  }
  for (int i = 0; i < MB; ++i) {
    float row[kPackedTile];
    std::memcpy(row, &lo[i], sizeof lo[i]);
    std::memcpy(row + 16, &hi[i], sizeof hi[i]);
    if (bias != nullptr) {
      for (int64_t j = 0; j < valid; ++j) row[j] += bias[j];
    }
    float* c = C + i * ldc;
    if (beta == 0.f) {
      for (int64_t j = 0; j < valid; ++j) c[j] = row[j];
    } else {
      for (int64_t j = 0; j < valid; ++j) c[j] = beta * c[j] + row[j];
    }
  }
}

// One tile of pack_right_operand: R's columns [n0, n0 + 32) as [K, 32] (zeros past N).
RNNEXT_CPU_CLONES
void pack_tile(const float* src, int64_t K, int64_t N, bool transposed, int64_t ld, int64_t n0,
               float* tile) {
  const int64_t width = std::min(kPackedTile, N - n0);
  if (!transposed) {  // R's rows are src's: a copy of each row's slice
    for (int64_t k = 0; k < K; ++k) {
      float* row = tile + k * kPackedTile;
      if (width == kPackedTile) {
        std::memcpy(row, src + k * ld + n0, sizeof(float) * kPackedTile);  // inlined, fixed size
      } else {
        std::copy_n(src + k * ld + n0, width, row);
        std::fill(row + width, row + kPackedTile, 0.f);
      }
    }
    return;
  }
  // R = src^T: a block of kBlock steps of k at a time. Each of the tile's source rows is read
  // a whole cache line at once: read element by element, rows `ld` apart (4 KB for 1024
  // floats) fall into the same few sets of the L1 cache and evict each other.
  constexpr int64_t kBlock = 16;
  float block[kPackedTile][kBlock];
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t depth = std::min(kBlock, K - k0);
    for (int64_t n = 0; n < kPackedTile; ++n) {
      if (n < width && depth == kBlock) {
        // a fixed-size copy the compiler inlines (with a variable size, a call to memmove)
        std::memcpy(block[n], src + (n0 + n) * ld + k0, sizeof block[n]);
      } else if (n < width) {
        std::copy_n(src + (n0 + n) * ld + k0, depth, block[n]);
      } else {
        std::fill_n(block[n], depth, 0.f);
      }
    }
    for (int64_t k = 0; k < depth; ++k) {
      float* row = tile + (k0 + k) * kPackedTile;
      for (int64_t n = 0; n < kPackedTile; ++n) row[n] = block[n][k];
    }
  }
}

}  // namespace

void pack_right_operand(const float* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                        float* dst) {
  // tile by tile: [K, 32] each, contiguous, so that a tile streams through the cache in order;
  // tiles of about 64K values or more per thread (inside a parallel region, this one thread)
  const int64_t tiles = (N + kPackedTile - 1) / kPackedTile;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * kPackedTile));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      pack_tile(src, K, N, transposed, ld, t * kPackedTile, dst + t * kPackedTile * K);
    }
  });
}

namespace {

// Rows [0, rows) of C, tile by tile over [n_begin, n_end): 8 rows of accumulators at a time,
// then the rest of the rows. The tiles of R hold k_tile rows each, of which the first K are
// used.
template <bool kTransA>
inline __attribute__((always_inline)) void rows_times_tiles(
    int64_t rows, int64_t N, int64_t K, const float* A, int64_t lda, const float* R, int64_t k_tile,
    float beta, float* C, int64_t ldc, int64_t n_begin, int64_t n_end, const float* bias) {
  const int64_t ldr = kPackedTile;
  // the start of row m of A
  auto a_row = [&](int64_t m) { return kTransA ? A + m : A + m * lda; };
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPackedTile) {
    const int64_t valid = std::min(kPackedTile, N - n0);
    const float* r = R + n0 * k_tile;
    const float* b = bias != nullptr ? bias + n0 : nullptr;
    int64_t m = 0;
    for (; m + 8 <= rows; m += 8)
      tile<8, kTransA>(K, a_row(m), lda, r, ldr, beta, C + m * ldc + n0, ldc, valid, b);
    const float* a = a_row(m);
    float* c = C + m * ldc + n0;
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

}  // namespace

RNNEXT_CPU_CLONES
void packed_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* R,
                 float beta, float* C, int64_t ldc, int64_t n_begin, int64_t n_end,
                 const float* bias) {
  // tiles outer: the few rows of A stay in cache while the tiles of R stream past
  rows_times_tiles<false>(M, N, K, A, lda, R, K, beta, C, ldc, n_begin, n_end, bias);
}

RNNEXT_CPU_CLONES
void packed_gemm_at(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* R,
                    float beta, float* C, int64_t ldc, int64_t n_begin, int64_t n_end) {
  // Groups of 8 rows of C outer: A (a block's gate gradients) is the large operand here, and
  // each 8-column strip of it is read once from memory, copied to contiguous rows (its rows
  // lda apart would crowd a few sets of the L1 cache) in chunks of kStripRows rows (a fixed
  // buffer on the stack: nothing here allocates, so nothing can throw inside a team), while
  // the caller's tiles of R (its packed inputs) stay in cache.
  constexpr int64_t kStripRows = 2048;
  float strip[kStripRows * 8];
  for (int64_t m = 0; m < M; m += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m);
    for (int64_t k0 = 0; k0 < K; k0 += kStripRows) {
      const int64_t kc = std::min(kStripRows, K - k0);
      const float* a = A + k0 * lda + m;
      if (rows == 8) {
        // a fixed-size copy the compiler inlines; with `rows` variable, GCC made each row's
        // 32 bytes a call to memmove, about an eighth of this function's time
        for (int64_t k = 0; k < kc; ++k) std::memcpy(strip + k * 8, a + k * lda, 8 * sizeof(float));
      } else {
        for (int64_t k = 0; k < kc; ++k) {
          for (int64_t i = 0; i < rows; ++i) strip[k * rows + i] = a[k * lda + i];
        }
      }
      // the chunk's rows of each tile of R start k0 rows into the tile
      rows_times_tiles<true>(rows, N, kc, strip, rows, R + k0 * kPackedTile, K,
                             k0 == 0 ? beta : 1.f, C + m * ldc, ldc, n_begin, n_end, nullptr);
    }
  }
}

void parallel_packed_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                          const float* R, float beta, float* C, int64_t ldc, const float* bias,
                          Cols cols) {
  if (M == 0 || cols.size() <= 0) return;
  parallel_over_tiles(cols, M * K * kPackedTile, [&](int64_t n0, int64_t n1) {
    packed_gemm(M, N, K, A, lda, R, beta, C, ldc, n0, n1, bias);
  });
}

}  // namespace cpu
}  // namespace rnnext
