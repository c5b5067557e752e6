#include "packed_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

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

// Rows [0, MB) of A times one column tile of R (32 columns, `valid` of them real).
template <int MB>
inline __attribute__((always_inline)) void tile(int64_t K, const float* A, int64_t lda,
                                                const float* R, int64_t ldr, float beta, float* C,
                                                int64_t ldc, int64_t valid, const float* bias) {
  Vec16 lo[MB], hi[MB];
  for (int i = 0; i < MB; ++i) lo[i] = hi[i] = Vec16{};
  for (int64_t k = 0; k < K; ++k) {
    const Vec16 r_lo = load16(R + k * ldr), r_hi = load16(R + k * ldr + 16);
    for (int i = 0; i < MB; ++i) {
      const float a = A[i * lda + k];
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

}  // namespace

void pack_right_operand(const float* src, int64_t K, int64_t N, bool transposed, float* dst) {
  // tile by tile: [K, 32] each, contiguous, so that a tile streams through the cache in order
  for (int64_t n0 = 0; n0 < N; n0 += kPackedTile) {
    const int64_t n1 = std::min(N, n0 + kPackedTile);
    float* tile_dst = dst + n0 * K;
    for (int64_t k = 0; k < K; ++k) {
      float* row = tile_dst + k * kPackedTile;
      for (int64_t n = n0; n < n1; ++n) row[n - n0] = transposed ? src[n * K + k] : src[k * N + n];
      std::fill(row + (n1 - n0), row + kPackedTile, 0.f);
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void packed_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* R,
                 float beta, float* C, int64_t ldc, int64_t n_begin, int64_t n_end,
                 const float* bias) {
  const int64_t ldr = kPackedTile;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPackedTile) {
    const int64_t valid = std::min(kPackedTile, N - n0);
    const float* r = R + n0 * K;
    const float* b = bias != nullptr ? bias + n0 : nullptr;
    int64_t m = 0;
    for (; m + 8 <= M; m += 8)
      tile<8>(K, A + m * lda, lda, r, ldr, beta, C + m * ldc + n0, ldc, valid, b);
    const float* a = A + m * lda;
    float* c = C + m * ldc + n0;
    switch (M - m) {
      case 1: tile<1>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 2: tile<2>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 3: tile<3>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 4: tile<4>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 5: tile<5>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 6: tile<6>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      case 7: tile<7>(K, a, lda, r, ldr, beta, c, ldc, valid, b); break;
      default: break;
    }
  }
}

void parallel_packed_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                          const float* R, float beta, float* C, int64_t ldc, const float* bias) {
  if (M == 0 || N == 0) return;
  parallel_over_tiles(N, M * K * kPackedTile, [&](int64_t n0, int64_t n1) {
    packed_gemm(M, N, K, A, lda, R, beta, C, ldc, n0, n1, bias);
  });
}

}  // namespace cpu
}  // namespace rnnext
