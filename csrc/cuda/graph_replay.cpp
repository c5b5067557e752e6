#include "graph_replay.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace rnnext {
namespace cuda {
namespace {

// Calls of more steps than this run eagerly: their launches cost little next to their work,
// and a graph's size and instantiation time grow with its nodes.
constexpr int64_t kMaxGraphSteps = 4096;
// Keys remembered (most recent first); a key's graph is freed when it drops out.
constexpr size_t kMaxEntries = 64;

struct Entry {
  std::vector<int64_t> key;
  cudaGraphExec_t graph = nullptr;
  bool capture_failed = false;
};

// Where one launch stream's graphs are captured: a stream of its own (the legacy default
// stream cannot capture) and a cuBLAS workspace of its own, which the graphs' GEMMs keep
// using at every replay. torch's workspaces cannot serve: torch may free them (its own graph
// tools clear them), and another stream's work may use them while a graph replays.
struct CaptureTarget {
  cudaStream_t stream = nullptr;
  size_t workspace_size = 0;
  c10::DataPtr workspace;
  std::vector<c10::DataPtr> retired;  // smaller workspaces that older graphs still use
};

struct Cache {
  std::mutex mutex;
  std::list<Entry> entries;
  std::map<std::pair<int, cudaStream_t>, CaptureTarget> targets;  // by (device, launch stream)
  std::map<int, cublasHandle_t> handles;                          // by device, for captures
};

// Never destroyed: freeing graphs during exit could run after the CUDA context is gone.
Cache& cache() {
  static Cache* instance = new Cache();
  return *instance;
}

bool graphs_enabled() {
  const char* env = std::getenv("RNNEXT_CUDA_GRAPHS");
  return env == nullptr || std::string(env) != "0";
}

void check(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "rnnext (CUDA): ", what,
              " failed: ", cudaGetErrorString(status));
}

void check(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "rnnext (CUDA): ", what,
              " failed: ", cublasGetStatusString(status));
}

// The graph of enqueue's work, captured on `target` with `blas` set up like the caller's
// handle (its math mode, and a workspace of torch's size, so that cuBLAS picks the kernels an
// eager call gets), or null, with the error cleared, where the capture failed.
cudaGraphExec_t capture(const CaptureTarget& target, cublasHandle_t blas, cublasMath_t math,
                        const std::function<void(cudaStream_t, cublasHandle_t)>& enqueue) {
  check(cublasSetStream(blas, target.stream), "cublasSetStream");
  check(cublasSetMathMode(blas, math), "cublasSetMathMode");
  check(cublasSetWorkspace(blas, target.workspace.get(), target.workspace_size),
        "cublasSetWorkspace");
  check(cudaStreamBeginCapture(target.stream, cudaStreamCaptureModeThreadLocal), "graph capture");
  cudaGraph_t graph = nullptr;
  try {
    enqueue(target.stream, blas);
  } catch (...) {
    cudaStreamEndCapture(target.stream, &graph);
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    throw;
  }
  cudaError_t status = cudaStreamEndCapture(target.stream, &graph);
  cudaGraphExec_t exec = nullptr;
  if (status == cudaSuccess && graph != nullptr) {
    status = cudaGraphInstantiateWithFlags(&exec, graph, 0);
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (status != cudaSuccess || exec == nullptr) {
    cudaGetLastError();
    TORCH_WARN_ONCE("rnnext: capturing a layer call as a CUDA graph failed (",
                    cudaGetErrorString(status), "); such calls run without graphs");
    return nullptr;
  }
  return exec;
}

cudaGraphExec_t capture_for(Cache& c, int device, cudaStream_t launch, cublasMath_t math,
                            const std::function<void(cudaStream_t, cublasHandle_t)>& enqueue) {
  cublasHandle_t& blas = c.handles[device];
  if (blas == nullptr) check(cublasCreate(&blas), "cublasCreate");
  CaptureTarget& target = c.targets[{device, launch}];
  if (target.stream == nullptr) {
    check(cudaStreamCreateWithFlags(&target.stream, cudaStreamNonBlocking), "stream creation");
  }
  const size_t size = at::cuda::getChosenWorkspaceSize();
  if (target.workspace_size != size) {
    if (target.workspace) target.retired.push_back(std::move(target.workspace));
    target.workspace = c10::cuda::CUDACachingAllocator::get()->allocate(size);
    target.workspace_size = size;
  }
  return capture(target, blas, math, enqueue);
}

}  // namespace

void enqueue_replayable(std::vector<int64_t> key, int64_t steps,
                        const std::function<void(cudaStream_t, cublasHandle_t)>& enqueue) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();
  // inside the caller's own capture (or where the query fails), its graph takes the launches
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  bool eager = !graphs_enabled() || steps > kMaxGraphSteps;
  if (!eager && cudaStreamIsCapturing(stream, &capturing) != cudaSuccess) {
    cudaGetLastError();
    eager = true;
  }
  if (eager || capturing != cudaStreamCaptureStatusNone) {
    enqueue(stream, blas);
    return;
  }
  const int device = c10::cuda::current_device();
  // the cuBLAS math mode (TF32, reduced-precision reductions) and workspace size decide the
  // kernels cuBLAS picks
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
  TORCH_CHECK(cublasGetMathMode(blas, &math) == CUBLAS_STATUS_SUCCESS,
              "rnnext (CUDA): cublasGetMathMode failed");
  key.insert(key.end(), {device, reinterpret_cast<int64_t>(stream), static_cast<int64_t>(math),
                         static_cast<int64_t>(at::cuda::getChosenWorkspaceSize())});

  Cache& c = cache();
  std::unique_lock<std::mutex> lock(c.mutex);
  auto entry = c.entries.begin();
  while (entry != c.entries.end() && entry->key != key) ++entry;
  if (entry == c.entries.end()) {
    // first sighting: run eagerly and remember the key; a key seen once may never come again
    c.entries.push_front(Entry{std::move(key)});
    if (c.entries.size() > kMaxEntries) {
      if (c.entries.back().graph != nullptr) cudaGraphExecDestroy(c.entries.back().graph);
      c.entries.pop_back();
    }
    lock.unlock();
    enqueue(stream, blas);
    return;
  }
  c.entries.splice(c.entries.begin(), c.entries, entry);
  if (entry->graph == nullptr && !entry->capture_failed) {
    entry->graph = capture_for(c, device, stream, math, enqueue);
    entry->capture_failed = entry->graph == nullptr;
  }
  if (entry->graph == nullptr) {
    lock.unlock();
    enqueue(stream, blas);
    return;
  }
  check(cudaGraphLaunch(entry->graph, stream), "graph launch");
}

}  // namespace cuda
}  // namespace rnnext
