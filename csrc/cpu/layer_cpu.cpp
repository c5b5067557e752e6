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

// hx[d] or cx[d] as a contiguous [B, H] tensor, zeros when the state is not given.
Tensor initial_state(const optional<Tensor>& state, int64_t d, const LayerShape& s,
                     const at::TensorOptions& opts) {
  return state.has_value() ? state->select(0, d).contiguous() : at::zeros({s.B, s.H}, opts);
}

Tensor hidden_bias(const LayerShape& s, int64_t d, const at::TensorOptions& opts) {
  return s.has_biases ? s.dirs[d].b_hh.contiguous() : at::zeros({s.G * s.H}, opts);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    c10::string_view mode, const Tensor& input_arg, at::TensorList weights,
    const optional<Tensor>& hx, const optional<Tensor>& cx, bool has_biases, bool bidirectional,
    const optional<Tensor>& lengths, bool need_workspace) {
  const LayerShape s = check_layer_args("rnnext.layer_forward", mode, input_arg, weights, hx, cx,
                                        has_biases, bidirectional, lengths);
  const Tensor input = input_arg.contiguous();
  const auto opts = input.options();
  const int64_t GH = s.G * s.H;
  const bool has_state = s.cell == CellKind::kLstm;

  Tensor output = at::empty({s.T, s.B, s.D * s.H}, opts);
  Tensor h_n = at::empty({s.D, s.B, s.H}, opts);
  Tensor c_n = has_state ? at::empty({s.D, s.B, s.H}, opts) : at::empty({0}, opts);
  Tensor workspace =
      need_workspace ? at::empty({s.D, s.T, s.B, s.S * s.H}, opts) : at::empty({0}, opts);
  const Tensor x2d = input.view({s.T * s.B, s.I});

  for (int64_t d = 0; d < s.D; ++d) {
    const DirectionWeights& w = s.dirs[d];
    const Tensor xg = has_biases ? at::addmm(w.b_ih, x2d, w.w_ih.t()) : at::mm(x2d, w.w_ih.t());
    const Tensor w_hh = w.w_hh.contiguous();
    const Tensor b_hh = hidden_bias(s, d, opts);
    const Tensor h0 = initial_state(hx, d, s, opts);
    const Tensor c0 = has_state ? initial_state(cx, d, s, opts) : Tensor();
    const Tensor hg = at::empty({s.B, GH}, opts);
    const Tensor c_buf = has_state ? at::empty({2, s.B, s.H}, opts) : Tensor();
    const Tensor saved_scratch = at::empty({need_workspace ? 0 : s.B, s.S * s.H}, opts);

    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnnext_layer_forward_cpu", [&] {
      using T = scalar_t;
      ForwardParams<T> p;
      p.steps = s.T;
      p.batch = s.B;
      p.hidden = s.H;
      p.gates = s.G;
      p.saved_width = s.S;
      p.ldo = s.D * s.H;
      p.reverse = d == 1;
      p.xg = xg.const_data_ptr<T>();
      p.w_hh = w_hh.const_data_ptr<T>();
      p.b_hh = b_hh.const_data_ptr<T>();
      p.h0 = h0.const_data_ptr<T>();
      p.c0 = has_state ? c0.const_data_ptr<T>() : nullptr;
      p.output = output.mutable_data_ptr<T>() + d * s.H;
      p.h_n = h_n[d].mutable_data_ptr<T>();
      p.c_n = has_state ? c_n[d].mutable_data_ptr<T>() : nullptr;
      p.saved = need_workspace ? workspace[d].mutable_data_ptr<T>() : nullptr;
      p.saved_scratch = saved_scratch.mutable_data_ptr<T>();
      p.hg = hg.mutable_data_ptr<T>();
      p.c_buf = has_state ? c_buf.mutable_data_ptr<T>() : nullptr;
      cells::visit(s.cell, [&](auto cell) { forward_direction<decltype(cell), T>(p); });
    });
  }
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
  check_like_input(op, "output", output, input_arg, {s.T, s.B, s.D * s.H});
  check_like_input(op, "workspace", workspace_arg, input_arg, {s.D, s.T, s.B, s.S * s.H});
  if (grad_output_arg.has_value()) {
    check_like_input(op, "grad_output", *grad_output_arg, input_arg, {s.T, s.B, s.D * s.H});
  }
  if (grad_h_n.has_value()) check_like_input(op, "grad_h_n", *grad_h_n, input_arg, {s.D, s.B, s.H});
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

  Tensor grad_input = at::empty({0}, opts);
  Tensor grad_hx = need_state ? at::empty({s.D, s.B, s.H}, opts) : at::empty({0}, opts);
  Tensor grad_cx =
      need_state && has_state ? at::empty({s.D, s.B, s.H}, opts) : at::empty({0}, opts);
  std::vector<Tensor> grad_weights;

  for (int64_t d = 0; d < s.D; ++d) {
    const DirectionWeights& w = s.dirs[d];
    const Tensor w_hh = w.w_hh.contiguous();
    const Tensor h0 = initial_state(hx, d, s, opts);
    const Tensor c0 = has_state ? initial_state(cx, d, s, opts) : Tensor();
    const Tensor dgx = at::empty({s.T, s.B, GH}, opts);
    const bool separate =
        cells::visit(s.cell, [](auto c) { return decltype(c)::kSeparateHiddenGrad; });
    const Tensor dgh = separate ? at::empty({s.T, s.B, GH}, opts) : dgx;
    const Tensor dh = at::empty({2, s.B, s.H}, opts);
    dh[0].copy_(grad_h_n.has_value() ? grad_h_n->select(0, d) : at::zeros({s.B, s.H}, opts));
    const Tensor dc = has_state ? (grad_c_n.has_value()
                                       ? grad_c_n->select(0, d).clone(at::MemoryFormat::Contiguous)
                                       : at::zeros({s.B, s.H}, opts))
                                : Tensor();
    const Tensor dh0 = at::empty({s.B, s.H}, opts);

    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnnext_layer_backward_cpu", [&] {
      using T = scalar_t;
      BackwardParams<T> p;
      p.steps = s.T;
      p.batch = s.B;
      p.hidden = s.H;
      p.gates = s.G;
      p.saved_width = s.S;
      p.ldo = s.D * s.H;
      p.reverse = d == 1;
      p.w_hh = w_hh.const_data_ptr<T>();
      p.h0 = h0.const_data_ptr<T>();
      p.c0 = has_state ? c0.const_data_ptr<T>() : nullptr;
      p.output = out.const_data_ptr<T>() + d * s.H;
      p.saved = workspace[d].const_data_ptr<T>();
      p.grad_output = grad_output.defined() ? grad_output.const_data_ptr<T>() + d * s.H : nullptr;
      p.dgx = dgx.mutable_data_ptr<T>();
      p.dgh = dgh.mutable_data_ptr<T>();
      p.dh = dh.mutable_data_ptr<T>();
      p.dc = has_state ? dc.mutable_data_ptr<T>() : nullptr;
      p.dh0 = dh0.mutable_data_ptr<T>();
      cells::visit(s.cell, [&](auto cell) { backward_direction<decltype(cell), T>(p); });
    });

    const Tensor dgx2d = dgx.view({s.T * s.B, GH});
    const Tensor dgh2d = dgh.view({s.T * s.B, GH});
    if (need_input) {
      grad_input = d == 0 ? at::mm(dgx2d, w.w_ih) : grad_input.addmm_(dgx2d, w.w_ih);
    }
    if (need_state) {
      grad_hx[d].copy_(dh0);
      if (has_state) grad_cx[d].copy_(dc);
    }
    if (need_weights) {
      // Step t's hidden-side gradient pairs with the state it consumed: the output of the
      // previous step in this direction's order, or h0 for the first step.
      const int64_t first_t = d == 0 ? 0 : s.T - 1;
      const Tensor states = out.narrow(2, d * s.H, s.H);
      const Tensor dgh_rest = dgh.narrow(0, d == 0 ? 1 : 0, s.T - 1).reshape({-1, GH});
      const Tensor h_rest = states.narrow(0, d == 0 ? 0 : 1, s.T - 1).reshape({-1, s.H});
      Tensor grad_w_hh = at::mm(dgh_rest.t(), h_rest);
      if (hx.has_value()) grad_w_hh.addmm_(dgh[first_t].t(), h0);
      grad_weights.push_back(at::mm(dgx2d.t(), x2d));
      grad_weights.push_back(grad_w_hh);
      if (has_biases) {
        grad_weights.push_back(dgx2d.sum(0));
        grad_weights.push_back(dgh2d.sum(0));
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
