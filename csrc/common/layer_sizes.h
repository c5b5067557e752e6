// The sizes of one direction of one layer call and the order in which it visits its steps,
// shared by every backend's time loops. Framework-free (also compiles as CUDA code).
//
// Per-sequence lengths: batch rows are sorted by length, longest first, so the rows active at
// step t are a prefix [0, batch_sizes[t]) (the layout of a PackedSequence). A buffer over a
// block of steps is either padded (step t's rows start at row (t - first) * B) or compact
// (only the active rows, in time order: a PackedSequence's data).
#pragma once

#include <cstdint>

#include "../cells/common.h"

namespace rnnext {

// T steps, B rows, I inputs, H hidden units, P state size (H, or the projection size of an
// LSTM with w_hr), G gates; ldo = D*P is the output's row stride. Per step and row the
// workspace holds a row of `ws_row` elements: the cell's saved values, then (with a
// projection) the cell output m at `m_offset`.
struct LayerSizes {
  int64_t steps, batch, inputs, hidden, out, gates, ws_row, ldo, m_offset;
  int64_t block_steps;         // steps per block of the input-side GEMMs
  bool reverse;                // this direction runs from the last step to the first
  const int64_t* batch_sizes;  // host [T]: rows active at each step, non-increasing
  const int64_t* lengths;      // host [B]: per-row lengths, non-increasing
  const int64_t* row_starts;   // host [T + 1]: active rows of all steps before t

  // The time index of the s-th step visited.
  RNNEXT_HD int64_t step(int64_t s) const { return reverse ? steps - 1 - s : s; }
  // Step t's rows [0, continuing(t)) take their state from the previous step in this
  // direction's order; rows [continuing(t), batch_sizes[t]) start at t from h0 and c0.
  RNNEXT_HD int64_t continuing(int64_t t) const {
    if (reverse) return t == steps - 1 ? 0 : batch_sizes[t + 1];
    return t == 0 ? 0 : batch_sizes[t];
  }
  RNNEXT_HD int64_t previous(int64_t t) const { return reverse ? t + 1 : t - 1; }
  // The block of steps that the s-th visited step belongs to, as the time range
  // [first, first + count).
  RNNEXT_HD void block_of(int64_t s, int64_t& first, int64_t& count) const {
    const int64_t s0 = s - s % block_steps;
    count = block_steps < steps - s0 ? block_steps : steps - s0;
    first = reverse ? steps - s0 - count : s0;
  }
  // Where step t's rows start in the compact layout of a block that begins at time `first`.
  RNNEXT_HD int64_t compact_row(int64_t t, int64_t first) const {
    return row_starts[t] - row_starts[first];
  }
  // The active rows of the time range [first, first + count): its compact layout's size.
  RNNEXT_HD int64_t compact_rows(int64_t first, int64_t count) const {
    return row_starts[first + count] - row_starts[first];
  }
  // Whether every row is active at every step of the time range [first, first + count): then
  // its compact and padded layouts are the same.
  RNNEXT_HD bool all_active(int64_t first, int64_t count) const {
    return count == 0 || batch_sizes[first + count - 1] == batch;
  }
  // Whether some row ends before the last step, so that rows past their end need zeros.
  bool has_ended_rows(int64_t batch) const { return steps > 0 && batch_sizes[steps - 1] < batch; }
};

}  // namespace rnnext
