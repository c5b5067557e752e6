// The CUDA time loops, written once and instantiated per cell policy (csrc/cells) and storage
// type. Per step: one cuBLAS GEMM for the recurrent product, one fused pointwise kernel; the
// input-side products run as large GEMMs over blocks of steps. The cell maths is the CPU's:
// each thread loads one (row, unit) element's gate values into registers as acc_t<T> and calls
// the same Cell::forward / Cell::backward with H = 1.
//
// Per-sequence lengths work as on the CPU: rows are sorted longest first, so the rows active
// at step t are the prefix [0, batch_sizes[t]); rows past their end get zeros (output,
// workspace, gate gradients) and keep their state.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "layer_driver.h"
#include "lt_gemm.h"
#include "status.h"

namespace rnnext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// Conversions between storage and compute types (explicit: torch builds CUDA code with the
// implicit half conversions switched off).
__device__ __forceinline__ float to_acc(float v) {
  return v;
}
__device__ __forceinline__ double to_acc(double v) {
  return v;
}
__device__ __forceinline__ float to_acc(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
constexpr cudaDataType_t blas_type() {
  if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  if constexpr (std::is_same_v<T, __half>) return CUDA_R_16F;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  return CUDA_R_32F;
}

// What a GEMM call needs besides its operands: the cuBLAS handle bound to `stream`, and, for
// the forward's float products of few rows, cuBLASLt's scratch and the device (lt_gemm.h).
struct Blas {
  cublasHandle_t handle;
  cudaStream_t stream;
  void* lt_workspace = nullptr;  // null: every product through cuBLAS
  uint64_t lt_workspace_bytes = 0;
  int device = 0;
};

// Row-major C[M, N] = op(A)[M, K] op(B)[K, N] + beta C, with A stored [M, K] (or [K, M] when
// trans_a) and B stored [K, N] (or [N, K] when trans_b); A and B in T, C in TC (T or
// acc_t<T>), products accumulated in acc_t<T>. cuBLAS is column-major, so this computes
// C^T = op(B)^T op(A)^T. Float products A B^T of a few rows go through cuBLASLt (lt_gemm.h).
template <typename T, typename TC>
void gemm(const Blas& blas, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
          int64_t lda, const T* B, int64_t ldb, acc_t<T> beta, TC* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum: C = beta C
    if (beta == acc_t<T>(0)) {
      check_cuda(cudaMemset2DAsync(C, ldc * sizeof(TC), 0, N * sizeof(TC), M, blas.stream),
                 "memset");
    }
    return;
  }
  if constexpr (std::is_same_v<T, float> && std::is_same_v<TC, float>) {
    // (only the forward gives it a workspace, and all its products are A B^T: the backward's
    // products of few rows, dgates W, measured slower through cuBLASLt at some sizes)
    if (blas.lt_workspace != nullptr && !trans_a && trans_b && M <= kLtMaxRows &&
        lt_gemm(blas.device, blas.stream, blas.lt_workspace, blas.lt_workspace_bytes, M, N, K, A,
                lda, B, ldb, beta, C, ldc)) {
      return;
    }
  }
  const acc_t<T> alpha = 1;
  const cublasComputeType_t compute =
      std::is_same_v<T, double> ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  check_blas(cublasGemmEx(blas.handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                          trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
                          static_cast<int>(M), static_cast<int>(K), &alpha, B, blas_type<T>(),
                          static_cast<int>(ldb), A, blas_type<T>(), static_cast<int>(lda), &beta, C,
                          blas_type<TC>(), static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT),
             "gemm");
}

// Zeroes rows [first, rows) of a row-major [rows, width] block with row stride ld.
template <typename T>
void zero_rows(T* data, int64_t first, int64_t rows, int64_t width, int64_t ld,
               cudaStream_t stream) {
  if (first >= rows || width == 0) return;
  check_cuda(cudaMemset2DAsync(data + first * ld, ld * sizeof(T), 0, width * sizeof(T),
                               rows - first, stream),
             "memset");
}

unsigned blocks_for(int64_t elements) {
  return static_cast<unsigned>((elements + kThreads - 1) / kThreads);
}

// One step's fused pointwise forward, one thread per element (b, j) of the n active rows.
// Row b's previous state is h_cont's row (b < n_cont) or h0's.
template <typename Cell, typename T>
__global__ void forward_step_kernel(ForwardParams<T> p, const acc_t<T>* xg_t, int64_t n,
                                    int64_t n_cont, const T* h_cont, T* cell_out,
                                    int64_t ld_cell_out, T* ws_t) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates;
  const int64_t H = p.hidden, GH = G * H;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * H) return;
  const int64_t b = idx / H, j = idx - b * H;
  A xg[G], hg[G], b_hh[G];
#pragma unroll
  for (int k = 0; k < G; ++k) {
    xg[k] = xg_t[b * GH + k * H + j] + to_acc(p.b_ih[k * H + j]);
    hg[k] = p.hg[b * GH + k * H + j];
    b_hh[k] = to_acc(p.b_hh[k * H + j]);
  }
  A h_prev = 0;  // with a projection P < H may hold: only the first P units have one
  if (j < p.out) h_prev = to_acc(b < n_cont ? h_cont[b * p.ldo + j] : p.h0[b * p.out + j]);
  A c = 0;
  if constexpr (Cell::kHasCellState) c = p.c_state[b * H + j];
  A h_new = 0, c_new = 0, saved[Cell::kSaved > 0 ? Cell::kSaved : 1];
  Cell::forward(xg, hg, b_hh, &h_prev, &c, &h_new, &c_new, saved, int64_t{1}, int64_t{0});
  cell_out[b * ld_cell_out + j] = from_acc<T>(h_new);
  if constexpr (Cell::kHasCellState) p.c_state[b * H + j] = c_new;
#pragma unroll
  for (int k = 0; k < Cell::kSaved; ++k) ws_t[b * p.ws_row + k * H + j] = from_acc<T>(saved[k]);
}

// With a projection: grad_h_t[b, :] = dh[b, :] + grad_output[t, b, :] for the n active rows,
// zeros for the others (they must add nothing to the weight gradients).
template <typename T>
__global__ void projected_grad_kernel(BackwardParams<T> p, int64_t n, const T* go_t, T* grad_h_t) {
  const int64_t P = p.out;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * P) return;
  const int64_t b = idx / P, j = idx - b * P;
  acc_t<T> g = 0;
  if (b < n) {
    g = p.dh[idx];
    if (go_t != nullptr) g += to_acc(go_t[b * p.go_stride_b + j * p.go_stride_j]);
  }
  grad_h_t[idx] = from_acc<T>(g);
}

// One step's fused pointwise backward, one thread per element (b, j) of the n active rows:
// gate gradients (dgx, and dgh where the cell splits them), the running dc, the direct part
// of dh_prev (GRU, written over dh), and dgh_first for rows that start at this step.
template <typename Cell, typename T>
__global__ void backward_step_kernel(BackwardParams<T> p, int64_t t, int64_t n, int64_t n_cont,
                                     const T* h_cont, const T* ws_t, const T* ws_prev,
                                     const T* go_t, const acc_t<T>* dcell, int64_t ld_dcell,
                                     T* dgx_t, T* dgh_t) {
  using A = acc_t<T>;
  constexpr int G = Cell::kGates;
  const int64_t H = p.hidden, GH = G * H, P = p.out;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * H) return;
  const int64_t b = idx / H, j = idx - b * H;
  A g = dcell[b * ld_dcell + j];
  if (go_t != nullptr) g += to_acc(go_t[b * p.go_stride_b + j * p.go_stride_j]);
  const T* ws = ws_t + b * p.ws_row;
  A saved[Cell::kSaved > 0 ? Cell::kSaved : 1];
#pragma unroll
  for (int k = 0; k < Cell::kSaved; ++k) saved[k] = to_acc(ws[k * H + j]);
  // h' (only the Elman cell reads it; it has no projection, so P = H there)
  A h_out = 0;
  if (!p.projected()) h_out = to_acc(p.output[(t * p.batch + b) * p.ldo + j]);
  A h_prev = 0;
  if (j < P) h_prev = to_acc(b < n_cont ? h_cont[b * p.ldo + j] : p.h0[b * P + j]);
  A c_prev = 0, dc = 0;
  if constexpr (Cell::kHasCellState) {
    c_prev = b < n_cont ? to_acc(ws_prev[b * p.ws_row + Cell::kStateInSaved * H + j])
                        : to_acc(p.c0[b * H + j]);
    dc = p.dc[b * H + j];
  }
  A dgx[G], dgh[G], dh_direct = 0;
  Cell::backward(saved, &h_out, &h_prev, &c_prev, g, &dc, dgx, dgh, &dh_direct, int64_t{1},
                 int64_t{0});
  const A* hidden_side = Cell::kSeparateHiddenGrad ? dgh : dgx;
#pragma unroll
  for (int k = 0; k < G; ++k) {
    dgx_t[b * GH + k * H + j] = from_acc<T>(dgx[k]);
    if constexpr (Cell::kSeparateHiddenGrad) dgh_t[b * GH + k * H + j] = from_acc<T>(dgh[k]);
    if (b >= n_cont) p.dgh_first[b * GH + k * H + j] = hidden_side[k];
  }
  if constexpr (Cell::kHasCellState) p.dc[b * H + j] = dc;
  if constexpr (Cell::kDirectHiddenGrad) p.dh[b * P + j] = dh_direct;
}

template <typename Cell, typename T>
void forward_loop(const ForwardParams<T>& p, cublasHandle_t handle, cudaStream_t stream) {
  Blas blas{handle, stream};
  if (p.lt_workspace != nullptr && lt_gemm_applies(handle)) {
    blas.lt_workspace = p.lt_workspace;
    blas.lt_workspace_bytes = p.lt_workspace_bytes;
    check_cuda(cudaGetDevice(&blas.device), "get device");
  }
  const int64_t B = p.batch, P = p.out, H = p.hidden, GH = p.gates * H;
  if (p.has_ended_rows(p.batch)) {
    // Rows past their end stay zero: kernels and GEMMs write active rows only, so one fill
    // up front replaces a fill per step.
    zero_rows(p.output, 0, p.steps * B, P, p.ldo, stream);
    if (p.workspace != nullptr) {
      zero_rows(p.workspace, 0, p.steps * B, p.ws_row, p.ws_row, stream);
    }
  }
  int64_t block_first = 0, block_count = 0;
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.step(s), n = p.batch_sizes[t], n_cont = p.continuing(t);
    if (s % p.block_steps == 0) {
      p.block_of(s, block_first, block_count);
      gemm<T, acc_t<T>>(blas, false, true, block_count * B, GH, p.inputs,
                        p.x + block_first * B * p.inputs, p.inputs, p.w_ih, p.inputs, 0, p.xg, GH);
    }
    const acc_t<T>* xg_t = p.xg + (t - block_first) * B * GH;
    const T* h_cont = n_cont > 0 ? p.output + p.previous(t) * B * p.ldo : nullptr;
    T* h_out = p.output + t * B * p.ldo;
    T* ws_t = p.workspace != nullptr ? p.workspace + t * B * p.ws_row : p.step_scratch;
    // The cell writes h' itself, or m = o * tanh(c') that w_hr then projects.
    T* cell_out = p.projected() ? ws_t + p.m_offset : h_out;
    const int64_t ld_cell_out = p.projected() ? p.ws_row : p.ldo;

    gemm<T, acc_t<T>>(blas, false, true, n_cont, GH, P, h_cont, p.ldo, p.w_hh, P, 0, p.hg, GH);
    gemm<T, acc_t<T>>(blas, false, true, n - n_cont, GH, P, p.h0 + n_cont * P, P, p.w_hh, P, 0,
                      p.hg + n_cont * GH, GH);
    if (n > 0) {
      forward_step_kernel<Cell, T><<<blocks_for(n * H), kThreads, 0, stream>>>(
          p, xg_t, n, n_cont, h_cont, cell_out, ld_cell_out, ws_t);
      check_cuda(cudaGetLastError(), "forward step kernel launch");
    }
    if (p.projected()) {
      gemm<T, T>(blas, false, true, n, P, H, cell_out, ld_cell_out, p.w_hr, H, 0, h_out, p.ldo);
    }
  }
  // h_n: each row's state at its own last step, copied for runs of rows that share the source
  // step (all rows with a nonzero length in the reverse direction), h0 for empty rows.
  for (int64_t b = 0; b < B;) {
    auto source_step = [&](int64_t row) {
      const int64_t len = p.lengths[row];
      return len == 0 ? int64_t{-1} : (p.reverse ? 0 : len - 1);
    };
    const int64_t t = source_step(b);
    int64_t end = b + 1;
    while (end < B && source_step(end) == t) ++end;
    const T* src = t < 0 ? p.h0 + b * P : p.output + t * B * p.ldo + b * p.ldo;
    const int64_t ld_src = t < 0 ? P : p.ldo;
    check_cuda(cudaMemcpy2DAsync(p.h_n + b * P, P * sizeof(T), src, ld_src * sizeof(T),
                                 P * sizeof(T), end - b, cudaMemcpyDeviceToDevice, stream),
               "h_n copy");
    b = end;
  }
}

// The input and weight gradients of the steps [first, first + count), from their gate
// gradients: large GEMMs over all their rows at once.
template <typename T>
void backward_block_gemms(const BackwardParams<T>& p, int64_t first, int64_t count,
                          const Blas& blas) {
  using A = acc_t<T>;
  const int64_t B = p.batch, I = p.inputs, P = p.out, H = p.hidden, GH = p.gates * H;
  const int64_t rows = count * B;
  if (p.grad_x != nullptr) {
    gemm<T, A>(blas, false, false, rows, I, GH, p.dgx, GH, p.w_ih, I, 1, p.grad_x + first * B * I,
               I);
  }
  if (p.grad_w_ih == nullptr) return;
  gemm<T, A>(blas, true, false, GH, I, rows, p.dgx, GH, p.x + first * B * I, I, 1, p.grad_w_ih, I);
  // Step t's hidden-side gradient pairs with the state it consumed: the previous step's output
  // in this direction's order (zero past a row's end); h0 at a row's first step is left to the
  // caller through dgh_first. Those first steps are t = 0 (forward) and t = T - 1 (reverse).
  const int64_t skip_first = (!p.reverse && first == 0) ? 1 : 0;
  const int64_t skip_last = (p.reverse && first + count == p.steps) ? 1 : 0;
  const int64_t paired = count - skip_first - skip_last;
  const int64_t t0 = first + skip_first;
  if (paired > 0) {
    gemm<T, A>(blas, true, false, GH, P, paired * B, p.dgh + skip_first * B * GH, GH,
               p.output + p.previous(t0) * B * p.ldo, p.ldo, 1, p.grad_w_hh, P);
  }
  if (p.grad_b_ih != nullptr) {
    gemm<T, A>(blas, true, false, GH, 1, rows, p.dgx, GH, p.ones, 1, 1, p.grad_b_ih, 1);
    gemm<T, A>(blas, true, false, GH, 1, rows, p.dgh, GH, p.ones, 1, 1, p.grad_b_hh, 1);
  }
  if (p.projected()) {
    // dW_hr += dh'^T m, m being the last H of each workspace row
    gemm<T, A>(blas, true, false, P, H, rows, p.grad_h, P,
               p.workspace + first * B * p.ws_row + p.m_offset, p.ws_row, 1, p.grad_w_hr, H);
  }
}

template <typename Cell, typename T>
void backward_loop(const BackwardParams<T>& p, cublasHandle_t handle, cudaStream_t stream) {
  const Blas blas{handle, stream};
  const int64_t B = p.batch, P = p.out, H = p.hidden, GH = p.gates * H;
  check_cuda(cudaMemsetAsync(p.dgh_first, 0, B * GH * sizeof(acc_t<T>), stream), "memset");
  int64_t block_first = 0, block_count = 0;
  for (int64_t s = p.steps - 1; s >= 0; --s) {
    const int64_t t = p.step(s), n = p.batch_sizes[t], n_cont = p.continuing(t);
    if (s == p.steps - 1 || s % p.block_steps == p.block_steps - 1) {
      p.block_of(s, block_first, block_count);
      if (p.has_ended_rows(p.batch)) {
        // gate gradients of rows past their end must be zero for the block GEMMs; the
        // kernel writes active rows only
        zero_rows(p.dgx, 0, block_count * B, GH, GH, stream);
        if (p.dgh != p.dgx) zero_rows(p.dgh, 0, block_count * B, GH, GH, stream);
      }
    }
    const T* h_cont = n_cont > 0 ? p.output + p.previous(t) * B * p.ldo : nullptr;
    const T* ws_t = p.workspace + t * B * p.ws_row;
    const T* ws_prev = n_cont > 0 ? p.workspace + p.previous(t) * B * p.ws_row : nullptr;
    T* dgx_t = p.dgx + (t - block_first) * B * GH;
    T* dgh_t = p.dgh + (t - block_first) * B * GH;
    const T* go_t = p.grad_output != nullptr ? p.grad_output + t * p.go_stride_t : nullptr;

    // The cell's output gradient: dh' itself, or through the projection dm = dh' @ w_hr.
    const acc_t<T>* dcell = p.dh;
    int64_t ld_dcell = P;
    if (p.projected()) {
      T* grad_h_t = p.grad_h + (t - block_first) * B * P;
      projected_grad_kernel<T><<<blocks_for(B * P), kThreads, 0, stream>>>(p, n, go_t, grad_h_t);
      check_cuda(cudaGetLastError(), "projection gradient kernel launch");
      gemm<T, acc_t<T>>(blas, false, false, n, H, P, grad_h_t, P, p.w_hr, H, 0, p.dm, H);
      dcell = p.dm;
      ld_dcell = H;
      go_t = nullptr;
    }
    if (n > 0) {
      backward_step_kernel<Cell, T><<<blocks_for(n * H), kThreads, 0, stream>>>(
          p, t, n, n_cont, h_cont, ws_t, ws_prev, go_t, dcell, ld_dcell, dgx_t, dgh_t);
      check_cuda(cudaGetLastError(), "backward step kernel launch");
    }
    // dh_prev = (direct part, GRU) + dgh_t @ W_hh over the active rows (the others keep
    // theirs); for the rows at their first step that is the gradient w.r.t. h0
    const int64_t dh_rows = p.grad_h0 != 0 ? n : n_cont;
    gemm<T, acc_t<T>>(blas, false, false, dh_rows, P, GH, dgh_t, GH, p.w_hh, P,
                      Cell::kDirectHiddenGrad ? 1 : 0, p.dh, P);
    if (s % p.block_steps == 0) backward_block_gemms(p, block_first, block_count, blas);
  }
}

}  // namespace

template <typename T>
void forward_direction(cells::Kind cell, const ForwardParams<T>& p, cublasHandle_t blas,
                       cudaStream_t stream) {
  cells::visit(cell, [&](auto c) { forward_loop<decltype(c), T>(p, blas, stream); });
}

template <typename T>
void backward_direction(cells::Kind cell, const BackwardParams<T>& p, cublasHandle_t blas,
                        cudaStream_t stream) {
  cells::visit(cell, [&](auto c) { backward_loop<decltype(c), T>(p, blas, stream); });
}

#define RNNEXT_INSTANTIATE(T)                                                                \
  template void forward_direction<T>(cells::Kind, const ForwardParams<T>&, cublasHandle_t,   \
                                     cudaStream_t);                                          \
  template void backward_direction<T>(cells::Kind, const BackwardParams<T>&, cublasHandle_t, \
                                      cudaStream_t);
RNNEXT_INSTANTIATE(float)
RNNEXT_INSTANTIATE(double)
RNNEXT_INSTANTIATE(__half)
RNNEXT_INSTANTIATE(__nv_bfloat16)
#undef RNNEXT_INSTANTIATE

}  // namespace cuda
}  // namespace rnnext
