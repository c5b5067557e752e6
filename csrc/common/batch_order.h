// Per-sequence lengths in any order. The kernels take the batch sorted longest first, so that
// the rows active at step t are a prefix (layer_sizes.h). An op given other lengths runs its
// kernels on the batch reordered so and hands its results back in the caller's order: a copy
// of each operand and result with a batch axis, into scratch the backend chooses (the CPU's
// buffer cache, whose pages stay mapped from call to call). A batch already sorted (bucketed
// by length, or a PackedSequence's) is never copied.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <tuple>
#include <vector>

#include "layer_args.h"

namespace rnnext {

class BatchOrder {
 public:
  // allocate(sizes, options): an uninitialised contiguous tensor for a reordered operand.
  using Allocate = std::function<at::Tensor(at::IntArrayRef, const at::TensorOptions&)>;
  // at::empty as an Allocate.
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);

  // For s.reorders_batch(), on the operands' device.
  BatchOrder(const LayerShape& s, const at::Device& device, Allocate allocate);

  // t [N, B, F] (batch along dimension 1: inputs, outputs, states and their gradients) with
  // row b being the caller's row s.batch_order[b]; one value along the batch (a stride-0
  // gradient, as output.sum()'s) and empty tensors as they came.
  at::Tensor to_kernel(const at::Tensor& t) const;
  std::optional<at::Tensor> to_kernel(const std::optional<at::Tensor>& t) const;
  // A result [N, B, F] in the kernels' order back in the caller's, as a new tensor (it is
  // the caller's to keep); empty tensors as they came.
  at::Tensor to_caller(const at::Tensor& t) const;

 private:
  at::Tensor order_;    // [B] int64: the kernels' row b is the caller's row order_[b]
  at::Tensor inverse_;  // [B] int64: the caller's row b is the kernels' row inverse_[b]
  Allocate allocate_;
};

// layer_forward in the caller's order, for every backend: run(input, hx, cx, allocate_output)
// -> (output, h_n, c_n, workspace) runs the kernels on a batch in their order. Where s
// reorders the batch, it runs on copies made by `scratch` (which then also makes the kernels'
// output), and the results are copied back; the workspace stays in the kernels' order.
template <typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_in_callers_order(
    const LayerShape& s, const at::Tensor& input, const std::optional<at::Tensor>& hx,
    const std::optional<at::Tensor>& cx, const BatchOrder::Allocate& scratch, const Run& run) {
  if (!s.reorders_batch()) return run(input, hx, cx, BatchOrder::Allocate(BatchOrder::empty));
  const BatchOrder order(s, input.device(), scratch);
  const auto [output, h_n, c_n, workspace] =
      run(order.to_kernel(input), order.to_kernel(hx), order.to_kernel(cx), scratch);
  return {order.to_caller(output), order.to_caller(h_n), order.to_caller(c_n), workspace};
}

// layer_backward likewise: run(input, hx, cx, output, grad_output, grad_h_n, grad_c_n,
// allocate_grad_input) -> (grad_input, grad_hx, grad_cx, grad_weights), the workspace taken
// as forward left it (in the kernels' order).
template <typename Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> backward_in_callers_order(
    const LayerShape& s, const at::Tensor& input, const std::optional<at::Tensor>& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& output,
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const BatchOrder::Allocate& scratch,
    const Run& run) {
  if (!s.reorders_batch()) {
    return run(input, hx, cx, output, grad_output, grad_h_n, grad_c_n,
               BatchOrder::Allocate(BatchOrder::empty));
  }
  const BatchOrder order(s, input.device(), scratch);
  const auto [grad_input, grad_hx, grad_cx, grad_weights] = run(
      order.to_kernel(input), order.to_kernel(hx), order.to_kernel(cx), order.to_kernel(output),
      order.to_kernel(grad_output), order.to_kernel(grad_h_n), order.to_kernel(grad_c_n), scratch);
  return {order.to_caller(grad_input), order.to_caller(grad_hx), order.to_caller(grad_cx),
          grad_weights};
}

}  // namespace rnnext
