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

}  // namespace rnnext
