// The CUDA time loops' interface: params structs of raw device pointers and sizes, and the
// per-direction entry points. Framework-free (no torch headers), so that the kernel file
// compiles in seconds; csrc/cuda/layer_cuda.cpp fills the structs from tensors.
//
// Storage type T is float, double, __half or __nv_bfloat16; the maths runs in acc_t<T> (float,
// or double for double), and every buffer that carries a running sum or a state across steps
// (gate pre-activations from the GEMMs, c, dh, dc, weight and input gradients) is acc_t<T>.
// What the GEMMs read (inputs, weights, outputs, gate gradients) and what backward reads back
// (the workspace) stay in T.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../cells/dispatch.h"
#include "../common/layer_sizes.h"

namespace rnnext {
namespace cuda {

template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulate<T>::type;

// What both passes share: the sizes and step order (LayerSizes) and the operands. The
// input-side GEMMs run over blocks of `block_steps` steps, so their buffers stay bounded.
template <typename T>
struct LayerDims : LayerSizes {
  const T* x;     // [T, B, I] the layer's input
  const T* w_ih;  // [G*H, I]
  const T* w_hh;  // [G*H, P]
  const T* w_hr;  // [P, H], or null without a projection
  const T* b_ih;  // [G*H] (zeros without biases)
  const T* b_hh;  // [G*H] (zeros without biases)
  const T* h0;    // [B, P]
  const T* c0;    // [B, H] (LSTM), else null

  RNNEXT_HD bool projected() const { return w_hr != nullptr; }
};

template <typename T>
struct ForwardParams : LayerDims<T> {
  acc_t<T>* xg;       // [block_steps, B, G*H] scratch: x W_ih^T of one block (no bias)
  acc_t<T>* hg;       // [B, G*H] scratch: h W_hh^T of the current step (no bias)
  acc_t<T>* c_state;  // [B, H] (LSTM) in: c0; out: c_n
  T* output;          // [T, B, ldo], this direction's P columns
  T* h_n;             // [B, P]
  T* workspace;       // [T, B, ws_row] for backward, or null when backward will not run
  T* step_scratch;    // [B, ws_row]: each step's workspace row when workspace is null
  // cuBLASLt's scratch for the float products of few rows (lt_gemm.h), or null: those
  // products then go to cuBLAS too
  void* lt_workspace;
  uint64_t lt_workspace_bytes;
};

template <typename T>
struct BackwardParams : LayerDims<T> {
  const T* output;       // [T, B, ldo], this direction's P columns
  const T* workspace;    // [T, B, ws_row] what forward saved
  const T* grad_output;  // [T, B, *] with the strides below, or null for a zero gradient
  int64_t go_stride_t, go_stride_b, go_stride_j;
  const T* ones;  // [block_steps * B] ones: bias gradients are GEMMs with it (no atomics)
  // Gradients, each null when not wanted; all are added to and must start zeroed.
  acc_t<T>* grad_x;     // [T, B, I]
  acc_t<T>* grad_w_ih;  // [G*H, I]
  acc_t<T>* grad_w_hh;  // [G*H, P], all but the h0 term (see dgh_first)
  acc_t<T>* grad_b_ih;  // [G*H]
  acc_t<T>* grad_b_hh;  // [G*H]
  acc_t<T>* grad_w_hr;  // [P, H] (with a projection)
  acc_t<T>* dgh_first;  // [B, G*H] out: dgh at each row's first step (pairs with h0)
  acc_t<T>* dh;         // [B, P] in: gradient w.r.t. h_n; out: w.r.t. h0
  acc_t<T>* dc;         // [B, H] (LSTM) in: gradient w.r.t. c_n; out: w.r.t. c0
  acc_t<T>* dm;         // [B, H] scratch (projection): gradient w.r.t. m
  // 1 where the gradients w.r.t. h0 and c0 are wanted, else 0: then a row's first step skips
  // its part of dh_prev = dgh @ W_hh, which gives only h0's gradient (a whole word, since the
  // replay keys compare the params' bytes and a bool's padding is unspecified)
  int64_t grad_h0;
  // Scratch, one block of steps each.
  T* dgx;     // [block_steps, B, G*H] input-side pre-activation gradients
  T* dgh;     // [block_steps, B, G*H] hidden-side ones (aliases dgx unless the cell splits)
  T* grad_h;  // [block_steps, B, P] (projection): gradient w.r.t. h'
};

// One direction of one layer, queued on `stream`; `blas` is a cuBLAS handle bound to it.
// Errors (a cuBLAS status, a launch failure) throw std::runtime_error.
template <typename T>
void forward_direction(cells::Kind cell, const ForwardParams<T>& p, cublasHandle_t blas,
                       cudaStream_t stream);
template <typename T>
void backward_direction(cells::Kind cell, const BackwardParams<T>& p, cublasHandle_t blas,
                        cudaStream_t stream);

}  // namespace cuda
}  // namespace rnnext
