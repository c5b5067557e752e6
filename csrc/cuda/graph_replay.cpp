#include "graph_replay.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "status.h"

namespace rnnext {
namespace cuda {
namespace {

// Calls of more steps than this run eagerly: their launches cost little next to their work,
// and a graph's size and instantiation time grow with its nodes.
constexpr int64_t kMaxGraphSteps = 4096;
// Keys remembered (most recent first); a key's graph is freed when it drops out.
constexpr size_t kMaxEntries = 64;
// Launch streams per device whose calls are replayed: each holds a cuBLAS workspace (32 MiB on
// sm90) for as long as the process runs; calls on further streams run eagerly.
constexpr size_t kMaxStreamsPerDevice = 4;

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
  std::vector<c10::DataPtr> retired;  // workspaces of an earlier size that older graphs use
};

// Process-wide counters, for tests and diagnosis (rnnext.functional.cuda_graph_stats).
enum Counter { kFirstSightings, kCaptures, kFailedCaptures, kGraphLaunches, kCounters };

struct Cache {
  std::mutex mutex;
  std::list<Entry> entries;
  std::map<std::pair<int, cudaStream_t>, CaptureTarget> targets;  // by (device, launch stream)
  std::map<int, size_t> streams_per_device;
  std::map<int, cublasHandle_t> handles;  // by device, for captures only
  std::array<std::atomic<int64_t>, kCounters> counters{};
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

// The target for a launch stream, set up on first use: its stream, a workspace of torch's
// size, and the device's capture handle, which runs one small GEMM there outside any capture
// (so that nothing cuBLAS sets up lazily happens during one). The GEMM runs on the launch
// stream: the workspace comes from the caching allocator on that stream, so only work
// ordered after the stream's earlier work may touch it. Null past the limit of streams. A
// failure leaves no half-built target behind.
CaptureTarget* target_for(Cache& c, int device, cudaStream_t launch, cublasHandle_t& blas) {
  if (c.handles[device] == nullptr) check_blas(cublasCreate(&c.handles[device]), "handle creation");
  blas = c.handles[device];
  auto found = c.targets.find({device, launch});
  if (found == c.targets.end() && c.streams_per_device[device] >= kMaxStreamsPerDevice) {
    return nullptr;
  }
  const size_t size = at::cuda::getChosenWorkspaceSize();
  if (found != c.targets.end() && found->second.workspace_size == size) return &found->second;

  // the warm-up GEMM's operands past the workspace, aligned whatever the workspace's size
  const size_t scratch_offset = (size + 255) / 256 * 256;
  c10::DataPtr workspace = c10::cuda::CUDACachingAllocator::get()->allocate(scratch_offset + 64);
  float* scratch = reinterpret_cast<float*>(static_cast<char*>(workspace.get()) + scratch_offset);
  const float one = 1, zero = 0;
  check_blas(cublasSetStream(blas, launch), "set stream");
  check_blas(cublasSetWorkspace(blas, workspace.get(), size), "set workspace");
  check_blas(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &one, scratch, 1, scratch + 1, 1,
                         &zero, scratch + 2, 1),
             "warm-up gemm");
  if (found == c.targets.end()) {
    cudaStream_t stream = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream creation");
    found = c.targets.emplace(std::make_pair(device, launch), CaptureTarget{}).first;
    found->second.stream = stream;
    ++c.streams_per_device[device];
  }
  CaptureTarget& target = found->second;
  if (target.workspace) target.retired.push_back(std::move(target.workspace));
  target.workspace = std::move(workspace);
  target.workspace_size = size;
  return &target;
}

// The graph of enqueue's work, captured on `target` with `blas` set up like the caller's
// handle (its math mode, and a workspace of torch's size, so that cuBLAS picks the kernels an
// eager call gets); null, after a warning, where the capture fails or throws.
cudaGraphExec_t capture(const CaptureTarget& target, cublasHandle_t blas, cublasMath_t math,
                        const std::function<void(cudaStream_t, cublasHandle_t)>& enqueue) {
  check_blas(cublasSetStream(blas, target.stream), "set stream");
  check_blas(cublasSetMathMode(blas, math), "set math mode");
  check_blas(cublasSetWorkspace(blas, target.workspace.get(), target.workspace_size),
             "set workspace");
  check_cuda(cudaStreamBeginCapture(target.stream, cudaStreamCaptureModeThreadLocal),
             "graph capture");
  cudaGraph_t graph = nullptr;
  bool failed = false;
  std::string failure;
  try {
    enqueue(target.stream, blas);
  } catch (const std::exception& e) {
    failed = true;
    failure = e.what();
  }
  cudaError_t status = cudaStreamEndCapture(target.stream, &graph);
  cudaGraphExec_t exec = nullptr;
  if (!failed && status == cudaSuccess && graph != nullptr) {
    status = cudaGraphInstantiateWithFlags(&exec, graph, 0);
  }
  if (graph != nullptr) cudaGraphDestroy(graph);
  if (!failed && (status != cudaSuccess || exec == nullptr)) {
    failed = true;
    failure = cudaGetErrorString(status);
  }
  if (failed) {
    // the errors here are the capture's own: none was pending before it began
    cudaGetLastError();
    TORCH_WARN_ONCE("rnnext: capturing a layer call as a CUDA graph failed (", failure,
                    "); such calls run without graphs");
    return nullptr;
  }
  return exec;
}

std::vector<int64_t> graph_stats(const at::Tensor& /*on_cuda*/) {
  const auto& counters = cache().counters;
  return {counters[kFirstSightings].load(), counters[kCaptures].load(),
          counters[kFailedCaptures].load(), counters[kGraphLaunches].load()};
}

}  // namespace

void enqueue_replayable(const std::function<std::vector<int64_t>()>& make_key, int64_t steps,
                        const std::function<void(cudaStream_t, cublasHandle_t)>& enqueue) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();
  // Eager: when disabled, for long calls, inside the caller's own capture (its graph takes
  // the launches), and while an earlier error is pending (left for the caller's check).
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (!graphs_enabled() || steps > kMaxGraphSteps || cudaPeekAtLastError() != cudaSuccess ||
      cudaStreamIsCapturing(stream, &capturing) != cudaSuccess ||
      capturing != cudaStreamCaptureStatusNone) {
    enqueue(stream, blas);
    return;
  }
  const int device = c10::cuda::current_device();
  // the cuBLAS math mode (TF32, reduced-precision reductions) and workspace size decide the
  // kernels cuBLAS picks
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
  check_blas(cublasGetMathMode(blas, &math), "get math mode");
  std::vector<int64_t> key = make_key();
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
    ++c.counters[kFirstSightings];
    lock.unlock();
    enqueue(stream, blas);
    return;
  }
  c.entries.splice(c.entries.begin(), c.entries, entry);
  if (entry->graph == nullptr && !entry->capture_failed) {
    // whatever goes wrong here leaves the key eager: the call itself still runs below
    bool too_many_streams = false;
    cublasHandle_t capture_blas = nullptr;
    try {
      const CaptureTarget* target = target_for(c, device, stream, capture_blas);
      too_many_streams = target == nullptr;
      if (target != nullptr) entry->graph = capture(*target, capture_blas, math, enqueue);
    } catch (const std::exception& e) {
      cudaGetLastError();
      TORCH_WARN_ONCE("rnnext: setting up a CUDA graph capture failed (", e.what(),
                      "); such calls run without graphs");
    }
    entry->capture_failed = entry->graph == nullptr;
    if (!too_many_streams) ++c.counters[entry->capture_failed ? kFailedCaptures : kCaptures];
  }
  if (entry->graph == nullptr) {
    lock.unlock();
    enqueue(stream, blas);
    return;
  }
  // launched under the lock: no other thread can free this graph meanwhile
  check_cuda(cudaGraphLaunch(entry->graph, stream), "graph launch");
  ++c.counters[kGraphLaunches];
}

TORCH_LIBRARY_IMPL(rnnext, CUDA, m) {
  m.impl("_cuda_graph_stats", &graph_stats);
}

}  // namespace cuda
}  // namespace rnnext
