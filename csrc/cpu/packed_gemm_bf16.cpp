// bfloat16 products for float layers (packed_gemm.h, "bfloat16 operands"): A and R rounded to
// bfloat16, each product of two bfloat16 values exact in float, the sums in float. AVX512-BF16's
// dot-product instruction does two multiply-adds per float lane where an FMA does one, so the
// kernel runs at up to twice the float kernel's rate. Compiled for that instruction set only,
// function by function (the rest of the build stays portable), and called only where
// cpu_has_bf16_dot() says the CPU has it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "packed_gemm.h"

namespace rnnext {
namespace cpu {

uint16_t round_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // to nearest, ties to even (as the instructions do)
  return static_cast<uint16_t>(bits >> 16);
}

bool bf16_products_enabled() {
  const char* env = std::getenv("RNNEXT_CPU_BF16_PRODUCTS");
  return cpu_has_bf16_dot() && !(env != nullptr && std::strcmp(env, "0") == 0);
}

int64_t packed_bf16_size(int64_t K, int64_t N) {
  return packed_ld<float>(N) * bf16_pairs(K) * 2;
}

namespace {

// Calls fill(tile, n0, width) for each column tile of R [K, N] packed in bfloat16 pairs
// (tile: its first element, n0: its first column, width: its real columns), tiles split among
// threads.
template <typename F>
void parallel_over_bf16_tiles(int64_t K, int64_t N, uint16_t* dst, const F& fill) {
  constexpr int64_t kTile = kPackedTile<float>;
  const int64_t tiles = (N + kTile - 1) / kTile, tile_size = bf16_pairs(K) * 2 * kTile;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K * kTile));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      fill(dst + t * tile_size, t * kTile, std::min(kTile, N - t * kTile));
    }
  });
}

inline uint16_t bf16_bits(float value) {
  return round_to_bf16(value);
}
inline uint16_t bf16_bits(uint16_t bits) {
  return bits;
}

template <typename Source>
void pack_bf16_tiles(const Source* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                     uint16_t* dst) {
  constexpr int64_t kTile = kPackedTile<float>;
  parallel_over_bf16_tiles(K, N, dst, [&](uint16_t* tile, int64_t n0, int64_t width) {
    std::fill_n(tile, bf16_pairs(K) * 2 * kTile, uint16_t{0});
    // element (k, n0 + n) goes to tile[(k / 2) * 2 * kTile + 2 * n + k % 2]; each source row
    // is read in order (R^T's rows are the tile's columns when transposed)
    for (int64_t n = 0; n < width && transposed; ++n) {
      const Source* row = src + (n0 + n) * ld;
      for (int64_t k = 0; k < K; ++k) tile[(k / 2) * 2 * kTile + 2 * n + k % 2] = bf16_bits(row[k]);
    }
    for (int64_t k = 0; k < K && !transposed; ++k) {
      const Source* row = src + k * ld + n0;
      uint16_t* out = tile + (k / 2) * 2 * kTile + k % 2;
      for (int64_t n = 0; n < width; ++n) out[2 * n] = bf16_bits(row[n]);
    }
  });
}

}  // namespace

void pack_right_operand_bf16(const float* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                             uint16_t* dst) {
  pack_bf16_tiles(src, K, N, transposed, ld, dst);
}

void pack_right_operand_bf16(const uint16_t* src, int64_t K, int64_t N, bool transposed, int64_t ld,
                             uint16_t* dst) {
  constexpr int64_t kTile = kPackedTile<float>;
  const int64_t pairs = bf16_pairs(K);
  if (transposed && K % 2 == 0 && ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0) {
    // each row of src = R^T holds its pairs side by side already: the tiles are the float
    // packing of src read as 32-bit words, [N, K / 2] (a transposing copy in blocks, where
    // the element by element copy below took about a nanosecond a value)
    pack_right_operand(reinterpret_cast<const uint32_t*>(src), pairs, N, /*transposed=*/true,
                       ld / 2, reinterpret_cast<uint32_t*>(dst));
    return;
  }
  if (!transposed) {
    // R's rows 2p and 2p + 1 side by side, a 32-bit word per column
    parallel_over_bf16_tiles(K, N, dst, [&](uint16_t* tile, int64_t n0, int64_t width) {
      for (int64_t p = 0; p < pairs; ++p) {
        const uint16_t* even = src + 2 * p * ld + n0;
        const uint16_t* odd = 2 * p + 1 < K ? even + ld : nullptr;
        uint32_t* out = reinterpret_cast<uint32_t*>(tile) + p * kTile;
        for (int64_t n = 0; n < width; ++n) {
          out[n] = even[n] | (odd != nullptr ? uint32_t{odd[n]} << 16 : 0u);
        }
        std::fill(out + width, out + kTile, 0u);
      }
    });
    return;
  }
  pack_bf16_tiles(src, K, N, transposed, ld, dst);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11

bool cpu_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

}  // namespace cpu
}  // namespace rnnext

#include <immintrin.h>

#define RNNEXT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace rnnext {
namespace cpu {
namespace {

// Row of A [K] floats to bfloat16 pairs out[bf16_pairs(K)] (a zero after an odd K).
RNNEXT_BF16_TARGET inline void row_to_pairs(const float* a, int64_t K, uint32_t* out) {
  auto* half = reinterpret_cast<uint16_t*>(out);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(a + k));
    std::memcpy(half + k, &v, sizeof v);
  }
  for (; k < K; ++k) half[k] = round_to_bf16(a[k]);
  if (K % 2 != 0) half[K] = 0;
}

// Rows [0, MB) of C's tile (32 columns, `valid` of them real) = their bfloat16 pairs a (rows
// `a_stride` pairs apart) times the tile's `pairs` pairs of rows r, plus beta C and the bias.
template <int MB>
RNNEXT_BF16_TARGET inline __attribute__((always_inline)) void tile_bf16(
    int64_t pairs, const uint32_t* a, int64_t a_stride, const uint16_t* r, float beta, float* C,
    int64_t ldc, int64_t valid, const float* bias) {
  constexpr int64_t kTile = kPackedTile<float>;
  // with one or two rows, a second set of sums for odd pairs: the dot product's latency (6
  // cycles here) would otherwise stall chains of only 2 or 4 sums
  constexpr int kSets = MB <= 2 ? 2 : 1;
  __m512 lo[kSets][MB], hi[kSets][MB];
  for (int s = 0; s < kSets; ++s) {
    for (int i = 0; i < MB; ++i) lo[s][i] = hi[s][i] = _mm512_setzero_ps();
  }
  int64_t p = 0;
  for (; p + kSets <= pairs; p += kSets) {
    for (int s = 0; s < kSets; ++s) {
      const uint16_t* rp = r + (p + s) * 2 * kTile;
      const __m512bh r_lo = (__m512bh)_mm512_loadu_si512(rp);
      const __m512bh r_hi = (__m512bh)_mm512_loadu_si512(rp + kTile);
      for (int i = 0; i < MB; ++i) {
        const __m512bh a_i = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * a_stride + p + s]));
        lo[s][i] = _mm512_dpbf16_ps(lo[s][i], a_i, r_lo);
        hi[s][i] = _mm512_dpbf16_ps(hi[s][i], a_i, r_hi);
      }
    }
  }
  for (; p < pairs; ++p) {
    const uint16_t* rp = r + p * 2 * kTile;
    const __m512bh r_lo = (__m512bh)_mm512_loadu_si512(rp);
    const __m512bh r_hi = (__m512bh)_mm512_loadu_si512(rp + kTile);
    for (int i = 0; i < MB; ++i) {
      const __m512bh a_i = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * a_stride + p]));
      lo[0][i] = _mm512_dpbf16_ps(lo[0][i], a_i, r_lo);
      hi[0][i] = _mm512_dpbf16_ps(hi[0][i], a_i, r_hi);
    }
  }
  for (int i = 0; i < MB; ++i) {
    __m512 v_lo = lo[0][i], v_hi = hi[0][i];
    if constexpr (kSets == 2) {
      v_lo = _mm512_add_ps(v_lo, lo[1][i]);
      v_hi = _mm512_add_ps(v_hi, hi[1][i]);
    }
    float* c = C + i * ldc;
    if (valid == kTile) {
      if (bias != nullptr) {
        v_lo = _mm512_add_ps(v_lo, _mm512_loadu_ps(bias));
        v_hi = _mm512_add_ps(v_hi, _mm512_loadu_ps(bias + 16));
      }
      if (beta != 0.f) {
        const __m512 b = _mm512_set1_ps(beta);
        v_lo = _mm512_fmadd_ps(b, _mm512_loadu_ps(c), v_lo);
        v_hi = _mm512_fmadd_ps(b, _mm512_loadu_ps(c + 16), v_hi);
      }
      _mm512_storeu_ps(c, v_lo);
      _mm512_storeu_ps(c + 16, v_hi);
      continue;
    }
    float row[kTile];  // a partial tile
    _mm512_storeu_ps(row, v_lo);
    _mm512_storeu_ps(row + 16, v_hi);
    for (int64_t j = 0; j < valid; ++j) {
      const float sum = bias != nullptr ? row[j] + bias[j] : row[j];
      c[j] = beta == 0.f ? sum : beta * c[j] + sum;
    }
  }
}

// Rows [m, m + rows) of A^T's columns, A^T stored [K, M] (row stride lda), for the pairs
// [p0, p0 + pc) of K: out[i * pc + p] holds rows 2 (p0 + p) and one after of column m + i.
RNNEXT_BF16_TARGET inline void columns_to_pairs(const float* A, int64_t lda, int64_t K, int64_t m,
                                                int64_t rows, int64_t p0, int64_t pc,
                                                uint32_t* out) {
  for (int64_t p = 0; p < pc; ++p) {
    const int64_t k = 2 * (p0 + p);
    const float* even = A + k * lda + m;
    const float* odd = k + 1 < K ? even + lda : nullptr;
    for (int64_t i = 0; i < rows; ++i) {
      const uint32_t high = odd != nullptr ? round_to_bf16(odd[i]) : 0;
      out[i * pc + p] = round_to_bf16(even[i]) | high << 16;
    }
  }
}

// C = A @ R (+ beta C, + bias) over [n_begin, n_end), A given by the rows it has (kTransA: A^T
// stored [K, M], else A [M, K]), 8 rows of A at a time rounded once into pairs on the stack
// (32 KB: chunks of K beyond 2048 add their sums onto C), then every tile of R past them.
template <bool kTransA>
RNNEXT_BF16_TARGET inline __attribute__((always_inline)) void gemm_bf16(
    int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const uint16_t* R, float beta,
    float* C, int64_t ldc, int64_t n_begin, int64_t n_end, const float* bias) {
  constexpr int64_t kTile = kPackedTile<float>;
  constexpr int64_t kChunkPairs = 1024;
  uint32_t a_pairs[8 * kChunkPairs];
  const int64_t pairs = bf16_pairs(K);
  for (int64_t m = 0; m < M; m += 8) {
    const int64_t rows = std::min<int64_t>(8, M - m);
    for (int64_t p0 = 0; p0 < pairs; p0 += kChunkPairs) {
      const int64_t pc = std::min(kChunkPairs, pairs - p0);
      if constexpr (kTransA) {
        columns_to_pairs(A, lda, K, m, rows, p0, pc, a_pairs);
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          row_to_pairs(A + (m + i) * lda + 2 * p0, std::min(2 * pc, K - 2 * p0), a_pairs + i * pc);
        }
      }
      const float chunk_beta = p0 == 0 ? beta : 1.f;
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
        const int64_t valid = std::min(kTile, N - n0);
        const uint16_t* r = R + (n0 / kTile) * pairs * 2 * kTile + p0 * 2 * kTile;
        const float* b = bias != nullptr && p0 == 0 ? bias + n0 : nullptr;
        float* c = C + m * ldc + n0;
        switch (rows) {
          case 1: tile_bf16<1>(pc, a_pairs, pc, r, chunk_beta, c, ldc, valid, b); break;
          case 2: tile_bf16<2>(pc, a_pairs, pc, r, chunk_beta, c, ldc, valid, b); break;
          case 3: tile_bf16<3>(pc, a_pairs, pc, r, chunk_beta, c, ldc, valid, b); break;
          case 4: tile_bf16<4>(pc, a_pairs, pc, r, chunk_beta, c, ldc, valid, b); break;
          case 5: tile_bf16<5>(pc, a_pairs, pc, r, chunk_beta, c, ldc, valid, b); break;
          case 6: tile_bf16<6>(pc, a_pairs, pc, r, chunk_beta, c, ldc, valid, b); break;
          case 7: tile_bf16<7>(pc, a_pairs, pc, r, chunk_beta, c, ldc, valid, b); break;
          default: tile_bf16<8>(pc, a_pairs, pc, r, chunk_beta, c, ldc, valid, b); break;
        }
      }
    }
  }
}

}  // namespace

RNNEXT_BF16_TARGET void packed_gemm_bf16(int64_t M, int64_t N, int64_t K, const float* A,
                                         int64_t lda, const uint16_t* R, float beta, float* C,
                                         int64_t ldc, int64_t n_begin, int64_t n_end,
                                         const float* bias) {
  gemm_bf16<false>(M, N, K, A, lda, R, beta, C, ldc, n_begin, n_end, bias);
}

RNNEXT_BF16_TARGET void packed_gemm_at_bf16(int64_t M, int64_t N, int64_t K, const float* A,
                                            int64_t lda, const uint16_t* R, float beta, float* C,
                                            int64_t ldc, int64_t n_begin, int64_t n_end) {
  gemm_bf16<true>(M, N, K, A, lda, R, beta, C, ldc, n_begin, n_end, nullptr);
}

#else  // no AVX512-BF16 code in this build: the float kernels run instead

bool cpu_has_bf16_dot() {
  return false;
}

// unreachable: nothing packs bfloat16 operands where cpu_has_bf16_dot() is false
void packed_gemm_bf16(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, float,
                      float*, int64_t, int64_t, int64_t, const float*) {
  std::abort();
}
void packed_gemm_at_bf16(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, float,
                         float*, int64_t, int64_t, int64_t) {
  std::abort();
}

#endif

}  // namespace cpu
}  // namespace rnnext
