// The CPU time loops, written once and instantiated per cell policy (csrc/cells). One call runs
// one direction of one layer. All buffers come in through the params structs, allocated by the
// host code before the loop: inside it there are only BLAS calls and the fused pointwise passes.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "blas.h"

namespace rnnext {
namespace cpu {

// Rows of the pointwise pass handed to one thread: enough elements to pay for the hand-off.
inline int64_t pointwise_grain(int64_t row_elems) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems));
}

// Shapes: T steps, B rows, H hidden, G gates, S saved width (units of H). Output rows have
// stride ldo (D*H for D directions); `output` points at this direction's first column.
template <typename T>
struct ForwardParams {
  int64_t steps, batch, hidden, gates, saved_width, ldo;
  bool reverse;
  const T* xg;       // [T, B, G*H] input projection, b_ih included
  const T* w_hh;     // [G*H, H]
  const T* b_hh;     // [G*H] (zeros without biases)
  const T* h0;       // [B, H]
  const T* c0;       // [B, H] (cells with a cell state)
  T* output;         // [T, B, ldo]
  T* h_n;            // [B, H]
  T* c_n;            // [B, H] (cells with a cell state)
  T* saved;          // [T, B, S*H] for backward, or null when backward will not run
  T* saved_scratch;  // [B, S*H], used for every step when saved is null
  T* hg;             // [B, G*H] scratch: W_hh h of the current step
  T* c_buf;          // [2, B, H] scratch: cell state, double-buffered
};

template <typename Cell, typename T>
void forward_direction(const ForwardParams<T>& p) {
  const int64_t B = p.batch, H = p.hidden, GH = p.gates * H, SH = p.saved_width * H;
  const T* h_prev = p.h0;
  int64_t ld_h_prev = H;
  const T* c_prev = p.c0;
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    gemm<T>(false, true, B, GH, H, T(1), h_prev, ld_h_prev, p.w_hh, H, T(0), p.hg, GH);
    const T* xg_t = p.xg + t * B * GH;
    T* h_out = p.output + t * B * p.ldo;
    T* c_out = Cell::kHasCellState ? p.c_buf + (s % 2) * B * H : nullptr;
    T* saved_t = p.saved != nullptr ? p.saved + t * B * SH : p.saved_scratch;
    at::parallel_for(0, B, pointwise_grain(GH), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const T* c_prev_b = Cell::kHasCellState ? c_prev + b * H : nullptr;
        T* c_out_b = Cell::kHasCellState ? c_out + b * H : nullptr;
        for (int64_t j = 0; j < H; ++j) {
          Cell::forward(xg_t + b * GH, p.hg + b * GH, p.b_hh, h_prev + b * ld_h_prev, c_prev_b,
                        h_out + b * p.ldo, c_out_b, saved_t + b * SH, H, j);
        }
      }
    });
    h_prev = h_out;
    ld_h_prev = p.ldo;
    c_prev = c_out;
  }
  for (int64_t b = 0; b < B; ++b) {
    std::copy(h_prev + b * ld_h_prev, h_prev + b * ld_h_prev + H, p.h_n + b * H);
  }
  if (Cell::kHasCellState) std::copy(c_prev, c_prev + B * H, p.c_n);
}

template <typename T>
struct BackwardParams {
  int64_t steps, batch, hidden, gates, saved_width, ldo;
  bool reverse;
  const T* w_hh;         // [G*H, H]
  const T* h0;           // [B, H]
  const T* c0;           // [B, H] (cells with a cell state)
  const T* output;       // [T, B, ldo], this direction's columns
  const T* saved;        // [T, B, S*H] what forward saved
  const T* grad_output;  // [T, B, ldo], or null for a zero gradient
  T* dgx;                // [T, B, G*H] out: input-side pre-activation gradients
  T* dgh;                // [T, B, G*H] out: hidden-side ones (may alias dgx, see the cell)
  T* dh;                 // [2, B, H] scratch, dh[0] holds the gradient w.r.t. h_n on entry
  T* dc;                 // [B, H] in: gradient w.r.t. c_n; out: w.r.t. c0
  T* dh0;                // [B, H] out: gradient w.r.t. h0
};

template <typename Cell, typename T>
void backward_direction(const BackwardParams<T>& p) {
  const int64_t B = p.batch, H = p.hidden, GH = p.gates * H, SH = p.saved_width * H;
  T* dh = p.dh;
  T* dh_prev = p.dh + B * H;
  for (int64_t s = p.steps - 1; s >= 0; --s) {
    const int64_t t = p.reverse ? p.steps - 1 - s : s;
    const int64_t t_prev = p.reverse ? t + 1 : t - 1;
    const bool first = s == 0;
    const T* h_prev = first ? p.h0 : p.output + t_prev * B * p.ldo;
    const int64_t ld_h_prev = first ? H : p.ldo;
    const T* saved_t = p.saved + t * B * SH;
    const T* h_out = p.output + t * B * p.ldo;
    const T* go_t = p.grad_output != nullptr ? p.grad_output + t * B * p.ldo : nullptr;
    T* dgx_t = p.dgx + t * B * GH;
    T* dgh_t = p.dgh + t * B * GH;
    at::parallel_for(0, B, pointwise_grain(GH), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const T* c_prev_b = nullptr;
        T* dc_b = nullptr;
        if constexpr (Cell::kHasCellState) {
          c_prev_b =
              first ? p.c0 + b * H : p.saved + (t_prev * B + b) * SH + Cell::kStateInSaved * H;
          dc_b = p.dc + b * H;
        }
        for (int64_t j = 0; j < H; ++j) {
          const T g = dh[b * H + j] + (go_t != nullptr ? go_t[b * p.ldo + j] : T(0));
          Cell::backward(saved_t + b * SH, h_out + b * p.ldo, h_prev + b * ld_h_prev, c_prev_b, g,
                         dc_b, dgx_t + b * GH, dgh_t + b * GH, dh_prev + b * H, H, j);
        }
      }
    });
    // dh_{t-1} = (direct part written by the cell) + dgh_t @ W_hh
    gemm<T>(false, false, B, H, GH, T(1), dgh_t, GH, p.w_hh, H, T(1), dh_prev, H);
    std::swap(dh, dh_prev);
  }
  std::copy(dh, dh + B * H, p.dh0);
}

}  // namespace cpu
}  // namespace rnnext
