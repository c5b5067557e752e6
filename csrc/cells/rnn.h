// Elman RNN cell: h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu.
//
// Pointer shapes, for one batch row and hidden size H (G = 1 gate):
//   xg [H]  input projection W_ih x + b_ih        hg [H]  recurrent product W_hh h (no bias)
//   b_hh [H]                                        h_prev [H], h_out [H]
// Nothing is saved besides the output: both derivatives follow from h' alone.
#pragma once

#include "common.h"

namespace rnnext {
namespace cells {

template <bool kRelu>
struct Elman {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 0;  // per-step saved width, in units of H
  static constexpr bool kHasCellState = false;
  // whether h_prev reaches h' other than through W_hh (then backward writes dh_prev_direct)
  static constexpr bool kDirectHiddenGrad = false;
  static constexpr bool kSeparateHiddenGrad = false;
  // the gate's pre-activation is xg + hg + b_hh, so a caller may sum them first
  static constexpr bool kSumsGates = true;

  // (nothing to save: backward reads h' itself; kSave is there for the common interface)
  template <bool kSave = true, typename T>
  RNNEXT_HD static void forward(const T* xg, const T* hg, const T* b_hh, const T* /*h_prev*/,
                                const T* /*c_prev*/, T* h_out, T* /*c_out*/, T* /*saved*/,
                                int64_t /*H*/, int64_t j) {
    h_out[j] = activate(xg[j] + hg[j] + b_hh[j]);
  }

  // forward from the summed pre-activation gates [H] = xg + hg + b_hh (kSumsGates)
  template <bool kSave = true, typename T>
  RNNEXT_HD static void forward_summed(const T* gates, const T* /*c_prev*/, T* h_out, T* /*c_out*/,
                                       T* /*saved*/, int64_t /*H*/, int64_t j) {
    h_out[j] = activate(gates[j]);
  }

  template <typename T>
  RNNEXT_HD static T activate(T pre) {
    // relu written so that NaN passes through, as torch's relu does
    return kRelu ? (!(pre <= T(0)) ? pre : T(0)) : tanh_(pre);
  }

  // dh: gradient of the loss w.r.t. h' (element j). Writes the pre-activation gradient to dgx
  // (which is also the hidden-side gradient) and the direct part of dh_prev (none here).
  template <typename T>
  RNNEXT_HD static void backward(const T* /*saved*/, const T* h_out, const T* /*h_prev*/,
                                 const T* /*c_prev*/, T dh, T* /*dc*/, T* dgx, T* /*dgh*/,
                                 T* /*dh_prev_direct*/, int64_t /*H*/, int64_t j) {
    const T y = h_out[j];
    // (a NaN output passes the gradient on, as torch's relu backward does)
    dgx[j] = kRelu ? (y <= T(0) ? T(0) : dh) : dh * tanh_grad(y);
  }
};

using ElmanTanh = Elman<false>;
using ElmanRelu = Elman<true>;

}  // namespace cells
}  // namespace rnnext
