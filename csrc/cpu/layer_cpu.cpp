// CPU implementations of rnnext::layer_forward and rnnext::layer_backward: argument checks,
// buffer allocation and the packing of operands here; the time loops, with their per-step and
// blocked input-side GEMMs, in layer_driver.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "../common/batch_order.h"
#include "../common/layer_args.h"
#include "buffer_cache.h"
#include "layer_driver.h"

namespace rnnext {
namespace cpu {
namespace {

using at::Tensor;
using std::optional;

// GEMMs whose right-hand operand is a weight run on a packed copy of it (packed_gemm.h), at
// every batch size: in float, batches of 128 to 1024 ran 2-20% faster end to end than with
// MKL. Packing costs about one pass over the weight, so a call packs only with at least
// kPackedMinSteps steps and kPackedMinRows rows (T * B); below that its products go to BLAS,
// with few rows split among the threads (weight_gemm). Measured on 2 threads, one process per
// setting (best of 3 x 5): with 16 rows or fewer BLAS took 0.30-0.77 of the packed time
// (GRU (4, 1, 512) forward 0.30, LSTM (8, 1, 1024) 0.49, forward+backward 0.41-1.05), with
// 20 rows or more the packed path won (BLAS 1.06-1.70 of its time, LSTM (50, 1, 1024)
// forward 0.98).
constexpr int64_t kPackedMinSteps = 4;
constexpr int64_t kPackedMinRows = 17;

bool packs_operands(const LayerShape& s) {
  // bfloat16 weights are packed at every size: there BLAS would first need float copies
  return s.bf16_weights || (s.T >= kPackedMinSteps && s.T * s.B >= kPackedMinRows);
}

// Whether a call's products with the weights (and its weight gradients' products) run in
// bfloat16: asked for (the op's bf16_products), float, and enabled (a CPU that has
// AVX512-BF16, RNNEXT_CPU_BF16_PRODUCTS not "0").
bool uses_bf16(bool bf16_products, at::ScalarType dtype) {
  return bf16_products && dtype == at::kFloat && bf16_products_enabled();
}

// Elements per packed copy of R [K, N] in the input's dtype (float or double).
int64_t packed_size(at::ScalarType dtype, int64_t K, int64_t N) {
  return (dtype == at::kDouble ? packed_ld<double>(N) : packed_ld<float>(N)) * K;
}

// The packed copy of a GEMM's right-hand weight operand (where packs_operands(s); undefined
// otherwise): column tiles, or R^T [N, K] where N is narrow. weight is R [K, N], or
// R^T [N, K] when transposed; contiguous. Copies of 256 KB or more come from the buffer cache:
// measured against fresh memory, LSTM forward at (8, 4, 512) and (4, 8, 1024) took 0.72-0.89
// of the time, forward+backward 0.81-0.97 (separate processes, best of 3 x 5).
//
// With bf16 (bf16_products, float, a CPU with AVX512-BF16 and N not narrow) the copy is
// packed in bfloat16 for packed_gemm_bf16 (packed_gemm.h).
//
// A bfloat16 weight (s.bf16_weights) is packed from its own bits; where N is narrow, a float
// copy of it is used as a float weight.
Tensor pack_operand(const Tensor& weight_arg, int64_t K, int64_t N, bool transposed,
                    const LayerShape& s, bool bf16) {
  if (!weight_arg.defined() || !packs_operands(s)) return Tensor();
  const bool bf16_source = weight_arg.scalar_type() == at::kBFloat16;
  if ((bf16_source || uses_bf16(bf16, weight_arg.scalar_type())) && !is_narrow<float>(N)) {
    Tensor packed =
        empty_cached({packed_bf16_size(K, N)}, weight_arg.options().dtype(at::kBFloat16));
    auto* dst = static_cast<uint16_t*>(packed.mutable_data_ptr());
    const int64_t ld = transposed ? K : N;
    if (bf16_source) {
      pack_right_operand_bf16(static_cast<const uint16_t*>(weight_arg.const_data_ptr()), K, N,
                              transposed, ld, dst);
    } else {
      pack_right_operand_bf16(weight_arg.const_data_ptr<float>(), K, N, transposed, ld, dst);
    }
    return packed;
  }
  const Tensor weight = bf16_source ? weight_arg.to(at::kFloat) : weight_arg;
  Tensor packed;
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "rnnext_pack_operand", [&] {
    if (is_narrow<scalar_t>(N)) {
      packed = transposed ? weight : weight.t().contiguous();
      return;
    }
    packed = empty_cached({packed_ld<scalar_t>(N) * K}, weight.options());
    pack_right_operand(weight.const_data_ptr<scalar_t>(), K, N, transposed, transposed ? K : N,
                       packed.mutable_data_ptr<scalar_t>());
  });
  return packed;
}

// The tensors one direction's loops read (DirectionTensors), and the packed operands of the
// pass's per-step GEMMs.
struct DirectionInputs : DirectionTensors {
  Tensor ih_packed, hh_packed, hr_packed;
  bool backward;

  DirectionInputs(const LayerShape& s, int64_t d, const optional<Tensor>& hx,
                  const optional<Tensor>& cx, const at::TensorOptions& opts, bool backward_pass,
                  bool bf16_products)
      : DirectionTensors(s, d, hx, cx, opts), backward(backward_pass) {
    // forward: x @ w_ih^T, h @ w_hh^T and m @ w_hr^T; backward: dgx @ w_ih, dgh @ w_hh and
    // dh' @ w_hr
    const int64_t GH = s.G * s.H;
    const auto pack = [&](const Tensor& w, int64_t rows, int64_t cols) {
      // w [rows, cols] is R^T forward (R = w^T) and R backward
      return backward ? pack_operand(w, rows, cols, false, s, bf16_products)
                      : pack_operand(w, cols, rows, true, s, bf16_products);
    };
    ih_packed = pack(w_ih, GH, s.I);
    hh_packed = pack(w_hh, GH, s.P);
    hr_packed = pack(w_hr, s.P, s.H);
  }

  template <typename T>
  RightOperand<T> operand(const Tensor& weight, const Tensor& packed) const {
    RightOperand<T> r;
    // (a bfloat16 weight is always packed: no BLAS call reads it)
    r.data = weight.defined() && weight.scalar_type() != at::kBFloat16 ? weight.const_data_ptr<T>()
                                                                       : nullptr;
    r.transposed = !backward;
    if (packed.defined() && packed.scalar_type() == at::kBFloat16) {
      r.packed_bf16 = static_cast<const uint16_t*>(packed.const_data_ptr());
    } else if (packed.defined()) {
      r.packed = packed.const_data_ptr<T>();
    }
    return r;
  }
};

// Steps per block of the input-side GEMMs: blocks of about 2^19 gate values (2 MB in float),
// so that a block's input projection (forward) or gate gradients (backward) are still in
// cache when the steps read them and the block GEMMs run, while each block keeps enough rows
// (at least 256) for the weight-gradient GEMMs to run at full speed. Measured here against
// blocks of 16 MB: 2-4% faster on one thread, 3-7% on two. It also bounds the buffers of long
// sequences. RNNEXT_CPU_BLOCK_STEPS overrides it (tests use it to cover many blocks with
// small sizes).
int64_t block_steps(const LayerShape& s) {
  int64_t steps =
      std::max<int64_t>(256, (int64_t{1} << 19) / (s.G * s.H)) / std::max<int64_t>(s.B, 1);
  if (const char* env = std::getenv("RNNEXT_CPU_BLOCK_STEPS")) steps = std::atoll(env);
  return std::clamp<int64_t>(steps, 1, s.T);
}

template <typename T>
void fill_dims(LayerDims<T>& p, const LayerShape& s, const Tensor& input, int64_t d,
               const DirectionInputs& in) {
  static_cast<LayerSizes&>(p) = direction_sizes(s, d, block_steps(s));
  p.x = input.const_data_ptr<T>();
  p.has_projection = s.has_proj;
  p.ih = in.template operand<T>(in.w_ih, in.ih_packed);
  p.hh = in.template operand<T>(in.w_hh, in.hh_packed);
  p.hr = in.template operand<T>(in.w_hr, in.hr_packed);
  p.h0 = in.h0.const_data_ptr<T>();
  p.c0 = in.c0.defined() ? in.c0.const_data_ptr<T>() : nullptr;
}

// Whether the directions of a bidirectional layer run at once, a thread each (BLAS called
// from inside that parallel region runs single-threaded), or one after the other with every
// thread. At once wins where it keeps every thread busy (on 2 threads, GRU 2-layer
// forward+backward about 20% faster, see docs/internals.md); with more threads than directions
// it would leave all but two idle, so the directions take turns, each on all of them.
// RNNEXT_CPU_PARALLEL_DIRECTIONS=0 or 1 forces one way (the tests run both); any other value
// counts as unset.
bool directions_at_once(int64_t directions) {
  if (directions == 1) return false;
  if (const char* env = std::getenv("RNNEXT_CPU_PARALLEL_DIRECTIONS")) {
    if (std::strcmp(env, "0") == 0) return false;
    if (std::strcmp(env, "1") == 0) return true;
  }
  return at::get_num_threads() <= directions;
}

template <typename F>
void for_each_direction(int64_t directions, const F& run) {
  if (!directions_at_once(directions)) {
    // Called directly: at::parallel_for marks even a range it runs inline as a parallel
    // region, and every parallel_for nested in one (per-step GEMMs, pointwise passes) then
    // runs on a single thread.
    for (int64_t d = 0; d < directions; ++d) run(d);
    return;
  }
  at::parallel_for(0, directions, 1, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) run(d);
  });
}

// The weights as the loops take them. bfloat16 weights beside float32 input (allowed with
// bf16_products) stay bfloat16 where the products run in bfloat16, and become float copies
// where they cannot (no AVX512-BF16, or RNNEXT_CPU_BF16_PRODUCTS=0).
std::vector<Tensor> loop_weights(at::TensorList weights, const Tensor& input, bool bf16_products) {
  std::vector<Tensor> result(weights.begin(), weights.end());
  const bool all_bf16 = std::all_of(result.begin(), result.end(), [](const Tensor& w) {
    return w.scalar_type() == at::kBFloat16;
  });
  // (a mix of dtypes is left to check_layer_args's error, as where the products take bfloat16)
  if (bf16_products && input.scalar_type() == at::kFloat && all_bf16 && !bf16_products_enabled()) {
    for (Tensor& w : result) w = w.to(at::kFloat);
  }
  return result;
}

// layer_forward on a batch in the kernels' order (lengths sorted longest first, as s says),
// its output made by allocate_output.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_in_order(
    const LayerShape& s, const Tensor& input_arg, const optional<Tensor>& hx,
    const optional<Tensor>& cx, bool need_workspace, bool bf16_products,
    const BatchOrder::Allocate& allocate_output) {
  const Tensor input = input_arg.contiguous();
  const auto opts = input.options();
  const bool has_state = s.cell == CellKind::kLstm;

  const bool sums_gates = cells::visit(s.cell, [](auto c) { return decltype(c)::kSumsGates; });
  Tensor output = allocate_output({s.T, s.B, s.D * s.P}, opts);
  Tensor h_n = at::empty({s.D, s.B, s.P}, opts);
  Tensor c_n = has_state ? at::empty({s.D, s.B, s.H}, opts) : at::empty({0}, opts);
  Tensor workspace =
      need_workspace ? empty_cached({s.D, s.T, s.B, s.ws_row}, opts) : at::empty({0}, opts);
  // per-direction scratch, [D, ...], so that the directions can run concurrently
  const Tensor xg = at::empty({s.D, block_steps(s), s.B, s.G * s.H}, opts);
  const Tensor hg = at::empty({s.D, sums_gates ? 0 : s.B, s.G * s.H}, opts);
  const Tensor step_scratch = at::empty({s.D, need_workspace ? 0 : s.B, s.ws_row}, opts);
  std::vector<DirectionInputs> inputs;
  std::vector<Tensor> input_bias;  // ForwardParams::b_ih
  for (int64_t d = 0; d < s.D; ++d) {
    inputs.emplace_back(s, d, hx, cx, opts, /*backward_pass=*/false, bf16_products);
    input_bias.push_back(sums_gates ? inputs[d].b_ih + inputs[d].b_hh : inputs[d].b_ih);
    if (has_state) c_n[d].copy_(inputs[d].c0);
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnnext_layer_forward_cpu", [&] {
    using T = scalar_t;
    for_each_direction(s.D, [&](int64_t d) {
      const DirectionInputs& in = inputs[d];
      auto at_d = [d](const Tensor& t) { return t.mutable_data_ptr<T>() + d * t.stride(0); };
      ForwardParams<T> p;
      fill_dims(p, s, input, d, in);
      p.b_ih = input_bias[d].const_data_ptr<T>();
      p.b_hh = in.b_hh.const_data_ptr<T>();
      p.xg = at_d(xg);
      p.output = output.mutable_data_ptr<T>() + d * s.P;
      p.h_n = at_d(h_n);
      p.c_state = has_state ? at_d(c_n) : nullptr;
      p.workspace = need_workspace ? at_d(workspace) : nullptr;
      p.step_scratch = at_d(step_scratch);
      p.hg = at_d(hg);
      cells::visit(s.cell, [&](auto cell) { forward_direction<decltype(cell), T>(p); });
    });
  });
  return {output, h_n, c_n, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    c10::string_view mode, const Tensor& input, at::TensorList weights_arg,
    const optional<Tensor>& hx, const optional<Tensor>& cx, bool has_biases, bool bidirectional,
    const optional<Tensor>& lengths, bool need_workspace, bool bf16_products) {
  const std::vector<Tensor> weights = loop_weights(weights_arg, input, bf16_products);
  const LayerShape s = check_layer_args("rnnext.layer_forward", mode, input, weights, hx, cx,
                                        has_biases, bidirectional, lengths, bf16_products);
  return forward_in_callers_order(
      s, input, hx, cx, empty_cached,
      [&](const Tensor& x, const optional<Tensor>& h0, const optional<Tensor>& c0,
          const BatchOrder::Allocate& allocate_output) {
        return forward_in_order(s, x, h0, c0, need_workspace, bf16_products, allocate_output);
      });
}

// layer_backward on a batch in the kernels' order, its grad_input made by allocate_grad_input.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> backward_in_order(
    const LayerShape& s, const Tensor& input_arg, at::TensorList weights_arg,
    const optional<Tensor>& hx, const optional<Tensor>& cx, const Tensor& output,
    const Tensor& workspace_arg, const optional<Tensor>& grad_output,
    const optional<Tensor>& grad_h_n, const optional<Tensor>& grad_c_n,
    std::array<bool, 3> output_mask, bool bf16_products,
    const BatchOrder::Allocate& allocate_grad_input) {
  const bool has_biases = s.has_biases;
  const bool has_state = s.cell == CellKind::kLstm;
  const auto [need_input, need_state, need_weights] = output_mask;

  const Tensor input = input_arg.contiguous();
  const Tensor out = output.contiguous();
  const Tensor workspace = workspace_arg.contiguous();
  const auto opts = input.options();
  const int64_t GH = s.G * s.H, steps = block_steps(s);
  const bool separate_dgh =
      cells::visit(s.cell, [](auto c) { return decltype(c)::kSeparateHiddenGrad; });

  // Gradients, per direction ([D, ...]) where the directions, running concurrently, would
  // otherwise write into the same memory; grad_x needs no zeroing (the driver writes it whole).
  // (two directions' are summed into a new tensor, so theirs can come from the cache)
  const Tensor grad_x = !need_input ? Tensor()
                        : s.D == 1  ? allocate_grad_input({s.D, s.T, s.B, s.I}, opts)
                                    : empty_cached({s.D, s.T, s.B, s.I}, opts);
  std::vector<std::vector<Tensor>> grad_w(s.D);
  for (int64_t d = 0; d < s.D && need_weights; ++d) {
    grad_w[d] = zero_weight_gradients(
        s, d, [&](at::IntArrayRef sizes) { return zeros_cached(sizes, opts); });
  }
  const Tensor dgh_first = at::empty({s.D, s.B, GH}, opts);
  const Tensor dh = grad_h_n.has_value() ? grad_h_n->clone(at::MemoryFormat::Contiguous)
                                         : at::zeros({s.D, s.B, s.P}, opts);
  const Tensor dc = !has_state             ? Tensor()
                    : grad_c_n.has_value() ? grad_c_n->clone(at::MemoryFormat::Contiguous)
                                           : at::zeros({s.D, s.B, s.H}, opts);
  // scratch for one block of steps per direction
  const Tensor dgx = at::empty({s.D, steps, s.B, GH}, opts);
  const Tensor dgh = separate_dgh ? at::empty({s.D, steps, s.B, GH}, opts) : dgx;
  const Tensor grad_h = s.has_proj ? at::empty({s.D, steps, s.B, s.P}, opts) : Tensor();
  const Tensor dm = s.has_proj ? at::empty({s.D, s.B, s.H}, opts) : Tensor();
  const Tensor grad_w_hr_block =
      s.has_proj && need_weights ? at::empty({s.D, s.P, s.H}, opts) : Tensor();
  const Tensor go_rows = at::empty({s.D, s.B, s.P}, opts);
  // the weight gradients' operands, gathered where rows have ended (compact layout)
  const bool gathers = need_weights && s.has_ended_rows();
  const Tensor x_rows = gathers ? at::empty({s.D, steps * s.B, s.I}, opts) : Tensor();
  const Tensor h_rows = gathers ? at::empty({s.D, steps * s.B, s.P}, opts) : Tensor();
  const Tensor m_rows = gathers && s.has_proj ? at::empty({s.D, steps * s.B, s.H}, opts) : Tensor();
  // the weight gradients' right operands packed (where the weights are)
  // (in bfloat16 where the products with the weights are, for src's not narrow)
  const bool packs_rows = need_weights && packs_operands(s);
  const auto dtype = input.scalar_type();
  const bool bf16_rows = packs_rows && uses_bf16(bf16_products, dtype);
  const auto packed_rows = [&](int64_t N) {
    if (!packs_rows) return Tensor();
    if (bf16_rows && !is_narrow<float>(N)) {
      return at::empty({s.D, packed_bf16_size(steps * s.B, N)}, opts.dtype(at::kBFloat16));
    }
    return at::empty({s.D, packed_size(dtype, steps * s.B, N)}, opts);
  };
  const Tensor packed_x = packed_rows(s.I);
  const Tensor packed_h = packed_rows(s.P);
  const Tensor packed_m =
      bf16_rows && s.has_proj && !is_narrow<float>(s.H)
          ? at::empty({s.D, packed_bf16_size(steps * s.B, s.H)}, opts.dtype(at::kBFloat16))
          : Tensor();
  std::vector<DirectionInputs> inputs;
  for (int64_t d = 0; d < s.D; ++d) {
    inputs.emplace_back(s, d, hx, cx, opts, /*backward_pass=*/true, bf16_products);
  }

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnnext_layer_backward_cpu", [&] {
    using T = scalar_t;
    for_each_direction(s.D, [&](int64_t d) {
      auto at_d = [d](const Tensor& t) -> T* {
        return t.defined() ? t.mutable_data_ptr<T>() + d * t.stride(0) : nullptr;
      };
      auto grad = [&](size_t k) -> T* {
        return k < grad_w[d].size() ? grad_w[d][k].template mutable_data_ptr<T>() : nullptr;
      };
      BackwardParams<T> p;
      fill_dims(p, s, input, d, inputs[d]);
      p.output = out.const_data_ptr<T>() + d * s.P;
      p.workspace = workspace.const_data_ptr<T>() + d * workspace.stride(0);
      p.grad_output = nullptr;
      if (grad_output.has_value()) {
        // any strides: an expanded gradient (of output.sum(), say) is never materialised
        p.grad_output = grad_output->const_data_ptr<T>() + d * s.P * grad_output->stride(2);
        p.go_stride_t = grad_output->stride(0);
        p.go_stride_b = grad_output->stride(1);
        p.go_stride_j = grad_output->stride(2);
      }
      p.grad_x = at_d(grad_x);
      p.grad_w_ih = grad(0);
      p.grad_w_hh = grad(1);
      p.grad_b_ih = has_biases ? grad(2) : nullptr;
      p.grad_b_hh = has_biases ? grad(3) : nullptr;
      p.grad_w_hr = s.has_proj ? grad(has_biases ? 4 : 2) : nullptr;
      p.dgh_first = at_d(dgh_first);
      p.dh = at_d(dh);
      p.grad_h0 = need_state;
      p.dc = at_d(dc);
      p.dgx = at_d(dgx);
      p.dgh = at_d(dgh);
      p.grad_h = at_d(grad_h);
      p.dm = at_d(dm);
      p.grad_w_hr_block = at_d(grad_w_hr_block);
      p.go_rows = at_d(go_rows);
      p.x_rows = at_d(x_rows);
      p.h_rows = at_d(h_rows);
      p.m_rows = at_d(m_rows);
      // the packed rows in one type or the other
      auto bf16_at_d = [d](const Tensor& t) -> uint16_t* {
        const bool bf16 = t.defined() && t.scalar_type() == at::kBFloat16;
        return bf16 ? static_cast<uint16_t*>(t.mutable_data_ptr()) + d * t.stride(0) : nullptr;
      };
      p.packed_x_bf16 = bf16_at_d(packed_x);
      p.packed_h_bf16 = bf16_at_d(packed_h);
      p.packed_m_bf16 = bf16_at_d(packed_m);
      p.packed_x = p.packed_x_bf16 != nullptr ? nullptr : at_d(packed_x);
      p.packed_h = p.packed_h_bf16 != nullptr ? nullptr : at_d(packed_h);
      cells::visit(s.cell, [&](auto cell) { backward_direction<decltype(cell), T>(p); });
    });
  });

  std::vector<Tensor> grad_weights;
  for (int64_t d = 0; d < s.D && need_weights; ++d) {
    // the h0 term of dW_hh: each row's first step consumed h0
    if (hx.has_value()) grad_w[d][1].addmm_(dgh_first[d].t(), inputs[d].h0);
    // (each in its weight's dtype: bfloat16 weights get their float sums rounded once)
    for (Tensor& g : grad_w[d]) {
      const at::ScalarType dtype = weights_arg[grad_weights.size()].scalar_type();
      grad_weights.push_back(g.scalar_type() == dtype ? g : g.to(dtype));
    }
  }
  // (unwanted gradients are distinct empty tensors: outputs must not alias each other)
  Tensor grad_input = !need_input ? at::empty({0}, opts)
                      : s.D == 1  ? grad_x[0]
                                  : allocate_grad_input({s.T, s.B, s.I}, opts);
  if (need_input && s.D == 2) at::sum_out(grad_input, grad_x, 0);
  const Tensor grad_hx = need_state ? dh : at::empty({0}, opts);
  const Tensor grad_cx = need_state && has_state ? dc : at::empty({0}, opts);
  return {grad_input, grad_hx, grad_cx, grad_weights};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> layer_backward(
    c10::string_view mode, const Tensor& input, at::TensorList weights_arg,
    const optional<Tensor>& hx, const optional<Tensor>& cx, const Tensor& output,
    const Tensor& workspace, const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, bool has_biases, bool bidirectional,
    const optional<Tensor>& lengths, std::array<bool, 3> output_mask, bool bf16_products) {
  const char* op = "rnnext.layer_backward";
  const std::vector<Tensor> weights = loop_weights(weights_arg, input, bf16_products);
  const LayerShape s = check_layer_args(op, mode, input, weights, hx, cx, has_biases, bidirectional,
                                        lengths, bf16_products);
  check_backward_args(op, s, mode, input, output, workspace, grad_output, grad_h_n, grad_c_n);
  return backward_in_callers_order(
      s, input, hx, cx, output, grad_output, grad_h_n, grad_c_n, empty_cached,
      [&](const Tensor& x, const optional<Tensor>& h0, const optional<Tensor>& c0,
          const Tensor& out, const optional<Tensor>& grad_out, const optional<Tensor>& grad_h,
          const optional<Tensor>& grad_c, const BatchOrder::Allocate& allocate_grad_input) {
        return backward_in_order(s, x, weights_arg, h0, c0, out, workspace, grad_out, grad_h,
                                 grad_c, output_mask, bf16_products, allocate_grad_input);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CPU, m) {
  m.impl("layer_forward", &layer_forward);
  m.impl("layer_backward", &layer_backward);
}

}  // namespace cpu
}  // namespace rnnext
