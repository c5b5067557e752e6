// LSTM cell in torch.nn's formulation (gate order i, f, g, o):
//   i, f, o = sigmoid(W_i* x + b_i* + W_h* h + b_h*),  g = tanh(W_ig x + b_ig + W_hg h + b_hg)
//   c' = f * c + i * g,  h' = o * tanh(c')
// Input-side and hidden-side gate gradients are equal, so the cell writes dgx only.
//
// Pointer shapes, for one batch row and hidden size H (G = 4 gates):
//   xg [4H], hg [4H], b_hh [4H], c_prev [H], h_out [H], c_out [H]
//   saved [5H] = i, f, g, o, c' (backward recomputes tanh(c'): one more tanh per element beats
//   a sixth saved row, which for long sequences is what bounds memory)
//   dc [H]: in, the gradient w.r.t. c'; out, the gradient w.r.t. c (updated in place)
#pragma once

#include "common.h"

namespace rnnext {
namespace cells {

struct Lstm {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 5;
  static constexpr bool kHasCellState = true;
  static constexpr int kStateInSaved = 4;  // c' sits at [4H, 5H) of the saved row
  // whether h_prev reaches h' other than through W_hh (then backward writes dh_prev_direct)
  static constexpr bool kDirectHiddenGrad = false;
  static constexpr bool kSeparateHiddenGrad = false;
  // every gate's pre-activation is xg + hg + b_hh, so a caller may sum them first
  static constexpr bool kSumsGates = true;

  // kSave: write what backward needs to `saved` (a forward without backward skips it)
  template <bool kSave = true, typename T>
  RNNEXT_HD static void forward(const T* xg, const T* hg, const T* b_hh, const T* /*h_prev*/,
                                const T* c_prev, T* h_out, T* c_out, T* saved, int64_t H,
                                int64_t j) {
    const auto pre = [&](int k) { return xg[k * H + j] + hg[k * H + j] + b_hh[k * H + j]; };
    activate<kSave, T>(pre, c_prev, h_out, c_out, saved, H, j);
  }

  // forward from the summed pre-activations gates [4H] = xg + hg + b_hh (kSumsGates)
  template <bool kSave = true, typename T>
  RNNEXT_HD static void forward_summed(const T* gates, const T* c_prev, T* h_out, T* c_out,
                                       T* saved, int64_t H, int64_t j) {
    activate<kSave, T>([&](int k) { return gates[k * H + j]; }, c_prev, h_out, c_out, saved, H, j);
  }

  // pre(k): gate k's pre-activation at element j
  template <bool kSave, typename T, typename Pre>
  RNNEXT_HD static void activate(const Pre& pre, const T* c_prev, T* h_out, T* c_out, T* saved,
                                 int64_t H, int64_t j) {
    const T i = sigmoid(pre(0));
    const T f = sigmoid(pre(1));
    const T g = tanh_(pre(2));
    const T o = sigmoid(pre(3));
    const T c = f * c_prev[j] + i * g;
    const T tc = tanh_(c);
    h_out[j] = o * tc;
    c_out[j] = c;
    if constexpr (kSave) {
      saved[j] = i;
      saved[H + j] = f;
      saved[2 * H + j] = g;
      saved[3 * H + j] = o;
      saved[4 * H + j] = c;
    }
  }

  template <typename T>
  RNNEXT_HD static void backward(const T* saved, const T* /*h_out*/, const T* /*h_prev*/,
                                 const T* c_prev, T dh, T* dc, T* dgx, T* /*dgh*/,
                                 T* /*dh_prev_direct*/, int64_t H, int64_t j) {
    const T i = saved[j];
    const T f = saved[H + j];
    const T g = saved[2 * H + j];
    const T o = saved[3 * H + j];
    const T tc = tanh_(saved[4 * H + j]);
    const T dc_total = dc[j] + dh * o * tanh_grad(tc);
    dgx[j] = dc_total * g * sigmoid_grad(i);
    dgx[H + j] = dc_total * c_prev[j] * sigmoid_grad(f);
    dgx[2 * H + j] = dc_total * i * tanh_grad(g);
    dgx[3 * H + j] = dh * tc * sigmoid_grad(o);
    dc[j] = dc_total * f;
  }
};

}  // namespace cells
}  // namespace rnnext
