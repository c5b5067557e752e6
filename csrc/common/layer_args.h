// Argument checks shared by every backend's host code. Each check names the argument, what
// was expected and what came, so a caller of torch.ops.rnnext.* sees exactly what is wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "../cells/dispatch.h"
#include "layer_sizes.h"

namespace rnnext {

using CellKind = cells::Kind;

// mode: torch.nn's names, "RNN_TANH", "RNN_RELU", "GRU" or "LSTM".
CellKind parse_mode(c10::string_view mode);
int64_t gate_count(CellKind cell);
// Floats saved per batch row and step for backward, in units of H.
int64_t saved_width(CellKind cell);

// One direction's weights, taken from the op's flat `weights` list, which holds per direction
// w_ih, w_hh, then b_ih, b_hh with biases, then w_hr with a projection (LSTM): torch.nn's
// `_flat_weights` order for one layer.
struct DirectionWeights {
  at::Tensor w_ih;  // [G*H, I]
  at::Tensor w_hh;  // [G*H, H]
  at::Tensor b_ih;  // [G*H], undefined without biases
  at::Tensor b_hh;  // [G*H], undefined without biases
  at::Tensor w_hr;  // [P, H], LSTM projection, undefined without one
};

// Sizes of one layer call: T steps, B batch rows, I inputs, H hidden units, P state size (H,
// or the projection size), G gates, D directions, S saved width (units of H), ws_row workspace
// elements per step and row (the saved values, then m = o * tanh(c') with a projection).
struct LayerShape {
  CellKind cell;
  int64_t T, B, I, H, P, G, D, S, ws_row;
  bool has_biases, has_proj;
  // bfloat16 weights with float32 input (CPU, bf16_products): see check_layer_args
  bool bf16_weights = false;
  std::vector<DirectionWeights> dirs;
  // [B] the kernels' row b is the caller's row batch_order[b] (see batch_order.h); empty
  // where the caller's lengths are sorted longest first already (or absent)
  std::vector<int64_t> batch_order;
  std::vector<int64_t> lengths;      // [B] per-row lengths, longest first (T without lengths)
  std::vector<int64_t> batch_sizes;  // [T] rows active at each step
  std::vector<int64_t> row_starts;   // [T + 1] rows active before each step, over all steps

  // Whether the kernels run on the caller's batch reordered (BatchOrder).
  bool reorders_batch() const { return !batch_order.empty(); }
  // Whether some row ends before the last step.
  bool has_ended_rows() const { return T > 0 && batch_sizes[T - 1] < B; }
};

// Checks the forward op's arguments and returns their sizes.
// input [T, B, I] float32 or float64 (also float16 and bfloat16 on CUDA); hx [D, B, P]; cx [D, B,
// H] (LSTM only); lengths [B] int64 or int32, on the CPU or the input's device, values in [0, T],
// in any order (s.lengths sorted longest first, s.batch_order the order). The weights have the
// input's dtype, or, with bf16_products and float32 input on the CPU, all of them may be bfloat16
// (s.bf16_weights).
LayerShape check_layer_args(const char* op, c10::string_view mode, const at::Tensor& input,
                            at::TensorList weights, const std::optional<at::Tensor>& hx,
                            const std::optional<at::Tensor>& cx, bool has_biases,
                            bool bidirectional, const std::optional<at::Tensor>& lengths,
                            bool bf16_products = false);

// Checks a tensor the backward op takes besides the forward's arguments: same dtype and
// device as the input and exactly the shape the forward made (dtype: another one, where given).
void check_like_input(const char* op, const std::string& name, const at::Tensor& t,
                      const at::Tensor& input, at::IntArrayRef shape,
                      std::optional<at::ScalarType> dtype = std::nullopt);

// Checks what layer_backward takes besides the forward's arguments: output [T, B, D*P],
// workspace [D, T, B, ws_row], grad_output like output, grad_h_n [D, B, P], grad_c_n [D, B, H]
// (LSTM only).
void check_backward_args(const char* op, const LayerShape& s, c10::string_view mode,
                         const at::Tensor& input, const at::Tensor& output,
                         const at::Tensor& workspace, const std::optional<at::Tensor>& grad_output,
                         const std::optional<at::Tensor>& grad_h_n,
                         const std::optional<at::Tensor>& grad_c_n);

// Direction d's sizes and step order, with input-side GEMMs in blocks of block_steps steps.
// The pointers point into s, which must outlive the result.
LayerSizes direction_sizes(const LayerShape& s, int64_t d, int64_t block_steps);

// Zeroed, contiguous gradients for direction d's weights, in the order of the op's `weights`
// (w_ih, w_hh, then b_ih, b_hh with biases, then w_hr with a projection), each made by
// zeros(sizes) (the backend's allocation: at::zeros, or the CPU's buffer cache).
std::vector<at::Tensor> zero_weight_gradients(
    const LayerShape& s, int64_t d, const std::function<at::Tensor(at::IntArrayRef)>& zeros);

// One direction's weights and initial states, contiguous, with zeros for absent biases and
// states: what every backend's loops read. w_hr and c0 are undefined without a projection or
// a cell state.
struct DirectionTensors {
  at::Tensor w_ih, w_hh, w_hr, b_ih, b_hh, h0, c0;

  DirectionTensors(const LayerShape& s, int64_t d, const std::optional<at::Tensor>& hx,
                   const std::optional<at::Tensor>& cx, const at::TensorOptions& opts);
};

}  // namespace rnnext
