// GRU cell in torch.nn's formulation (gate order r, z, n):
//   r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
//   z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
//   h' = (1 - z) * n + z * h
// r multiplies the recurrent part including b_hn, so the input-side and hidden-side gradients
// of the n gate differ: the cell writes both (kSeparateHiddenGrad).
//
// Pointer shapes, for one batch row and hidden size H (G = 3 gates):
//   xg [3H], hg [3H], b_hh [3H], h_prev [H], h_out [H]
//   saved [4H] = r, z, n, hn (hn = W_hn h + b_hn)
//   dgx [3H] input-side and dgh [3H] hidden-side pre-activation gradients
#pragma once

#include "common.h"

namespace rnnext {
namespace cells {

struct Gru {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 4;
  static constexpr bool kHasCellState = false;
  // whether h_prev reaches h' other than through W_hh (then backward writes dh_prev_direct)
  static constexpr bool kDirectHiddenGrad = true;
  static constexpr bool kSeparateHiddenGrad = true;
  // r multiplies W_hn h + b_hn: the n gate needs its parts apart
  static constexpr bool kSumsGates = false;

  // kSave: write what backward needs to `saved` (a forward without backward skips it)
  template <bool kSave = true, typename T>
  RNNEXT_HD static void forward(const T* xg, const T* hg, const T* b_hh, const T* h_prev,
                                const T* /*c_prev*/, T* h_out, T* /*c_out*/, T* saved, int64_t H,
                                int64_t j) {
    const T r = sigmoid(xg[j] + hg[j] + b_hh[j]);
    const T z = sigmoid(xg[H + j] + hg[H + j] + b_hh[H + j]);
    const T hn = hg[2 * H + j] + b_hh[2 * H + j];
    const T n = tanh_(xg[2 * H + j] + r * hn);
    h_out[j] = (T(1) - z) * n + z * h_prev[j];
    if constexpr (kSave) {
      saved[j] = r;
      saved[H + j] = z;
      saved[2 * H + j] = n;
      saved[3 * H + j] = hn;
    }
  }

  template <typename T>
  RNNEXT_HD static void backward(const T* saved, const T* /*h_out*/, const T* h_prev,
                                 const T* /*c_prev*/, T dh, T* /*dc*/, T* dgx, T* dgh,
                                 T* dh_prev_direct, int64_t H, int64_t j) {
    const T r = saved[j];
    const T z = saved[H + j];
    const T n = saved[2 * H + j];
    const T hn = saved[3 * H + j];
    const T dn_pre = dh * (T(1) - z) * tanh_grad(n);
    const T dz_pre = dh * (h_prev[j] - n) * sigmoid_grad(z);
    const T dr_pre = dn_pre * hn * sigmoid_grad(r);
    dgx[j] = dr_pre;
    dgx[H + j] = dz_pre;
    dgx[2 * H + j] = dn_pre;
    dgh[j] = dr_pre;
    dgh[H + j] = dz_pre;
    dgh[2 * H + j] = dn_pre * r;
    dh_prev_direct[j] = dh * z;
  }
};

}  // namespace cells
}  // namespace rnnext
