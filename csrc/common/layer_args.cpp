#include "layer_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <string>

namespace rnnext {

CellKind parse_mode(c10::string_view mode) {
  const std::string m(mode.data(), mode.size());
  if (m == "RNN_TANH") return CellKind::kRnnTanh;
  if (m == "RNN_RELU") return CellKind::kRnnRelu;
  if (m == "GRU") return CellKind::kGru;
  if (m == "LSTM") return CellKind::kLstm;
  TORCH_CHECK_VALUE(false, "rnnext: mode must be one of 'RNN_TANH', 'RNN_RELU', 'GRU', 'LSTM', ",
                    "got '", m, "'");
}

int64_t gate_count(CellKind cell) {
  return cells::visit(cell, [](auto c) -> int64_t { return decltype(c)::kGates; });
}

int64_t saved_width(CellKind cell) {
  return cells::visit(cell, [](auto c) -> int64_t { return decltype(c)::kSaved; });
}

void check_like_input(const char* op, const std::string& name, const at::Tensor& t,
                      const at::Tensor& input, at::IntArrayRef shape,
                      std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(t.dim() == static_cast<int64_t>(shape.size()) && t.sizes() == shape, op, ": ",
                    name, " must have shape ", shape, ", got ", t.sizes());
  if (dtype.has_value() && *dtype != input.scalar_type()) {
    TORCH_CHECK_TYPE(t.scalar_type() == *dtype, op, ": ", name, " must be ", *dtype,
                     " like weights[0] (bfloat16 weights with bf16_products on the CPU), got ",
                     t.scalar_type());
  } else {
    TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name,
                     " must have the input's dtype ", input.scalar_type(), ", got ",
                     t.scalar_type());
  }
  TORCH_CHECK_VALUE(t.device() == input.device(), op, ": ", name, " must be on the input's device ",
                    input.device(), ", got ", t.device());
}

void check_backward_args(const char* op, const LayerShape& s, c10::string_view mode,
                         const at::Tensor& input, const at::Tensor& output,
                         const at::Tensor& workspace, const std::optional<at::Tensor>& grad_output,
                         const std::optional<at::Tensor>& grad_h_n,
                         const std::optional<at::Tensor>& grad_c_n) {
  check_like_input(op, "output", output, input, {s.T, s.B, s.D * s.P});
  check_like_input(op, "workspace", workspace, input, {s.D, s.T, s.B, s.ws_row});
  if (grad_output.has_value()) {
    check_like_input(op, "grad_output", *grad_output, input, {s.T, s.B, s.D * s.P});
  }
  if (grad_h_n.has_value()) check_like_input(op, "grad_h_n", *grad_h_n, input, {s.D, s.B, s.P});
  if (grad_c_n.has_value()) {
    TORCH_CHECK_VALUE(s.cell == CellKind::kLstm, op, ": grad_c_n must be None for mode '",
                      std::string(mode.data(), mode.size()), "', got a tensor of shape ",
                      grad_c_n->sizes());
    check_like_input(op, "grad_c_n", *grad_c_n, input, {s.D, s.B, s.H});
  }
}

LayerSizes direction_sizes(const LayerShape& s, int64_t d, int64_t block_steps) {
  LayerSizes z;
  z.steps = s.T;
  z.batch = s.B;
  z.inputs = s.I;
  z.hidden = s.H;
  z.out = s.P;
  z.gates = s.G;
  z.ws_row = s.ws_row;
  z.ldo = s.D * s.P;
  z.m_offset = s.S * s.H;
  z.block_steps = block_steps;
  z.reverse = d == 1;
  z.batch_sizes = s.batch_sizes.data();
  z.lengths = s.lengths.data();
  z.row_starts = s.row_starts.data();
  return z;
}

std::vector<at::Tensor> zero_weight_gradients(
    const LayerShape& s, int64_t d, const std::function<at::Tensor(at::IntArrayRef)>& zeros) {
  const DirectionWeights& w = s.dirs[d];
  std::vector<at::Tensor> grads = {zeros(w.w_ih.sizes()), zeros(w.w_hh.sizes())};
  if (s.has_biases) {
    grads.push_back(zeros({s.G * s.H}));
    grads.push_back(zeros({s.G * s.H}));
  }
  if (s.has_proj) grads.push_back(zeros(w.w_hr.sizes()));
  return grads;
}

DirectionTensors::DirectionTensors(const LayerShape& s, int64_t d,
                                   const std::optional<at::Tensor>& hx,
                                   const std::optional<at::Tensor>& cx,
                                   const at::TensorOptions& opts) {
  // hx[d] or cx[d] as a contiguous [B, size] tensor, zeros when the state is not given
  auto initial = [&](const std::optional<at::Tensor>& state, int64_t size) {
    return state.has_value() ? state->select(0, d).contiguous() : at::zeros({s.B, size}, opts);
  };
  const DirectionWeights& w = s.dirs[d];
  w_ih = w.w_ih.contiguous();
  w_hh = w.w_hh.contiguous();
  w_hr = s.has_proj ? w.w_hr.contiguous() : at::Tensor();
  // (in the loops' dtype: bfloat16 biases, beside bfloat16 weights on the CPU, become float)
  b_ih = s.has_biases ? w.b_ih.to(opts.dtype()).contiguous() : at::zeros({s.G * s.H}, opts);
  b_hh = s.has_biases ? w.b_hh.to(opts.dtype()).contiguous() : at::zeros({s.G * s.H}, opts);
  h0 = initial(hx, s.P);
  c0 = s.cell == CellKind::kLstm ? initial(cx, s.H) : at::Tensor();
}

LayerShape check_layer_args(const char* op, c10::string_view mode, const at::Tensor& input,
                            at::TensorList weights, const std::optional<at::Tensor>& hx,
                            const std::optional<at::Tensor>& cx, bool has_biases,
                            bool bidirectional, const std::optional<at::Tensor>& lengths,
                            bool bf16_products) {
  LayerShape s;
  s.cell = parse_mode(mode);
  s.G = gate_count(s.cell);
  s.D = bidirectional ? 2 : 1;
  s.has_biases = has_biases;

  TORCH_CHECK_VALUE(input.dim() == 3, op, ": input must be 3-D [T, B, I] (time-major), got ",
                    input.dim(), "-D with shape ", input.sizes());
  const at::ScalarType dtype = input.scalar_type();
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || (half && input.is_cuda()), op,
                   ": input must be float32 or float64",
                   input.is_cuda() ? ", float16 or bfloat16" : " (float16 and bfloat16 on CUDA)",
                   ", got ", dtype, " on ", input.device());
  s.T = input.size(0);
  s.B = input.size(1);
  s.I = input.size(2);
  TORCH_CHECK_VALUE(s.T > 0, op, ": input must have at least one time step, got shape ",
                    input.sizes());

  const int64_t base = has_biases ? 4 : 2;
  const int64_t count = static_cast<int64_t>(weights.size());
  s.has_proj = count == (base + 1) * s.D;
  TORCH_CHECK_VALUE(
      count == base * s.D || (s.has_proj && s.cell == CellKind::kLstm), op, ": weights must hold ",
      base * s.D, " tensors (w_ih, w_hh", has_biases ? ", b_ih, b_hh" : "", " per direction)",
      s.cell == CellKind::kLstm ? ", or one more per direction (w_hr)" : "", ", got ", count);
  const int64_t per_dir = s.has_proj ? base + 1 : base;
  TORCH_CHECK_VALUE(
      weights[0].dim() == 2 && weights[0].size(0) % s.G == 0 && weights[0].size(0) > 0, op,
      ": weights[0] (w_ih) must be 2-D [", s.G, "*H, I] with H > 0, got shape ",
      weights[0].sizes());
  s.H = weights[0].size(0) / s.G;
  const at::Tensor& w_hr = weights[per_dir - 1];
  TORCH_CHECK_VALUE(!s.has_proj || (w_hr.dim() == 2 && w_hr.size(0) > 0), op, ": weights[",
                    per_dir - 1, "] (w_hr) must be 2-D [P, H] with P > 0, got shape ",
                    w_hr.sizes());
  s.P = s.has_proj ? w_hr.size(0) : s.H;
  s.S = saved_width(s.cell);
  s.ws_row = s.S * s.H + (s.has_proj ? s.H : 0);
  const int64_t GH = s.G * s.H;
  // BLAS and cuBLAS take 32-bit dimensions; refuse before any work what would overflow them
  const int64_t int32_limit = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(std::max({s.B, s.I, GH, s.P, s.ws_row}) <= int32_limit, op,
                    ": sizes beyond 32-bit GEMM dimensions are not supported: B = ", s.B,
                    ", I = ", s.I, ", G*H = ", GH, ", P = ", s.P, " (at most ", int32_limit, ")");

  s.bf16_weights = bf16_products && dtype == at::kFloat && input.is_cpu() &&
                   weights[0].scalar_type() == at::kBFloat16;
  const std::optional<at::ScalarType> weight_dtype =
      s.bf16_weights ? std::optional<at::ScalarType>(at::kBFloat16) : std::nullopt;
  for (int64_t d = 0; d < s.D; ++d) {
    const at::Tensor* w = weights.data() + d * per_dir;
    auto name = [&](int64_t k, const char* role) {
      return "weights[" + std::to_string(d * per_dir + k) + "] (" + role +
             (d ? " of the reverse direction)" : ")");
    };
    DirectionWeights dw;
    check_like_input(op, name(0, "w_ih"), w[0], input, {GH, s.I}, weight_dtype);
    check_like_input(op, name(1, "w_hh"), w[1], input, {GH, s.P}, weight_dtype);
    dw.w_ih = w[0];
    dw.w_hh = w[1];
    if (has_biases) {
      check_like_input(op, name(2, "b_ih"), w[2], input, {GH}, weight_dtype);
      check_like_input(op, name(3, "b_hh"), w[3], input, {GH}, weight_dtype);
      dw.b_ih = w[2];
      dw.b_hh = w[3];
    }
    if (s.has_proj) {
      check_like_input(op, name(base, "w_hr"), w[base], input, {s.P, s.H}, weight_dtype);
      dw.w_hr = w[base];
    }
    s.dirs.push_back(dw);
  }

  if (hx.has_value()) check_like_input(op, "hx", *hx, input, {s.D, s.B, s.P});
  if (s.cell == CellKind::kLstm) {
    if (cx.has_value()) check_like_input(op, "cx", *cx, input, {s.D, s.B, s.H});
  } else {
    TORCH_CHECK_VALUE(!cx.has_value(), op, ": cx must be None for mode '",
                      std::string(mode.data(), mode.size()), "', got a tensor of shape ",
                      cx->sizes());
  }

  s.lengths.assign(s.B, s.T);
  s.batch_sizes.assign(s.T, s.B);
  if (lengths.has_value()) {
    const at::Tensor& l = *lengths;
    TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == s.B, op,
                      ": lengths must be 1-D of size B = ", s.B, ", got shape ", l.sizes());
    TORCH_CHECK_TYPE(l.scalar_type() == at::kLong || l.scalar_type() == at::kInt, op,
                     ": lengths must be int64 or int32, got ", l.scalar_type());
    TORCH_CHECK_VALUE(l.device().is_cpu() || l.device() == input.device(), op,
                      ": lengths must be on the CPU or on the input's device ", input.device(),
                      ", got ", l.device());
    const at::Tensor values = l.to(at::kCPU, at::kLong).contiguous();
    const int64_t* v = values.const_data_ptr<int64_t>();
    bool sorted = true;
    for (int64_t b = 0; b < s.B; ++b) {
      TORCH_CHECK_VALUE(v[b] >= 0 && v[b] <= s.T, op, ": lengths must lie in [0, T = ", s.T,
                        "], got lengths[", b, "] = ", v[b]);
      sorted = sorted && (b == 0 || v[b] <= v[b - 1]);
    }
    if (!sorted) {
      // Stable: equal lengths keep their order. vmap relies on it, folding n samples' rows
      // as b * n + k with each length repeated n times, so that the kernels' order of the
      // folded batch keeps each sample's rows in the single sample's order (_vmap.py).
      s.batch_order.resize(s.B);
      std::iota(s.batch_order.begin(), s.batch_order.end(), int64_t{0});
      std::stable_sort(s.batch_order.begin(), s.batch_order.end(),
                       [v](int64_t a, int64_t b) { return v[a] > v[b]; });
    }
    for (int64_t b = 0; b < s.B; ++b) s.lengths[b] = v[sorted ? b : s.batch_order[b]];
    for (int64_t t = 0; t < s.T; ++t) {
      s.batch_sizes[t] = std::count_if(v, v + s.B, [t](int64_t len) { return len > t; });
    }
  }
  s.row_starts.assign(s.T + 1, 0);
  for (int64_t t = 0; t < s.T; ++t) s.row_starts[t + 1] = s.row_starts[t] + s.batch_sizes[t];
  return s;
}

}  // namespace rnnext
