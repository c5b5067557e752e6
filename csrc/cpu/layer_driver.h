// The CPU time loops, written once and instantiated per cell policy (csrc/cells). One call runs
// one direction of one layer. All buffers come in through the params structs, allocated by the
// host code before the loop: inside it there are only GEMM calls and the fused pointwise passes.
//
// Per-sequence lengths: batch rows are sorted by length, longest first, so the rows active at
// step t are a prefix [0, n_t) with n_t = batch_sizes[t] (the layout of a PackedSequence).
// Each step's GEMMs and pointwise pass cover only that prefix; outputs past a row's end are
// zero, its state stops at its own last step, and the reverse direction starts there.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../common/layer_sizes.h"
#include "blas.h"
#include "packed_gemm.h"
#include "target_clones.h"
#include "team.h"

namespace rnnext {
namespace cpu {

// The pointwise passes are target clones (target_clones.h).

// Rows of the pointwise pass handed to one thread: enough elements to pay for the hand-off.
inline int64_t pointwise_grain(int64_t row_elems) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems));
}

// What both passes share: the sizes and step order (LayerSizes) and the operands. The large
// input-side GEMMs run over blocks of `block_steps` steps at a time, so their buffers stay
// bounded however long the sequence is.
template <typename T>
struct LayerDims : LayerSizes {
  const T* x;                   // [T, B, I] the layer's input
  bool has_projection = false;  // an LSTM projection w_hr [P, H]
  // the right-hand operands of the GEMMs: forward x @ w_ih^T, h @ w_hh^T and m @ w_hr^T,
  // backward dgx @ w_ih, dgh @ w_hh and dh' @ w_hr (only the pass's own are set)
  RightOperand<T> ih, hh, hr;
  const T* h0;  // [B, P]
  const T* c0;  // [B, H] (cells with a cell state)

  bool projected() const { return has_projection; }
};

// sums[N] += the column sums of rows [M, N] (row stride ld). Each thread sums whole columns,
// row by row, so the result does not depend on the thread count; in double, since a block has
// thousands of rows and a float running sum over them lost about ten times the error of
// torch's own sums.
template <typename T>
void add_column_sums(T* sums, const T* rows, int64_t M, int64_t N, int64_t ld) {
  constexpr int64_t kColumns = 64;  // columns summed at once, in a buffer on the stack
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(M, 1));
  at::parallel_for(0, N, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t c0 = j0; c0 < j1; c0 += kColumns) {
      const int64_t width = std::min(kColumns, j1 - c0);
      double acc[kColumns] = {};
      for (int64_t r = 0; r < M; ++r) {
        const T* row = rows + r * ld + c0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<double>(row[j]);
      }
      for (int64_t j = 0; j < width; ++j) sums[c0 + j] += static_cast<T>(acc[j]);
    }
  });
}

// C = A @ R + beta C (+ bias [N] on every row, unless null) over the active rows of the steps
// [first, first + count) and the columns `cols` of C, A and C each laid out padded or compact
// (LayerSizes). Rows past their end are neither read nor written.
template <typename T>
void block_rows_gemm(const LayerSizes& z, int64_t first, int64_t count, int64_t N, int64_t K,
                     const T* A, int64_t lda, bool a_compact, const RightOperand<T>& R, T beta,
                     T* C, int64_t ldc, bool c_compact, const T* bias, Cols cols) {
  if (cols.size() <= 0) return;
  if (z.all_active(first, count)) {
    weight_gemm<T>(count * z.batch, N, K, A, lda, R, beta, C, ldc, bias, cols);
    return;
  }
  auto row = [&](int64_t t, bool compact) {
    return compact ? z.compact_row(t, first) : (t - first) * z.batch;
  };
  const int64_t end = first + count;
  if (R.is_packed() && !is_narrow<T>(N)) {
    // steps grouped into chunks of about packed_chunk_rows rows, one thread hand-off each
    for (int64_t t0 = first, t1 = first; t0 < end; t0 = t1) {
      int64_t rows = 0;
      while (t1 < end && rows < packed_chunk_rows(K)) rows += z.batch_sizes[t1++];
      parallel_over_tiles<T>(cols, rows * K * kPackedTile<T>, [&](int64_t n0, int64_t n1) {
        for (int64_t t = t0; t < t1; ++t) {
          packed_product(z.batch_sizes[t], N, K, A + row(t, a_compact) * lda, lda, R, beta,
                         C + row(t, c_compact) * ldc, ldc, n0, n1, bias);
        }
      });
    }
    return;
  }
  for (int64_t t = first; t < end; ++t) {
    weight_gemm<T>(z.batch_sizes[t], N, K, A + row(t, a_compact) * lda, lda, R, beta,
                   C + row(t, c_compact) * ldc, ldc, bias, cols);
  }
}

// dst [compact rows of the steps [first, first + count), cols]: for each step t, rows
// [0, copied) of source(t, copied), row stride ld_src, then zeros up to the step's active rows.
// A member of a team gathers its share of the steps.
template <typename T, typename Source>
void gather_block_rows(const LayerSizes& z, int64_t first, int64_t count, const TeamMember& m,
                       int64_t cols, int64_t ld_src, const Source& source, T* dst) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, z.batch * cols));
  const Cols steps = m.share_items(count);
  at::parallel_for(first + steps.begin, first + steps.end, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t copied = 0;
      const T* src = source(t, copied);
      T* out = dst + z.compact_row(t, first) * cols;
      for (int64_t b = 0; b < copied; ++b) std::copy_n(src + b * ld_src, cols, out + b * cols);
      std::fill(out + copied * cols, out + z.batch_sizes[t] * cols, T(0));
    }
  });
}

template <typename T>
struct ForwardParams : LayerDims<T> {
  const T* b_ih;    // [G*H] the input projection's bias: b_ih, plus b_hh when the cell sums
                    // its gates (Cell::kSumsGates); zeros without biases
  const T* b_hh;    // [G*H] (zeros without biases)
  T* xg;            // [block_steps * B, G*H] scratch: the input projection of one block, compact
                    // (padded in a team by rows); with kSumsGates each step adds h W_hh^T to
                    // its rows
  T* output;        // [T, B, ldo], this direction's P columns
  T* h_n;           // [B, P]
  T* c_state;       // [B, H] in: c0; out: c_n (cells with a cell state)
  T* workspace;     // [T, B, ws_row] for backward, or null when backward will not run
  T* step_scratch;  // [B, ws_row]: when workspace is null, holds m (a projected step's cell output)
  T* hg;            // [B, G*H] scratch: W_hh h of the current step (cells without kSumsGates)
};

// One step's fused pointwise forward over rows b0, b0 + b_step, ... below b1 and hidden units
// [j0, j1): gates, new state and, with kSave (backward will run), the values backward reads.
// A call covers all of a member's rows, since with few units a call per row paid its
// prologue once for every few vectors of work.
template <typename Cell, bool kSave, typename T>
RNNEXT_CPU_CLONES void forward_rows(const ForwardParams<T>& p, const T* xg_t, int64_t n_cont,
                                    const T* h_cont, T* cell_out, int64_t ld_cell_out, T* ws_t,
                                    int64_t b0, int64_t b1, int64_t b_step, int64_t j0,
                                    int64_t j1) {
  const int64_t P = p.out, H = p.hidden, GH = p.gates * H;
  for (int64_t b = b0; b < b1; b += b_step) {
    const T* xg = xg_t + b * GH;
    T* c = Cell::kHasCellState ? p.c_state + b * H : nullptr;  // updated in place
    T* out = cell_out + b * ld_cell_out;
    T* ws = ws_t + b * p.ws_row;
    if constexpr (Cell::kSumsGates) {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        Cell::template forward_summed<kSave>(xg, c, out, c, ws, H, j);
      }
    } else {
      const T* hg = p.hg + b * GH;
      const T* h_prev = b < n_cont ? h_cont + b * p.ldo : p.h0 + b * P;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        Cell::template forward<kSave>(xg, hg, p.b_hh, h_prev, c, out, c, ws, H, j);
      }
    }
  }
}

// How a team (team.h) shares a direction's time loop. By hidden units: each member takes its
// units' columns of every per-step product and their pointwise pass, and a step ends at a
// barrier, since the next one reads all of h'. By batch rows: each member takes every column
// of its rows (rows b with b % slots among its slots, so that the active prefix of a step
// with lengths splits evenly); a row's steps read only that row, and each member projects
// its own rows of the input, so forward needs no barrier at all; backward meets at blocks,
// whose input and weight gradients are shared out by columns.
struct TeamPlan {
  int64_t slots = 1;
  bool by_rows = false;
};

// Rows per member from which splitting by rows wins. Measured on 2 threads (LSTM, GRU and RNN
// at (500, 8, 128): rows 4-7% faster; LSTM (200, 32, 256) 1-2%): with fewer rows (B = 2, 4)
// units won, as each member's per-step GEMM would stream all of W_hh for one or two rows.
constexpr int64_t kMinTeamRows = 4;

// Teams need every per-step product packed and the cell writing h' itself (a projection would
// need the whole of m before any column of h'); otherwise the loop runs alone, each call
// inside it using every thread. Units need H in whole tiles. RNNEXT_CPU_TEAM_SPLIT=units or
// rows forces a split (tests cover both).
template <typename T>
TeamPlan team_plan(const LayerDims<T>& p) {
  const bool packed = p.ih.is_packed() && p.hh.is_packed();
  if (!packed || p.projected()) return {};
  constexpr int64_t tile = kPackedTile<T>;
  const TeamPlan units{p.hidden % tile == 0 ? p.hidden / tile : 1, false};
  const TeamPlan rows{std::max<int64_t>(1, p.batch / kMinTeamRows), true};
  if (const char* env = std::getenv("RNNEXT_CPU_TEAM_SPLIT")) {
    if (std::strcmp(env, "units") == 0) return units;
    if (std::strcmp(env, "rows") == 0) return {std::max<int64_t>(1, p.batch), true};
  }
  return rows.slots >= at::get_num_threads() ? rows : units;
}

// Calls f(cols) for the member's columns of a per-step product [*, G*H]: each gate's columns
// of its units, or all G*H columns at once when alone or splitting by rows.
template <typename F>
void for_gate_cols(const TeamMember& m, bool by_rows, int64_t gates, int64_t H, Cols units,
                   const F& f) {
  if (m.alone() || by_rows) {
    f(Cols{0, gates * H});
    return;
  }
  for (int64_t k = 0; k < gates; ++k) f(Cols{k * H + units.begin, k * H + units.end});
}

// Calls f(first, count, stride) for the member's rows among [lo, hi) in a step: rows first,
// first + stride, ... (all of them, contiguous, unless splitting by rows).
template <typename F>
void for_member_rows(const TeamMember& m, bool by_rows, int64_t lo, int64_t hi, const F& f) {
  if (!by_rows || m.alone()) {
    if (hi > lo) f(lo, hi - lo, int64_t{1});
    return;
  }
  const int64_t S = m.slots;
  for (int64_t q = m.first; q < m.last; ++q) {
    const int64_t first = lo + ((q - lo) % S + S) % S;
    if (first < hi) f(first, (hi - first + S - 1) / S, S);
  }
}

// Calls f(b) for each of the member's rows among [lo, hi) (for_member_rows), one at a time.
template <typename F>
void for_each_member_row(const TeamMember& m, bool by_rows, int64_t lo, int64_t hi, const F& f) {
  for_member_rows(m, by_rows, lo, hi, [&](int64_t first, int64_t count, int64_t stride) {
    for (int64_t i = 0; i < count; ++i) f(first + i * stride);
  });
}

// Runs a step's pointwise pass f(b0, b1, b_step) over the rows [0, n): by rows, one call for
// the member's own (strided) rows; otherwise one call per parallel_for chunk of contiguous
// rows (inside a team's region that chunk is all n rows, on the member's own units).
template <typename F>
void run_pointwise(const TeamMember& m, bool by_rows, int64_t n, int64_t row_elems, const F& f) {
  if (by_rows) {
    for_member_rows(m, true, 0, n, [&](int64_t first, int64_t count, int64_t stride) {
      f(first, first + count * stride, stride);
    });
    return;
  }
  parallel_for_leaf(0, n, pointwise_grain(row_elems),
                    [&](int64_t b0, int64_t b1) { f(b0, b1, int64_t{1}); });
}

// The forward time loop, one direction; a team member's part (TeamPlan). By units: its units'
// columns of every gate product and their pointwise pass, and the step ends at a barrier,
// since the next one reads all of h'; the input projection of a block needs none, as each
// member reads back only its own columns. By rows: every column of its rows, no barrier per
// step.
template <typename Cell, typename T>
void forward_direction(const ForwardParams<T>& p) {
  const int64_t B = p.batch, P = p.out, H = p.hidden, GH = p.gates * H;
  const TeamPlan plan = team_plan(p);
  run_team(plan.slots, [&](const TeamMember& m) {
    const bool by_rows = plan.by_rows;
    const Cols units = m.share(H, kPackedTile<T>);  // the member's units, by units
    const Cols step_units = by_rows ? Cols{0, H} : units;
    // xg = x W_ih^T + b_ih. Alone or by units, for the active rows of a block of steps at
    // once, by columns (by units each member reads back only its own columns). By rows, each
    // member projects its own rows, so the members never wait for one another: sharing a
    // block's columns cost two barriers per block, where any drift between the threads was
    // paid as waiting. A member's rows of a block are its rows of the padded block where every
    // row is active and the slots divide the batch (one product per slot); otherwise it
    // projects them step by step. (Padded, since with compact rows a member's rows of one
    // block would overlap another member's of the block before, which may still be read.)
    const bool rows_own_projection = by_rows && !m.alone();
    const auto project_own_rows = [&](const T* x_rows, T* xg_rows, int64_t rows) {
      for_member_rows(m, true, 0, rows, [&](int64_t b, int64_t count, int64_t stride) {
        weight_gemm<T>(count, GH, p.inputs, x_rows + b * p.inputs, stride * p.inputs, p.ih, T(0),
                       xg_rows + b * GH, stride * GH, p.b_ih);
      });
    };
    int64_t block_first = 0, block_count = 0;
    const auto whole_block_owned = [&] {
      return p.all_active(block_first, block_count) && B % m.slots == 0;
    };
    for (int64_t s = 0; s < p.steps; ++s) {
      const int64_t t = p.step(s), n = p.batch_sizes[t], n_cont = p.continuing(t);
      if (s % p.block_steps == 0) {
        p.block_of(s, block_first, block_count);
        if (!rows_own_projection) {
          for_gate_cols(m, false, p.gates, H, units, [&](Cols cols) {
            block_rows_gemm<T>(p, block_first, block_count, GH, p.inputs,
                               p.x + block_first * B * p.inputs, p.inputs, /*a_compact=*/false,
                               p.ih, T(0), p.xg, GH, /*c_compact=*/true, p.b_ih, cols);
          });
        } else if (whole_block_owned()) {
          project_own_rows(p.x + block_first * B * p.inputs, p.xg, block_count * B);
        }
      }
      T* xg_t =
          p.xg + (rows_own_projection ? (t - block_first) * B : p.compact_row(t, block_first)) * GH;
      if (rows_own_projection && !whole_block_owned()) {
        project_own_rows(p.x + t * B * p.inputs, xg_t, n);
      }
      const T* h_cont = n_cont > 0 ? p.output + p.previous(t) * B * p.ldo : nullptr;
      T* h_out = p.output + t * B * p.ldo;
      T* ws_t = p.workspace != nullptr ? p.workspace + t * B * p.ws_row : p.step_scratch;
      // The cell writes h' itself, or m = o * tanh(c') that w_hr then projects.
      T* cell_out = p.projected() ? ws_t + p.m_offset : h_out;
      const int64_t ld_cell_out = p.projected() ? p.ws_row : p.ldo;

      // h W_hh^T, added onto the input projection when the cell sums its gates
      T* hg = Cell::kSumsGates ? xg_t : p.hg;
      const T beta = Cell::kSumsGates ? T(1) : T(0);
      for_gate_cols(m, by_rows, p.gates, H, units, [&](Cols cols) {
        for_member_rows(m, by_rows, 0, n_cont, [&](int64_t b, int64_t count, int64_t stride) {
          weight_gemm<T>(count, GH, P, h_cont + b * p.ldo, stride * p.ldo, p.hh, beta, hg + b * GH,
                         stride * GH, nullptr, cols);
        });
        for_member_rows(m, by_rows, n_cont, n, [&](int64_t b, int64_t count, int64_t stride) {
          weight_gemm<T>(count, GH, P, p.h0 + b * P, stride * P, p.hh, beta, hg + b * GH,
                         stride * GH, nullptr, cols);
        });
      });
      // the values backward reads are saved only where it will run
      const auto pointwise = [&](int64_t b0, int64_t b1, int64_t b_step) {
        (p.workspace != nullptr ? forward_rows<Cell, true, T>
                                : forward_rows<Cell, false, T>)(p, xg_t, n_cont, h_cont, cell_out,
                                                                ld_cell_out, ws_t, b0, b1, b_step,
                                                                step_units.begin, step_units.end);
      };
      run_pointwise(m, by_rows, n, GH, pointwise);
      if (p.projected()) {
        weight_gemm<T>(n, P, H, cell_out, ld_cell_out, p.hr, T(0), h_out, p.ldo);
      }
      if (m.leader()) {
        // rows past their end (no step reads them)
        for (int64_t b = n; b < B; ++b) std::fill_n(h_out + b * p.ldo, P, T(0));
        if (p.workspace != nullptr) std::fill(ws_t + n * p.ws_row, ws_t + B * p.ws_row, T(0));
      }
      if (!by_rows) m.sync();
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = p.lengths[b];
    const T* last =
        len == 0 ? p.h0 + b * P : p.output + (p.reverse ? 0 : len - 1) * B * p.ldo + b * p.ldo;
    std::copy(last, last + P, p.h_n + b * P);
  }
}

template <typename T>
struct BackwardParams : LayerDims<T> {
  const T* output;       // [T, B, ldo], this direction's P columns
  const T* workspace;    // [T, B, ws_row] what forward saved
  const T* grad_output;  // [T, B, *] with the strides below, or null for a zero gradient
  int64_t go_stride_t, go_stride_b, go_stride_j;
  // Gradients, each null when not wanted. grad_x is written whole (zeros past each row's end);
  // the weight gradients are added to and must start zeroed.
  T* grad_x;     // [T, B, I]
  T* grad_w_ih;  // [G*H, I]
  T* grad_w_hh;  // [G*H, P], all but the h0 term (see dgh_first)
  T* grad_b_ih;  // [G*H]
  T* grad_b_hh;  // [G*H]
  T* grad_w_hr;  // [P, H] (with a projection)
  T* dgh_first;  // [B, G*H] out: dgh at each row's first step (pairs with h0)
  T* dh;         // [B, P] in: gradient w.r.t. h_n; out: w.r.t. h0 (where grad_h0 is set)
  T* dc;         // [B, H] in: gradient w.r.t. c_n; out: w.r.t. c0
  // Whether the gradients w.r.t. h0 and c0 are wanted. Without them, a row's first step
  // skips its part of dh_prev = dgh @ W_hh: at T = 1 that was a quarter of backward's
  // products (torch.nn's autograd skips it too, for the zero state it makes).
  bool grad_h0;
  // Scratch, one block of steps each, compact.
  T* dgx;     // [block_steps * B, G*H] input-side pre-activation gradients
  T* dgh;     // [block_steps * B, G*H] hidden-side ones (may alias dgx)
  T* grad_h;  // [block_steps * B, P] (with a projection): gradient w.r.t. h'
  // The operands of the weight gradients gathered into the compact layout, for blocks where
  // some row has ended (null when none does): x, the state each step consumed, and m.
  T* x_rows;  // [block_steps * B, I]
  T* h_rows;  // [block_steps * B, P]
  T* m_rows;  // [block_steps * B, H] (with a projection)
  // the weight-gradient products' right operands, a block's rows of x and of the
  // consumed state packed into column tiles (packed_gemm.h); null to use BLAS
  T* packed_x;  // [packed_ld(I) * block_steps * B]
  T* packed_h;  // [packed_ld(P) * block_steps * B]
  // or (float, bf16_products) the same in bfloat16 (pack_right_operand_bf16), in place of
  // packed_x or packed_h where that is null: [packed_bf16_size(block_steps * B, I or P)]
  uint16_t* packed_x_bf16 = nullptr;
  uint16_t* packed_h_bf16 = nullptr;
  // (with a projection, bf16_products and H not narrow) a block's rows of m in bfloat16 for
  // dW_hr: [packed_bf16_size(block_steps * B, H)]; null to make dW_hr through BLAS
  uint16_t* packed_m_bf16 = nullptr;
  T* dm;               // [B, H] (with a projection): gradient w.r.t. m
  T* grad_w_hr_block;  // [P, H] (with a projection): one block's part of grad_w_hr
  T* go_rows;          // [B, P]: a step's output gradient when its rows are strided
};

// One step's fused pointwise backward over rows b0, b0 + b_step, ... below b1 and hidden units
// [j0, j1) (a call covers all of a member's rows, as forward_rows does): gate
// gradients, the direct part of dh_prev (written over dh in place) and dc (in place). go_t rows
// have stride ld_go.
template <typename Cell, typename T>
RNNEXT_CPU_CLONES void backward_rows(const BackwardParams<T>& p, int64_t t, int64_t n_cont,
                                     const T* h_cont, const T* ws_t, const T* ws_prev,
                                     const T* go_t, int64_t ld_go, const T* dcell, int64_t ld_dcell,
                                     T* dgx_t, T* dgh_t, int64_t b0, int64_t b1, int64_t b_step,
                                     int64_t j0, int64_t j1) {
  const int64_t P = p.out, H = p.hidden, GH = p.gates * H;
  for (int64_t b = b0; b < b1; b += b_step) {
    const T* h_prev = b < n_cont ? h_cont + b * p.ldo : p.h0 + b * P;
    const T* ws = ws_t + b * p.ws_row;
    const T* cell_out = p.projected() ? ws + p.m_offset : p.output + (t * p.batch + b) * p.ldo;
    const T* c_prev = nullptr;
    if constexpr (Cell::kHasCellState) {
      c_prev = b < n_cont ? ws_prev + b * p.ws_row + Cell::kStateInSaved * H : p.c0 + b * H;
    }
    T* dc = Cell::kHasCellState ? p.dc + b * H : nullptr;
    T* dgx = dgx_t + b * GH;
    T* dgh = dgh_t + b * GH;
    T* dh = p.dh + b * P;
    const T* dout = dcell + b * ld_dcell;
    // the output gradient's presence is decided outside the vectorised loop
    auto run = [&](auto with_go) {
      const T* go = with_go ? go_t + b * ld_go : nullptr;
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) {
        const T g = with_go ? dout[j] + go[j] : dout[j];
        Cell::backward(ws, cell_out, h_prev, c_prev, g, dc, dgx, dgh, dh, H, j);
      }
    };
    if (go_t != nullptr) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  }
}

// Calls f(m0, m1) over the rows `rows` of a weight-gradient product in groups of 8 (the
// kernels' row block), the groups split among threads; macs_per_row (one row's multiply-adds)
// decides how many threads pay.
template <typename F>
void parallel_over_row_groups(Cols rows, int64_t macs_per_row, const F& f) {
  const int64_t groups = (rows.size() + 7) / 8;
  at::parallel_for(0, groups, std::max<int64_t>(1, 65536 / (8 * macs_per_row)),
                   [&](int64_t g0, int64_t g1) {
                     f(rows.begin + g0 * 8, std::min(rows.end, rows.begin + g1 * 8));
                   });
}

// The input and weight gradients of the steps [first, first + count), from their gate
// gradients: large GEMMs over all their active rows at once, each member of a team taking its
// share of the columns. Ends at a barrier, before the next block overwrites the scratch.
template <typename T>
void backward_block_gemms(const BackwardParams<T>& p, int64_t first, int64_t count,
                          const TeamMember& m) {
  const int64_t B = p.batch, I = p.inputs, P = p.out, H = p.hidden, GH = p.gates * H;
  const int64_t rows = p.compact_rows(first, count);
  const Cols in_cols = m.share(I, kPackedTile<T>);
  if (p.grad_x != nullptr) {
    block_rows_gemm<T>(p, first, count, I, GH, p.dgx, GH, /*a_compact=*/true, p.ih, T(0),
                       p.grad_x + first * B * I, I, /*c_compact=*/false, nullptr, in_cols);
    for (int64_t t = first; t < first + count; ++t) {  // rows past their end (no GEMM row)
      for (int64_t b = p.batch_sizes[t]; b < B; ++b) {
        std::fill(p.grad_x + (t * B + b) * I + in_cols.begin,
                  p.grad_x + (t * B + b) * I + in_cols.end, T(0));
      }
    }
  }
  if (p.grad_w_ih == nullptr) {
    m.sync();
    return;
  }
  // Step t's hidden-side gradient pairs with the state it consumed: the previous step's output
  // in this direction's order. At each row's first step that is h0, left to the caller through
  // dgh_first; those rows pair with zeros here.
  const T* x_rows = p.x + first * B * I;
  const T* dgh_rows = p.dgh;
  const T* h_rows = nullptr;
  int64_t h_count = rows, ld_h = P;
  const T* m_rows = p.projected() ? p.workspace + first * B * p.ws_row + p.m_offset : nullptr;
  int64_t ld_m = p.ws_row;
  if (p.all_active(first, count)) {
    // Padded and compact are the same: the operands are read in place. The rows' first steps
    // are t = 0 (forward) and t = T - 1 (reverse), skipped.
    const int64_t skip_first = (!p.reverse && first == 0) ? 1 : 0;
    const int64_t skip_last = (p.reverse && first + count == p.steps) ? 1 : 0;
    const int64_t t0 = first + skip_first;
    dgh_rows += skip_first * B * GH;
    h_count = (count - skip_first - skip_last) * B;
    h_rows = h_count > 0 ? p.output + p.previous(t0) * B * p.ldo : nullptr;
    ld_h = p.ldo;
  } else {
    gather_block_rows<T>(
        p, first, count, m, I, I,
        [&](int64_t t, int64_t& copied) {
          copied = p.batch_sizes[t];
          return p.x + t * B * I;
        },
        p.x_rows);
    gather_block_rows<T>(
        p, first, count, m, P, p.ldo,
        [&](int64_t t, int64_t& copied) {
          copied = p.continuing(t);
          return copied > 0 ? p.output + p.previous(t) * B * p.ldo : nullptr;
        },
        p.h_rows);
    x_rows = p.x_rows;
    h_rows = p.h_rows;
    if (p.projected()) {
      gather_block_rows<T>(
          p, first, count, m, H, p.ws_row,
          [&](int64_t t, int64_t& copied) {
            copied = p.batch_sizes[t];
            return p.workspace + t * B * p.ws_row + p.m_offset;
          },
          p.m_rows);
      m_rows = p.m_rows;
      ld_m = H;
    }
    m.sync();  // every member's steps gathered
  }
  // grad[GH, N] += dg^T @ src, src [count, N] (row stride ld). Packed: the members pack
  // their shares of src's column tiles, then each multiplies its own rows of grad, its units'
  // rows of every gate, against all the tiles: the strips of dg it reads are the columns it
  // wrote itself, and each strip serves every tile.
  const Cols units = m.share(H, kPackedTile<T>);
  auto weight_grad = [&](const T* dg, int64_t count, const T* src, int64_t ld, int64_t N, T* packed,
                         uint16_t* packed_bf16, T* grad) {
    if (count == 0) return;
    if (packed != nullptr && is_narrow<T>(N)) {
      // a narrow src (few inputs, say): summed straight from its rows, no tiles
      for_gate_cols(m, false, p.gates, H, units, [&](Cols r) {
        narrow_gemm_at(r.size(), N, count, dg + r.begin, GH, src, ld, grad + r.begin * N, N);
      });
      return;
    }
    if (packed != nullptr || packed_bf16 != nullptr) {
      // pack(n0, n1) packs src's columns [n0, n1); multiply(m0, m1) makes grad's rows [m0, m1)
      const auto packed_product_at = [&](const auto& pack, const auto& multiply) {
        parallel_over_tiles<T>(m.share(N, kPackedTile<T>), count * kPackedTile<T>, pack);
        m.sync();  // every tile packed
        for_gate_cols(m, false, p.gates, H, units,
                      [&](Cols r) { parallel_over_row_groups(r, N * count, multiply); });
      };
      if constexpr (std::is_same_v<T, float>) {
        if (packed_bf16 != nullptr) {
          const int64_t pairs = bf16_pairs(count);
          packed_product_at(
              [&](int64_t n0, int64_t n1) {
                pack_right_operand_bf16(src + n0, count, n1 - n0, /*transposed=*/false, ld,
                                        packed_bf16 + n0 * pairs * 2);
              },
              [&](int64_t m0, int64_t m1) {
                packed_gemm_at_bf16(m1 - m0, N, count, dg + m0, GH, packed_bf16, 1.f, grad + m0 * N,
                                    N, 0, N);
              });
          return;
        }
      }
      packed_product_at(
          [&](int64_t n0, int64_t n1) {
            pack_right_operand(src + n0, count, n1 - n0, /*transposed=*/false, ld,
                               packed + n0 * count);
          },
          [&](int64_t m0, int64_t m1) {
            packed_gemm_at(m1 - m0, N, count, dg + m0, GH, packed, T(1), grad + m0 * N, N, 0, N);
          });
      return;
    }
    const Cols cols = m.share(N, kPackedTile<T>);
    gemm<T>(true, false, GH, cols.size(), count, T(1), dg, GH, src + cols.begin, ld, T(1),
            grad + cols.begin, N);
  };
  weight_grad(p.dgx, rows, x_rows, I, I, p.packed_x, p.packed_x_bf16, p.grad_w_ih);
  weight_grad(dgh_rows, h_count, h_rows, ld_h, P, p.packed_h, p.packed_h_bf16, p.grad_w_hh);
  if (p.grad_b_ih != nullptr) {
    for_gate_cols(m, false, p.gates, H, units, [&](Cols r) {
      add_column_sums(p.grad_b_ih + r.begin, p.dgx + r.begin, rows, r.size(), GH);
      // where the gate gradients are one (dgh aliases dgx), backward_direction copies the sums
      if (p.dgh != p.dgx)
        add_column_sums(p.grad_b_hh + r.begin, p.dgh + r.begin, rows, r.size(), GH);
    });
  }
  // dW_hr += dh'^T m (a projection runs alone). The block's product is made from zero and then
  // added: with beta = 1, BLAS summed the rows onto the running total, and over six blocks of
  // 1100 rows dW_hr's error grew to 5.7 times the float32 reference's (0.9 times this way).
  if (p.projected()) {
    // (bfloat16 products need rows: with none, BLAS writes the block's zeros)
    const bool bf16 = std::is_same_v<T, float> && p.packed_m_bf16 != nullptr && rows > 0;
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {
        // (a projection runs alone: every thread packs and multiplies, by groups of 8 rows)
        pack_right_operand_bf16(m_rows, rows, H, /*transposed=*/false, ld_m, p.packed_m_bf16);
        parallel_over_row_groups(Cols{0, P}, H * rows, [&](int64_t r0, int64_t r1) {
          packed_gemm_at_bf16(r1 - r0, H, rows, p.grad_h + r0, P, p.packed_m_bf16, 0.f,
                              p.grad_w_hr_block + r0 * H, H, 0, H);
        });
      }
    }
    if (!bf16) {
      gemm<T>(true, false, P, H, rows, T(1), p.grad_h, P, m_rows, ld_m, T(0), p.grad_w_hr_block, H);
    }
    for (int64_t i = 0; i < P * H; ++i) p.grad_w_hr[i] += p.grad_w_hr_block[i];
  }
  m.sync();
}

// The backward time loop, one direction; a team member's part (TeamPlan). By units: its units'
// pointwise pass, then (once every gate gradient of the step is there) its columns of dh_prev
// = dgh_t @ W_hh, which are its own units again, so the next step's pointwise pass needs no
// second barrier. By rows: its rows' pointwise pass and their dh_prev, with no barrier until
// the block's GEMMs, which need every row's gate gradients.
template <typename Cell, typename T>
void backward_direction(const BackwardParams<T>& p) {
  const int64_t B = p.batch, P = p.out, H = p.hidden, GH = p.gates * H;
  std::fill_n(p.dgh_first, B * GH, T(0));
  // a team also needs the packed weight-gradient operands: a BLAS call inside it may allocate
  // or throw, which would leave the other threads at the barrier
  const bool packed_grads =
      p.grad_w_ih == nullptr || ((p.packed_x != nullptr || p.packed_x_bf16 != nullptr) &&
                                 (p.packed_h != nullptr || p.packed_h_bf16 != nullptr));
  const TeamPlan plan = packed_grads ? team_plan(p) : TeamPlan{};
  run_team(plan.slots, [&](const TeamMember& m) {
    const bool by_rows = plan.by_rows;
    // a step's share: by units, the member's units (a team has P == H); by rows, all of them
    const Cols units = by_rows ? Cols{0, H} : m.share(H, kPackedTile<T>);
    const Cols state_cols = by_rows ? Cols{0, P} : m.share(P, kPackedTile<T>);
    int64_t block_first = 0, block_count = 0;
    for (int64_t s = p.steps - 1; s >= 0; --s) {
      const int64_t t = p.step(s), n = p.batch_sizes[t], n_cont = p.continuing(t);
      if (s == p.steps - 1 || s % p.block_steps == p.block_steps - 1) {
        p.block_of(s, block_first, block_count);
      }
      const T* h_cont = n_cont > 0 ? p.output + p.previous(t) * B * p.ldo : nullptr;
      const T* ws_t = p.workspace + t * B * p.ws_row;
      const T* ws_prev = n_cont > 0 ? p.workspace + p.previous(t) * B * p.ws_row : nullptr;
      const int64_t row = p.compact_row(t, block_first);
      T* dgx_t = p.dgx + row * GH;
      T* dgh_t = p.dgh + row * GH;

      // this step's output gradient, as rows of unit stride
      const T* go_t = nullptr;
      int64_t ld_go = 0;
      if (p.grad_output != nullptr) {
        const T* base = p.grad_output + t * p.go_stride_t;
        if (p.go_stride_j == 1) {
          go_t = base;
          ld_go = p.go_stride_b;
        } else if (p.go_stride_j == 0 && p.go_stride_b == 0 && n > 0) {
          // One value for the whole step (the gradient of output.sum(), expanded; base[0]
          // exists only where the step has rows): a single row of it serves every row. Members by
          // rows each fill a row of their own (by units, their own columns of row 0), so none
          // writes what another reads.
          T* row = p.go_rows + (by_rows ? m.first : 0) * P;
          std::fill(row + state_cols.begin, row + state_cols.end, base[0]);
          go_t = row;
          ld_go = 0;
        } else {
          for_each_member_row(m, by_rows, 0, n, [&](int64_t b) {
            T* row = p.go_rows + b * P;
            if (p.go_stride_j == 0) {  // a value per row, expanded along the features
              std::fill(row + state_cols.begin, row + state_cols.end, base[b * p.go_stride_b]);
              return;
            }
            for (int64_t j = state_cols.begin; j < state_cols.end; ++j) {
              row[j] = base[b * p.go_stride_b + j * p.go_stride_j];
            }
          });
          go_t = p.go_rows;
          ld_go = P;
        }
      }
      // The cell's output gradient: dh' itself, or through the projection dm = dh' @ w_hr.
      const T* dcell = p.dh;
      int64_t ld_dcell = P;
      if (p.projected()) {
        T* grad_h_t = p.grad_h + row * P;
        for (int64_t b = 0; b < n; ++b) {
          for (int64_t j = 0; j < P; ++j) {
            grad_h_t[b * P + j] = p.dh[b * P + j] + (go_t != nullptr ? go_t[b * ld_go + j] : T(0));
          }
        }
        weight_gemm<T>(n, H, P, grad_h_t, P, p.hr, T(0), p.dm, H);
        dcell = p.dm;
        ld_dcell = H;
        go_t = nullptr;
      }
      const auto pointwise = [&](int64_t b0, int64_t b1, int64_t b_step) {
        backward_rows<Cell, T>(p, t, n_cont, h_cont, ws_t, ws_prev, go_t, ld_go, dcell, ld_dcell,
                               dgx_t, dgh_t, b0, b1, b_step, units.begin, units.end);
      };
      run_pointwise(m, by_rows, n, GH, pointwise);
      if (by_rows) {
        // a member's rows need only their own gate gradients from here on
        for_each_member_row(m, true, n_cont, n, [&](int64_t b) {
          std::copy_n(dgh_t + b * GH, GH, p.dgh_first + b * GH);
        });
      } else {
        m.sync();  // the step's gate gradients are complete
        if (m.leader()) std::copy(dgh_t + n_cont * GH, dgh_t + n * GH, p.dgh_first + n_cont * GH);
      }
      // dh_prev = (direct part, GRU) + dgh_t @ W_hh over the active rows (the others keep
      // theirs); for the rows at their first step that is the gradient w.r.t. h0
      const int64_t dh_rows = p.grad_h0 ? n : n_cont;
      for_member_rows(m, by_rows, 0, dh_rows, [&](int64_t b, int64_t count, int64_t stride) {
        weight_gemm<T>(count, P, GH, dgh_t + b * GH, stride * GH, p.hh,
                       Cell::kDirectHiddenGrad ? T(1) : T(0), p.dh + b * P, stride * P, nullptr,
                       state_cols);
      });
      if (s % p.block_steps == 0) {
        if (by_rows) m.sync();  // every row's gate gradients of the block are complete
        backward_block_gemms(p, block_first, block_count, m);
      }
    }
  });
  if (p.grad_b_hh != nullptr && p.dgh == p.dgx) std::copy_n(p.grad_b_ih, GH, p.grad_b_hh);
}

}  // namespace cpu
}  // namespace rnnext
