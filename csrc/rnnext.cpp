// The rnnext operator library: every op's schema, declared once. Backends register their
// implementations in their own files (cpu/, cuda/) with TORCH_LIBRARY_IMPL.
//
// One call runs one layer over all time steps, for one or both directions:
//   mode     "RNN_TANH" | "RNN_RELU" | "GRU" | "LSTM" (torch.nn's names)
//   input    [T, B, I] time-major, float32 or float64
//   weights  per direction w_ih [G*H, I], w_hh [G*H, P], then b_ih [G*H], b_hh [G*H] when
//            has_biases, then w_hr [P, H] for an LSTM projection, in torch.nn's gate order
//            (G = 1, 3, 4 for RNN, GRU, LSTM; P = the projection size, or H without one)
//   hx       [D, B, P], cx [D, B, H] (LSTM only) initial states, zeros when None; D = 2 if
//            bidirectional
//   lengths  None, or [B] int64/int32 sequence lengths in [0, T], in any order, on the CPU or
//            the input's device: row b runs steps t < lengths[b] only (the kernels run on the
//            batch sorted longest first, a copy where it is not, common/batch_order.h; the
//            workspace is in that order)
// layer_forward returns output [T, B, D*P] (zero past each row's end), h_n [D, B, P], c_n
// [D, B, H] (LSTM; else [0]) and the workspace [D, T, B, W] that layer_backward needs (W per
// cell, see csrc/cells; [0] when need_workspace is false).
// layer_backward returns grad_input [T, B, I], grad_hx [D, B, P], grad_cx [D, B, H] and the
// weight gradients in the order of `weights`; each is empty where output_mask (input, states,
// weights) says it is not needed. A None gradient argument counts as zeros.
//   bf16_products  leave to the backend whether the products with the weights (forward:
//            x W_ih^T, h W_hh^T, m W_hr^T; backward: the gate gradients times W_ih, W_hh and
//            dh' W_hr) and the weight gradients' products (dG^T x, dG^T h) take both
//            operands rounded to bfloat16 and sum in float32, as torch.nn's bfloat16 layers
//            compute; for a module converted with .bfloat16() on the CPU (float32 input and
//            states, and the weights either bfloat16 themselves, their gradients then
//            bfloat16 too, or float32 copies), or under bfloat16 autocast (float32 weights).
//            The CPU does so where it has AVX512-BF16, for products of at least 17 columns
//            (with float32 weights, in calls of at least 4 steps and 17 rows), but for the
//            h0 term of dW_hh; elsewhere, and on CUDA, it changes nothing (bfloat16
//            weights are then converted on the CPU; CUDA refuses them beside float32 input).
#include <Python.h>
#include <torch/library.h>

#include <exception>

#include "cpu/buffer_cache.h"
#include "cpu/packed_gemm.h"

namespace {

// C++ errors (a bad RNNEXT_CPU_CACHE_MB) become Python exceptions: none may cross the C API.
template <typename F>
PyObject* translate_errors(const F& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "rnnext: unknown C++ exception");
    return nullptr;
  }
}

// _cpu_cache_stats() -> (reused, allocated, cached_bytes): see cpu/buffer_cache.h
PyObject* cpu_cache_stats(PyObject*, PyObject*) {
  return translate_errors([] {
    const rnnext::cpu::BufferCacheStats s = rnnext::cpu::buffer_cache_stats();
    return Py_BuildValue("(LLL)", static_cast<long long>(s.reused),
                         static_cast<long long>(s.allocated),
                         static_cast<long long>(s.cached_bytes));
  });
}

// _release_cpu_cache() -> bytes freed
PyObject* release_cpu_cache(PyObject*, PyObject*) {
  return translate_errors(
      [] { return PyLong_FromLongLong(rnnext::cpu::release_cached_buffers()); });
}

// _cpu_bf16_products() -> whether bf16_products takes effect on this CPU (AVX512-BF16, and
// RNNEXT_CPU_BF16_PRODUCTS not "0")
PyObject* cpu_bf16_products(PyObject*, PyObject*) {
  return translate_errors([] { return PyBool_FromLong(rnnext::cpu::bf16_products_enabled()); });
}

PyMethodDef methods[] = {
    {"_cpu_cache_stats", cpu_cache_stats, METH_NOARGS, nullptr},
    {"_cpu_bf16_products", cpu_bf16_products, METH_NOARGS, nullptr},
    {"_release_cpu_cache", release_cpu_cache, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// `import rnnext._C` loads this library, which registers the ops; the module's own functions
// report on and empty the CPU workspace cache and say whether the CPU has bfloat16 products.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rnnext, m) {
  m.def(
      "layer_forward(str mode, Tensor input, Tensor[] weights, Tensor? hx, Tensor? cx, "
      "bool has_biases, bool bidirectional, Tensor? lengths, bool need_workspace, "
      "bool bf16_products=False) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor workspace)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "layer_backward(str mode, Tensor input, Tensor[] weights, Tensor? hx, Tensor? cx, "
      "Tensor output, Tensor workspace, Tensor? grad_output, Tensor? grad_h_n, "
      "Tensor? grad_c_n, bool has_biases, bool bidirectional, Tensor? lengths, "
      "bool[3] output_mask, bool bf16_products=False) "
      "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor[] grad_weights)",
      {at::Tag::pt2_compliant_tag});
  // Counters of the CUDA graph replay of repeated calls (csrc/cuda/graph_replay.h), process
  // wide: [first sightings run eagerly, captures, failed captures, graph launches]. `on_cuda`
  // (any CUDA tensor) selects the CUDA backend; a diagnostic, not for compiled graphs.
  m.def("_cuda_graph_stats(Tensor on_cuda) -> int[]");
}
