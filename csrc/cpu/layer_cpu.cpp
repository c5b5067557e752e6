// CPU implementations of rnnext::layer_forward and rnnext::layer_backward: argument checks,
// buffer allocation and the large input/weight GEMMs here; the time loops in layer_driver.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "../common/layer_args.h"
#include "layer_driver.h"

namespace rnnext {
namespace cpu {
namespace {

using at::Tensor;
using std::optional;

// hx[d] or cx[d] as a contiguous [B, size] tensor, zeros when the state is not given.
Tensor initial_state(const optional<Tensor>& state, int64_t d, int64_t batch, int64_t size,
                     const at::TensorOptions& opts) {
  return state.has_value() ? state->select(0, d).contiguous() : at::zeros({batch, size}, opts);
}

// The tensors one direction's loops read, made contiguous, with zeros for absent ones.
struct DirectionInputs {
  Tensor w_hh, w_hr, b_hh, h0, c0;

  DirectionInputs(const LayerShape& s, int64_t d, const optional<Tensor>& hx,
                  const optional<Tensor>& cx, const at::TensorOptions& opts) {
    const DirectionWeights& w = s.dirs[d];
    w_hh = w.w_hh.contiguous();
    w_hr = s.has_proj ? w.w_hr.contiguous() : Tensor();
    b_hh = s.has_biases ? w.b_hh.contiguous() : at::zeros({s.G * s.H}, opts);
    h0 = initial_state(hx, d, s.B, s.P, opts);
    c0 = s.cell == CellKind::kLstm ? initial_state(cx, d, s.B, s.H, opts) : Tensor();
  }
};

template <typename T>
void fill_dims(LayerDims<T>& p, const LayerShape& s, int64_t d, const DirectionInputs& in) {
  p.steps = s.T;
  p.batch = s.B;
  p.hidden = s.H;
  p.out = s.P;
  p.gates = s.G;
  p.ws_row = s.ws_row;
  p.ldo = s.D * s.P;
  p.m_offset = s.S * s.H;
  p.reverse = d == 1;
  p.batch_sizes = s.batch_sizes.data();
  p.lengths = s.lengths.data();
  p.w_hh = in.w_hh.const_data_ptr<T>();
  p.w_hr = s.has_proj ? in.w_hr.const_data_ptr<T>() : nullptr;
  p.h0 = in.h0.const_data_ptr<T>();
  p.c0 = in.c0.defined() ? in.c0.const_data_ptr<T>() : nullptr;
}

// The directions of a bidirectional layer run concurrently, a thread each (BLAS called from
// inside the parallel region runs single-threaded); one direction keeps all threads for BLAS.
template <typename F>
void for_each_direction(int64_t directions, const F& run) {
  at::parallel_for(0, directions, 1, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) run(d);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    c10::string_view mode, const Tensor& input_arg, at::TensorList weights,
    const optional<Tensor>& hx, const optional<Tensor>& cx, bool has_biases, bool bidirectional,
    const optional<Tensor>& lengths, bool need_workspace) {
  const LayerShape s = check_layer_args("rnnext.layer_forward", mode, input_arg, weights, hx, cx,
                                        has_biases, bidirectional, lengths);
  const Tensor input = input_arg.contiguous();
  const auto opts = input.options();
  const bool has_state = s.cell == CellKind::kLstm;

  Tensor output = at::empty({s.T, s.B, s.D * s.P}, opts);
  Tensor h_n = at::empty({s.D, s.B, s.P}, opts);
  Tensor c_n = at::empty({has_state ? s.D : 0, s.B, s.H}, opts);
  Tensor workspace =
      need_workspace ? at::empty({s.D, s.T, s.B, s.ws_row}, opts) : at::empty({0}, opts);
  if (!has_state) c_n = at::empty({0}, opts);
  const Tensor x2d = input.view({s.T * s.B, s.I});
  const Tensor hg = at::empty({s.D, s.B, s.G * s.H}, opts);
  const Tensor step_scratch = at::empty({s.D, need_workspace ? 0 : s.B, s.ws_row}, opts);

  std::vector<DirectionInputs> inputs;
  std::vector<Tensor> xgs;
  for (int64_t d = 0; d < s.D; ++d) {
    const DirectionWeights& w = s.dirs[d];
    inputs.emplace_back(s, d, hx, cx, opts);
    xgs.push_back(has_biases ? at::addmm(w.b_ih, x2d, w.w_ih.t()) : at::mm(x2d, w.w_ih.t()));
    if (has_state) c_n[d].copy_(inputs[d].c0);
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnnext_layer_forward_cpu", [&] {
    using T = scalar_t;
    for_each_direction(s.D, [&](int64_t d) {
      const DirectionInputs& in = inputs[d];
      ForwardParams<T> p;
      fill_dims(p, s, d, in);
      p.xg = xgs[d].const_data_ptr<T>();
      p.b_hh = in.b_hh.const_data_ptr<T>();
      p.output = output.mutable_data_ptr<T>() + d * s.P;
      p.h_n = h_n.mutable_data_ptr<T>() + d * s.B * s.P;
      p.c_state = has_state ? c_n.mutable_data_ptr<T>() + d * s.B * s.H : nullptr;
      p.workspace =
          need_workspace ? workspace.mutable_data_ptr<T>() + d * workspace.stride(0) : nullptr;
      p.step_scratch = step_scratch.mutable_data_ptr<T>() + d * step_scratch.stride(0);
      p.hg = hg.mutable_data_ptr<T>() + d * hg.stride(0);
      cells::visit(s.cell, [&](auto cell) { forward_direction<decltype(cell), T>(p); });
    });
  });
  return {output, h_n, c_n, workspace};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> layer_backward(
    c10::string_view mode, const Tensor& input_arg, at::TensorList weights,
    const optional<Tensor>& hx, const optional<Tensor>& cx, const Tensor& output,
    const Tensor& workspace_arg, const optional<Tensor>& grad_output_arg,
    const optional<Tensor>& grad_h_n, const optional<Tensor>& grad_c_n, bool has_biases,
    bool bidirectional, const optional<Tensor>& lengths, std::array<bool, 3> output_mask) {
  const char* op = "rnnext.layer_backward";
  const LayerShape s =
      check_layer_args(op, mode, input_arg, weights, hx, cx, has_biases, bidirectional, lengths);
  const bool has_state = s.cell == CellKind::kLstm;
  check_like_input(op, "output", output, input_arg, {s.T, s.B, s.D * s.P});
  check_like_input(op, "workspace", workspace_arg, input_arg, {s.D, s.T, s.B, s.ws_row});
  if (grad_output_arg.has_value()) {
    check_like_input(op, "grad_output", *grad_output_arg, input_arg, {s.T, s.B, s.D * s.P});
  }
  if (grad_h_n.has_value()) {
    check_like_input(op, "grad_h_n", *grad_h_n, input_arg, {s.D, s.B, s.P});
  }
  if (grad_c_n.has_value()) {
    TORCH_CHECK_VALUE(has_state, op, ": grad_c_n must be None for mode '",
                      std::string(mode.data(), mode.size()), "'");
    check_like_input(op, "grad_c_n", *grad_c_n, input_arg, {s.D, s.B, s.H});
  }
  const auto [need_input, need_state, need_weights] = output_mask;

  const Tensor input = input_arg.contiguous();
  const Tensor out = output.contiguous();
  const Tensor workspace = workspace_arg.contiguous();
  const Tensor grad_output = grad_output_arg.has_value() ? grad_output_arg->contiguous() : Tensor();
  const auto opts = input.options();
  const int64_t GH = s.G * s.H;
  const Tensor x2d = input.view({s.T * s.B, s.I});
  const bool separate_dgh =
      cells::visit(s.cell, [](auto c) { return decltype(c)::kSeparateHiddenGrad; });

  Tensor grad_input = at::empty({0}, opts);
  Tensor grad_hx = at::empty({need_state ? s.D : 0, s.B, s.P}, opts);
  Tensor grad_cx = at::empty({need_state && has_state ? s.D : 0, s.B, s.H}, opts);
  if (!need_state) grad_hx = at::empty({0}, opts);
  if (!(need_state && has_state)) grad_cx = at::empty({0}, opts);
  std::vector<Tensor> grad_weights;
  // per-direction buffers, [D, ...], so that the directions can run concurrently
  const Tensor dgx_all = at::empty({s.D, s.T, s.B, GH}, opts);
  const Tensor dgh_all = separate_dgh ? at::empty({s.D, s.T, s.B, GH}, opts) : dgx_all;
  const Tensor dgh_first = at::empty({s.D, s.B, GH}, opts);
  const Tensor grad_h = s.has_proj ? at::empty({s.D, s.T, s.B, s.P}, opts) : Tensor();
  const Tensor dm = s.has_proj ? at::empty({s.D, s.B, s.H}, opts) : Tensor();
  const Tensor dh = grad_h_n.has_value() ? grad_h_n->clone(at::MemoryFormat::Contiguous)
                                         : at::zeros({s.D, s.B, s.P}, opts);
  const Tensor dc = !has_state             ? Tensor()
                    : grad_c_n.has_value() ? grad_c_n->clone(at::MemoryFormat::Contiguous)
                                           : at::zeros({s.D, s.B, s.H}, opts);
  std::vector<DirectionInputs> inputs;
  for (int64_t d = 0; d < s.D; ++d) inputs.emplace_back(s, d, hx, cx, opts);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnnext_layer_backward_cpu", [&] {
    using T = scalar_t;
    for_each_direction(s.D, [&](int64_t d) {
      BackwardParams<T> p;
      fill_dims(p, s, d, inputs[d]);
      auto at_d = [d](const Tensor& t) -> T* {
        return t.defined() ? t.mutable_data_ptr<T>() + d * t.stride(0) : nullptr;
      };
      p.output = out.const_data_ptr<T>() + d * s.P;
      p.workspace = workspace.const_data_ptr<T>() + d * workspace.stride(0);
      p.grad_output = grad_output.defined() ? grad_output.const_data_ptr<T>() + d * s.P : nullptr;
      p.dgx = at_d(dgx_all);
      p.dgh = at_d(dgh_all);
      p.dgh_first = at_d(dgh_first);
      p.grad_h = at_d(grad_h);
      p.dm = at_d(dm);
      p.dh = at_d(dh);
      p.dc = at_d(dc);
      cells::visit(s.cell, [&](auto cell) { backward_direction<decltype(cell), T>(p); });
    });
  });

  for (int64_t d = 0; d < s.D; ++d) {
    const DirectionWeights& w = s.dirs[d];
    const Tensor dgx = dgx_all[d];
    const Tensor dgh = dgh_all[d];
    const Tensor dgx2d = dgx.view({s.T * s.B, GH});
    const Tensor dgh2d = dgh.view({s.T * s.B, GH});
    if (need_input) {
      grad_input = d == 0 ? at::mm(dgx2d, w.w_ih) : grad_input.addmm_(dgx2d, w.w_ih);
    }
    if (need_state) {
      grad_hx[d].copy_(dh[d]);
      if (has_state) grad_cx[d].copy_(dc[d]);
    }
    if (need_weights) {
      // Step t's hidden-side gradient pairs with the state it consumed: the previous step's
      // output in this direction's order (zero past a row's end), or h0 at the row's first step.
      const Tensor states = out.narrow(2, d * s.P, s.P);
      const Tensor dgh_rest = dgh.narrow(0, d == 0 ? 1 : 0, s.T - 1).reshape({-1, GH});
      const Tensor h_rest = states.narrow(0, d == 0 ? 0 : 1, s.T - 1).reshape({-1, s.P});
      Tensor grad_w_hh = at::mm(dgh_rest.t(), h_rest);
      if (hx.has_value()) grad_w_hh.addmm_(dgh_first[d].t(), inputs[d].h0);
      grad_weights.push_back(at::mm(dgx2d.t(), x2d));
      grad_weights.push_back(grad_w_hh);
      if (has_biases) {
        grad_weights.push_back(dgx2d.sum(0));
        grad_weights.push_back(dgh2d.sum(0));
      }
      if (s.has_proj) {
        // dW_hr = sum over steps of dh'^T m, m being the last H of each workspace row
        const Tensor m = workspace[d].narrow(2, s.S * s.H, s.H).reshape({-1, s.H});
        grad_weights.push_back(at::mm(grad_h[d].view({-1, s.P}).t(), m));
      }
    }
  }
  if (need_input) grad_input = grad_input.view({s.T, s.B, s.I});
  return {grad_input, grad_hx, grad_cx, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("layer_forward", &layer_forward);
  m.impl("layer_backward", &layer_backward);
}

}  // namespace cpu
}  // namespace rnnext
