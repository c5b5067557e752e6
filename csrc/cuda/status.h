// Status checks of CUDA runtime and cuBLAS calls, shared by the time loops (layer_driver.cu)
// and the graph replay (graph_replay.cpp). Framework-free: a failure throws
// std::runtime_error, which torch's op wrappers turn into a Python RuntimeError.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace rnnext {
namespace cuda {

inline void check_blas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("rnnext (CUDA): cuBLAS ") + what +
                             " failed: " + cublasGetStatusString(status));
  }
}

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("rnnext (CUDA): ") + what +
                             " failed: " + cudaGetErrorString(status));
  }
}

}  // namespace cuda
}  // namespace rnnext
