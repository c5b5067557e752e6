// CUDA implementations of rnnext::layer_forward and rnnext::layer_backward: argument checks,
// the device guard, buffers and the current stream and cuBLAS handle here; the time loops and
// kernels in layer_driver.cu, which sees no torch header. The directions of a bidirectional
// layer have scratch buffers of their own and run on two streams at once; a call that repeats
// one before (same buffers, sizes and lengths) replays their launches as a CUDA graph
// (graph_replay.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <tuple>
#include <vector>

#include "../common/batch_order.h"
#include "../common/layer_args.h"
#include "graph_replay.h"
#include "layer_driver.h"
#include "lt_gemm.h"

namespace rnnext {
namespace cuda {
namespace {

using at::Tensor;
using std::optional;

// The CUDA type of a torch scalar type (same layout, so pointers convert).
template <typename scalar_t>
struct Native {
  using type = scalar_t;
};
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T>
T* data(const Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// Steps per block of the input-side GEMMs: blocks of about 2^25 gate values over all
// directions keep scratch bounded for long sequences while every block's GEMMs stay large.
// RNNEXT_CUDA_BLOCK_STEPS overrides it (tests use it to cover many blocks with small sizes).
int64_t block_steps(const LayerShape& s) {
  int64_t steps = ((int64_t{1} << 25) / (s.D * s.G * s.H)) / std::max<int64_t>(s.B, 1);
  if (const char* env = std::getenv("RNNEXT_CUDA_BLOCK_STEPS")) steps = std::atoll(env);
  return std::clamp<int64_t>(steps, 1, s.T);
}

at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// cuBLASLt's scratch for the forward's float products of at most kLtMaxRows rows
// (lt_gemm.h), per direction: more than its heuristic asks for at those sizes. Allocated only
// where some step has so few active rows (the last step has the fewest) and RNNEXT_CUDA_LT is
// not 0 (read at each call); without it every product goes to cuBLAS.
constexpr int64_t kLtWorkspaceBytes = int64_t{4} << 20;

Tensor lt_workspace(const LayerShape& s, const Tensor& input) {
  const char* env = std::getenv("RNNEXT_CUDA_LT");
  const bool wanted = env == nullptr || std::string_view(env) != "0";
  if (!wanted || input.scalar_type() != at::kFloat || s.T == 0 ||
      s.batch_sizes[s.T - 1] > kLtMaxRows) {
    return Tensor();
  }
  return at::empty({s.D, kLtWorkspaceBytes}, input.options().dtype(at::kByte));
}

template <typename T>
void fill_dims(LayerDims<T>& p, const LayerShape& s, const Tensor& input, int64_t d,
               const DirectionTensors& in) {
  static_cast<LayerSizes&>(p) = direction_sizes(s, d, block_steps(s));
  p.x = data<T>(input);
  p.w_ih = data<T>(in.w_ih);
  p.w_hh = data<T>(in.w_hh);
  p.w_hr = data<T>(in.w_hr);
  p.b_ih = data<T>(in.b_ih);
  p.b_hh = data<T>(in.b_hh);
  p.h0 = data<T>(in.h0);
  p.c0 = data<T>(in.c0);
}

// cuBLAS and the kernels index with 32-bit sizes in places; refuse what would overflow them.
// The input with zeros past each row's end. The weight gradients' GEMMs run over every row of
// a block (with zero gate gradients past the end), and 0 times a NaN or an infinity in the
// caller's padding would otherwise reach them.
Tensor zero_padding(const Tensor& input, const LayerShape& s) {
  if (!s.has_ended_rows()) return input;
  const Tensor lengths = at::tensor(s.lengths, at::kLong);
  const Tensor past_end = at::arange(s.T, at::kLong).unsqueeze(1) >= lengths.unsqueeze(0);
  return input.masked_fill(past_end.unsqueeze(2).to(input.device()), 0);
}

// The key of a call's time loops for enqueue_replayable: the pass, the cell, the dtype and
// every direction's params (pointers, sizes and step order).
template <typename Params>
std::vector<int64_t> call_key(int64_t pass, const LayerShape& s, const Tensor& input,
                              const std::vector<Params>& params) {
  std::vector<int64_t> key{pass, static_cast<int64_t>(s.cell),
                           static_cast<int64_t>(input.scalar_type())};
  for (const Params& p : params) append_params(key, p);
  return key;
}

void check_sizes(const char* op, const LayerShape& s) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  const int64_t widest = std::max({s.G * s.H, s.I, s.P, s.ws_row});
  TORCH_CHECK_VALUE(block_steps(s) * s.B * widest <= limit && s.B * s.D * s.P <= limit, op,
                    ": sizes too large for the CUDA kernels' 32-bit GEMM dimensions (B = ", s.B,
                    ", I = ", s.I, ", H = ", s.H, ", P = ", s.P, ")");
}

// layer_forward on a batch in the kernels' order (lengths sorted longest first, as s says).
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_in_order(const LayerShape& s,
                                                            const Tensor& input_arg,
                                                            const optional<Tensor>& hx,
                                                            const optional<Tensor>& cx,
                                                            bool need_workspace) {
  const Tensor input = input_arg.contiguous();
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(acc_type(input.scalar_type()));
  const bool has_state = s.cell == CellKind::kLstm;

  Tensor output = at::empty({s.T, s.B, s.D * s.P}, opts);
  Tensor h_n = at::empty({s.D, s.B, s.P}, opts);
  Tensor c_n = has_state ? at::empty({s.D, s.B, s.H}, opts) : at::empty({0}, opts);
  Tensor workspace =
      need_workspace ? at::empty({s.D, s.T, s.B, s.ws_row}, opts) : at::empty({0}, opts);
  if (s.B == 0) return {output, h_n, c_n, workspace};
  // scratch, one per direction
  const Tensor xg = at::empty({s.D, block_steps(s), s.B, s.G * s.H}, acc_opts);
  const Tensor hg = at::empty({s.D, s.B, s.G * s.H}, acc_opts);
  const Tensor c_state = has_state ? at::empty({s.D, s.B, s.H}, acc_opts) : Tensor();
  const Tensor step_scratch = at::empty({s.D, need_workspace ? 0 : s.B, s.ws_row}, opts);
  const Tensor lt_ws = lt_workspace(s, input);
  std::vector<DirectionTensors> inputs;
  for (int64_t d = 0; d < s.D; ++d) inputs.emplace_back(s, d, hx, cx, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "rnnext_layer_forward_cuda", [&] {
        using T = typename Native<scalar_t>::type;
        std::vector<ForwardParams<T>> params(s.D);  // value-initialised: keys compare bytes
        for (int64_t d = 0; d < s.D; ++d) {
          ForwardParams<T>& p = params[d];
          fill_dims(p, s, input, d, inputs[d]);
          p.xg = data<acc_t<T>>(xg) + d * xg.stride(0);
          p.hg = data<acc_t<T>>(hg) + d * hg.stride(0);
          p.c_state = has_state ? data<acc_t<T>>(c_state) + d * s.B * s.H : nullptr;
          p.output = data<T>(output) + d * s.P;
          p.h_n = data<T>(h_n) + d * s.B * s.P;
          p.workspace = need_workspace ? data<T>(workspace) + d * workspace.stride(0) : nullptr;
          p.step_scratch = data<T>(step_scratch) + d * step_scratch.stride(0);
          if (lt_ws.defined()) {
            p.lt_workspace = data<uint8_t>(lt_ws) + d * kLtWorkspaceBytes;
            p.lt_workspace_bytes = kLtWorkspaceBytes;
          }
          if (has_state) c_state[d].copy_(inputs[d].c0);
        }
        std::vector<Lane> lanes;
        for (const auto& p : params) {
          lanes.emplace_back([&](cudaStream_t stream, cublasHandle_t blas) {
            forward_direction<T>(s.cell, p, blas, stream);
          });
        }
        enqueue_replayable([&] { return call_key(0, s, input, params); }, s.D * s.T, lanes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  if (has_state) c_n.copy_(c_state);
  return {output, h_n, c_n, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_forward(
    c10::string_view mode, const Tensor& input, at::TensorList weights, const optional<Tensor>& hx,
    const optional<Tensor>& cx, bool has_biases, bool bidirectional,
    const optional<Tensor>& lengths, bool need_workspace, bool /*bf16_products: CPU only*/) {
  const char* op = "rnnext.layer_forward";
  const LayerShape s =
      check_layer_args(op, mode, input, weights, hx, cx, has_biases, bidirectional, lengths);
  check_sizes(op, s);
  const c10::cuda::CUDAGuard guard(input.device());
  // (the CUDA caching allocator already reuses memory: scratch and results are at::empty)
  return forward_in_callers_order(
      s, input, hx, cx, BatchOrder::empty,
      [&](const Tensor& x, const optional<Tensor>& h0, const optional<Tensor>& c0,
          const BatchOrder::Allocate&) { return forward_in_order(s, x, h0, c0, need_workspace); });
}

// layer_backward on a batch in the kernels' order.
std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> backward_in_order(
    const LayerShape& s, const Tensor& input_arg, const optional<Tensor>& hx,
    const optional<Tensor>& cx, const Tensor& output, const Tensor& workspace_arg,
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, std::array<bool, 3> output_mask) {
  const bool has_biases = s.has_biases;
  const auto [need_input, need_state, need_weights] = output_mask;
  const bool has_state = s.cell == CellKind::kLstm;
  const Tensor input =
      need_weights ? zero_padding(input_arg.contiguous(), s) : input_arg.contiguous();
  const Tensor out = output.contiguous();
  const Tensor workspace = workspace_arg.contiguous();
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(acc_type(input.scalar_type()));
  const int64_t GH = s.G * s.H, steps = block_steps(s);
  const bool separate_dgh =
      cells::visit(s.cell, [](auto c) { return decltype(c)::kSeparateHiddenGrad; });

  // Gradients accumulate in acc_opts (float for the half types) and convert at the end. Each
  // direction sums its part of grad_x in its own buffer (they run at once).
  const Tensor grad_x = need_input ? at::zeros({s.D, s.T, s.B, s.I}, acc_opts) : Tensor();
  std::vector<std::vector<Tensor>> grad_w(s.D);
  for (int64_t d = 0; d < s.D && need_weights; ++d)
    grad_w[d] = zero_weight_gradients(
        s, d, [&](at::IntArrayRef sizes) { return at::zeros(sizes, acc_opts); });
  const Tensor dgh_first = at::empty({s.D, s.B, GH}, acc_opts);
  // dh and dc: running gradients, in: w.r.t. h_n and c_n, out: w.r.t. hx and cx
  auto running = [&](const optional<Tensor>& given, int64_t size) {
    return given.has_value()
               ? given->to(acc_opts, false, /*copy=*/true, at::MemoryFormat::Contiguous)
               : at::zeros({s.D, s.B, size}, acc_opts);
  };
  const Tensor dh = running(grad_h_n, s.P);
  const Tensor dc = has_state ? running(grad_c_n, s.H) : Tensor();
  // scratch for one block of steps, one per direction
  const Tensor dgx = at::empty({s.D, steps, s.B, GH}, opts);
  const Tensor dgh = separate_dgh ? at::empty({s.D, steps, s.B, GH}, opts) : dgx;
  const Tensor grad_h = s.has_proj ? at::empty({s.D, steps, s.B, s.P}, opts) : Tensor();
  const Tensor dm = s.has_proj ? at::empty({s.D, s.B, s.H}, acc_opts) : Tensor();
  const Tensor ones = at::ones({steps * s.B}, opts);
  std::vector<DirectionTensors> inputs;
  for (int64_t d = 0; d < s.D; ++d) inputs.emplace_back(s, d, hx, cx, opts);

  if (s.B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "rnnext_layer_backward_cuda", [&] {
          using T = typename Native<scalar_t>::type;
          using A = acc_t<T>;
          std::vector<BackwardParams<T>> params(s.D);  // value-initialised: keys compare bytes
          for (int64_t d = 0; d < s.D; ++d) {
            auto grad = [&](size_t k) -> A* {
              return k < grad_w[d].size() ? data<A>(grad_w[d][k]) : nullptr;
            };
            BackwardParams<T>& p = params[d];
            fill_dims(p, s, input, d, inputs[d]);
            p.output = data<T>(out) + d * s.P;
            p.workspace = data<T>(workspace) + d * workspace.stride(0);
            p.grad_output = nullptr;
            if (grad_output.has_value()) {
              // any strides: an expanded gradient (of output.sum(), say) is never materialised
              p.grad_output = data<T>(*grad_output) + d * s.P * grad_output->stride(2);
              p.go_stride_t = grad_output->stride(0);
              p.go_stride_b = grad_output->stride(1);
              p.go_stride_j = grad_output->stride(2);
            }
            p.ones = data<T>(ones);
            p.grad_x = need_input ? data<A>(grad_x) + d * grad_x.stride(0) : nullptr;
            p.grad_w_ih = grad(0);
            p.grad_w_hh = grad(1);
            p.grad_b_ih = has_biases ? grad(2) : nullptr;
            p.grad_b_hh = has_biases ? grad(3) : nullptr;
            p.grad_w_hr = s.has_proj ? grad(has_biases ? 4 : 2) : nullptr;
            p.dgh_first = data<A>(dgh_first) + d * s.B * GH;
            p.dh = data<A>(dh) + d * s.B * s.P;
            p.dc = has_state ? data<A>(dc) + d * s.B * s.H : nullptr;
            p.grad_h0 = need_state ? 1 : 0;
            p.dm = s.has_proj ? data<A>(dm) + d * dm.stride(0) : nullptr;
            p.dgx = data<T>(dgx) + d * dgx.stride(0);
            p.dgh = data<T>(dgh) + d * dgh.stride(0);
            p.grad_h = s.has_proj ? data<T>(grad_h) + d * grad_h.stride(0) : nullptr;
          }
          std::vector<Lane> lanes;
          for (const auto& p : params) {
            lanes.emplace_back([&](cudaStream_t stream, cublasHandle_t blas) {
              backward_direction<T>(s.cell, p, blas, stream);
            });
          }
          enqueue_replayable([&] { return call_key(1, s, input, params); }, s.D * s.T, lanes);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }

  const auto dtype = input.scalar_type();
  std::vector<Tensor> grad_weights;
  for (int64_t d = 0; d < s.D && need_weights; ++d) {
    // the h0 term of dW_hh: each row's first step consumed h0
    if (hx.has_value()) grad_w[d][1].addmm_(dgh_first[d].t(), inputs[d].h0.to(acc_opts));
    for (Tensor& g : grad_w[d]) grad_weights.push_back(g.to(dtype));
  }
  // (unwanted gradients are distinct empty tensors: outputs must not alias each other)
  const Tensor grad_input =
      need_input ? (s.D == 2 ? grad_x[0] + grad_x[1] : grad_x[0]).to(dtype) : at::empty({0}, opts);
  const Tensor grad_hx = need_state ? dh.to(dtype) : at::empty({0}, opts);
  const Tensor grad_cx = need_state && has_state ? dc.to(dtype) : at::empty({0}, opts);
  return {grad_input, grad_hx, grad_cx, grad_weights};
}

std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>> layer_backward(
    c10::string_view mode, const Tensor& input, at::TensorList weights, const optional<Tensor>& hx,
    const optional<Tensor>& cx, const Tensor& output, const Tensor& workspace,
    const optional<Tensor>& grad_output, const optional<Tensor>& grad_h_n,
    const optional<Tensor>& grad_c_n, bool has_biases, bool bidirectional,
    const optional<Tensor>& lengths, std::array<bool, 3> output_mask,
    bool /*bf16_products: CPU only*/) {
  const char* op = "rnnext.layer_backward";
  const LayerShape s =
      check_layer_args(op, mode, input, weights, hx, cx, has_biases, bidirectional, lengths);
  check_backward_args(op, s, mode, input, output, workspace, grad_output, grad_h_n, grad_c_n);
  check_sizes(op, s);
  const c10::cuda::CUDAGuard guard(input.device());
  return backward_in_callers_order(
      s, input, hx, cx, output, grad_output, grad_h_n, grad_c_n, BatchOrder::empty,
      [&](const Tensor& x, const optional<Tensor>& h0, const optional<Tensor>& c0,
          const Tensor& out, const optional<Tensor>& grad_out, const optional<Tensor>& grad_h,
          const optional<Tensor>& grad_c, const BatchOrder::Allocate&) {
        return backward_in_order(s, x, h0, c0, out, workspace, grad_out, grad_h, grad_c,
                                 output_mask);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnext, CUDA, m) {
  m.impl("layer_forward", &layer_forward);
  m.impl("layer_backward", &layer_backward);
}

}  // namespace cuda
}  // namespace rnnext
