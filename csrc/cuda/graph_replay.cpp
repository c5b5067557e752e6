#include "graph_replay.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
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

// One lane of a capture: a stream (the legacy default stream cannot capture) and a cuBLAS
// workspace of its own, which the graphs' GEMMs keep using at every replay. torch's
// workspaces cannot serve: torch may free them (its own graph tools clear them), and another
// stream's work may use them while a graph replays. Lanes that run together need distinct
// workspaces.
struct CaptureLane {
  cudaStream_t stream = nullptr;
  c10::DataPtr workspace;
  cudaEvent_t done = nullptr;  // recorded at the end of a forked lane's work, to join it
};

// Where one launch stream's graphs are captured: lanes[0] captures, further lanes fork from it.
struct CaptureTarget {
  size_t workspace_size = 0;
  std::vector<CaptureLane> lanes;
  cudaEvent_t fork = nullptr;
  std::vector<c10::DataPtr> retired;  // workspaces of an earlier size that older graphs use
};

cudaEvent_t new_event() {
  cudaEvent_t event = nullptr;
  check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "event creation");
  return event;
}

// Where an eager call runs its lanes past the first on a device: a stream of rnnext's own
// (not one of torch's pool, which user streams and other threads' captures share) and the
// events that fork it from the caller's stream and join it back. A call leases one for its
// duration (SideLease): another call's record between this one's record and wait would
// redirect the wait. Leased sides go back to a free list and are never destroyed, so their
// number (and torch's cuBLAS workspace for each stream) is bounded by the most calls ever
// running at once, whatever threads come and go. Reusing a side is safe: a wait refers to
// the work its event had recorded when the wait was queued. Calls from one thread on
// different streams may lease the same side one after the other, which orders the second
// after the first's side work.
struct EagerSide {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr;
  cudaEvent_t done = nullptr;
};

struct SidePool {
  std::mutex mutex;
  std::map<c10::DeviceIndex, std::vector<EagerSide>> free;
};

// Never destroyed, like the graph cache.
SidePool& side_pool() {
  static SidePool* instance = new SidePool();
  return *instance;
}

// A new side on the current device; nothing leaks when a creation fails.
EagerSide new_side() {
  EagerSide side;
  try {
    side.fork = new_event();
    side.done = new_event();
    check_cuda(cudaStreamCreateWithFlags(&side.stream, cudaStreamNonBlocking), "stream creation");
  } catch (...) {
    if (side.fork != nullptr) cudaEventDestroy(side.fork);
    if (side.done != nullptr) cudaEventDestroy(side.done);
    throw;
  }
  return side;
}

// A side leased for one call, back to the free list at the end of the scope.
class SideLease {
 public:
  explicit SideLease(c10::DeviceIndex device) : device_(device) {
    {
      SidePool& pool = side_pool();
      const std::lock_guard<std::mutex> lock(pool.mutex);
      std::vector<EagerSide>& free = pool.free[device];
      if (!free.empty()) {
        side_ = free.back();
        free.pop_back();
        return;
      }
    }
    side_ = new_side();
  }
  SideLease(const SideLease&) = delete;
  SideLease& operator=(const SideLease&) = delete;
  ~SideLease() {
    SidePool& pool = side_pool();
    const std::lock_guard<std::mutex> lock(pool.mutex);
    pool.free[device_].push_back(side_);
  }
  const EagerSide& operator*() const { return side_; }

 private:
  c10::DeviceIndex device_;
  EagerSide side_;
};

// Makes `stream` wait for the work queued on `side` so far, at the end of a scope, whether
// it ends normally or by an exception: the call's buffers go back to the caching allocator on
// `stream` and must not be handed out while the side stream may still use them.
class JoinAtExit {
 public:
  JoinAtExit(cudaStream_t stream, cudaStream_t side, cudaEvent_t done)
      : stream_(stream), side_(side), done_(done) {}
  JoinAtExit(const JoinAtExit&) = delete;
  JoinAtExit& operator=(const JoinAtExit&) = delete;
  // The normal exit, with its errors reported.
  void join() {
    joined_ = true;
    check_cuda(cudaEventRecord(done_, side_), "event record");
    check_cuda(cudaStreamWaitEvent(stream_, done_, 0), "stream wait");
  }
  ~JoinAtExit() {
    if (joined_) return;
    // unwinding from an error: join anyway; a failure here leaves that error pending
    if (cudaEventRecord(done_, side_) == cudaSuccess) cudaStreamWaitEvent(stream_, done_, 0);
  }

 private:
  cudaStream_t stream_, side_;
  cudaEvent_t done_;
  bool joined_ = false;
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

bool enabled(const char* variable) {
  const char* env = std::getenv(variable);
  return env == nullptr || std::string(env) != "0";
}

// Queues the lanes without a graph: the first on `stream`, the others one after the other on
// a leased side stream, forked from `stream` and joined back into it, when `parallel`;
// else all on `stream`. torch's cuBLAS handle is bound to each lane's stream in turn (with
// that stream's workspace, so lanes running together never share one).
void enqueue_eagerly(cudaStream_t stream, cublasHandle_t blas, const std::vector<Lane>& lanes,
                     bool parallel) {
  if (!parallel || lanes.size() == 1) {
    for (const Lane& lane : lanes) lane(stream, blas);
    return;
  }
  const c10::DeviceIndex device = c10::cuda::current_device();
  const SideLease lease(device);
  const EagerSide& side = *lease;
  check_cuda(cudaEventRecord(side.fork, stream), "event record");
  check_cuda(cudaStreamWaitEvent(side.stream, side.fork, 0), "stream wait");
  JoinAtExit join(stream, side.stream, side.done);
  {
    const c10::cuda::CUDAStreamGuard on_side(c10::cuda::getStreamFromExternal(side.stream, device));
    const cublasHandle_t side_blas = at::cuda::getCurrentCUDABlasHandle();
    for (size_t k = 1; k < lanes.size(); ++k) lanes[k](side.stream, side_blas);
  }
  // (getCurrentCUDABlasHandle binds the handle back to the caller's stream)
  lanes[0](stream, at::cuda::getCurrentCUDABlasHandle());
  join.join();
}

// The target for a launch stream with at least `lane_count` lanes, set up on first use: its
// streams, workspaces of torch's size, and the device's capture handle, which runs one small
// GEMM on the launch stream outside any capture (so that nothing cuBLAS sets up lazily
// happens during one). The workspaces come from the caching allocator on the launch stream,
// so only work ordered after that stream's earlier work may touch them. Null past the limit
// of streams. A failure leaves no half-built target behind.
CaptureTarget* target_for(Cache& c, int device, cudaStream_t launch, size_t lane_count,
                          cublasHandle_t& blas) {
  if (c.handles[device] == nullptr) check_blas(cublasCreate(&c.handles[device]), "handle creation");
  blas = c.handles[device];
  auto found = c.targets.find({device, launch});
  if (found == c.targets.end() && c.streams_per_device[device] >= kMaxStreamsPerDevice) {
    return nullptr;
  }
  const size_t size = at::cuda::getChosenWorkspaceSize();
  if (found != c.targets.end() && found->second.workspace_size == size &&
      found->second.lanes.size() >= lane_count) {
    return &found->second;
  }
  // new workspaces for every lane after a change of torch's size, else for the added lanes
  const bool resized = found == c.targets.end() || found->second.workspace_size != size;
  const size_t have = found == c.targets.end() ? 0 : found->second.lanes.size();
  const size_t lanes = std::max(lane_count, have), first_new = resized ? 0 : have;
  // the warm-up GEMM's operands past the first workspace, aligned whatever its size
  const size_t scratch_offset = (size + 255) / 256 * 256;
  std::vector<c10::DataPtr> workspaces;
  for (size_t k = first_new; k < lanes; ++k) {
    workspaces.push_back(c10::cuda::CUDACachingAllocator::get()->allocate(
        k == 0 ? scratch_offset + 64 : std::max<size_t>(size, 1)));
  }
  if (resized) {
    float* scratch =
        reinterpret_cast<float*>(static_cast<char*>(workspaces[0].get()) + scratch_offset);
    const float one = 1, zero = 0;
    check_blas(cublasSetStream(blas, launch), "set stream");
    check_blas(cublasSetWorkspace(blas, workspaces[0].get(), size), "set workspace");
    check_blas(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &one, scratch, 1, scratch + 1,
                           1, &zero, scratch + 2, 1),
               "warm-up gemm");
  }
  if (found == c.targets.end()) {
    const cudaEvent_t fork = new_event();
    found = c.targets.emplace(std::make_pair(device, launch), CaptureTarget{}).first;
    found->second.fork = fork;
    ++c.streams_per_device[device];
  }
  CaptureTarget& target = found->second;
  while (target.lanes.size() < lanes) {
    CaptureLane lane;
    check_cuda(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking), "stream creation");
    lane.done = new_event();
    target.lanes.push_back(std::move(lane));
  }
  for (size_t k = first_new; k < lanes; ++k) {
    c10::DataPtr& workspace = target.lanes[k].workspace;
    if (workspace) target.retired.push_back(std::move(workspace));
    workspace = std::move(workspaces[k - first_new]);
  }
  target.workspace_size = size;
  return &target;
}

// Binds the capture handle to a lane's stream and workspace.
void bind(cublasHandle_t blas, const CaptureLane& lane, size_t workspace_size) {
  check_blas(cublasSetStream(blas, lane.stream), "set stream");
  check_blas(cublasSetWorkspace(blas, lane.workspace.get(), workspace_size), "set workspace");
}

// The graph of the lanes' work, captured on `target` with `blas` set up like the caller's
// handle (its math mode, and workspaces of torch's size, so that cuBLAS picks the kernels an
// eager call gets); lanes past the first fork from the capturing stream when `parallel`. Null,
// after a warning, where the capture fails or throws.
cudaGraphExec_t capture(const CaptureTarget& target, cublasHandle_t blas, cublasMath_t math,
                        const std::vector<Lane>& lanes, bool parallel) {
  const CaptureLane& main = target.lanes[0];
  check_blas(cublasSetMathMode(blas, math), "set math mode");
  check_cuda(cudaStreamBeginCapture(main.stream, cudaStreamCaptureModeThreadLocal),
             "graph capture");
  cudaGraph_t graph = nullptr;
  bool failed = false;
  std::string failure;
  size_t forked = 0;  // lanes past the first whose stream joined the capture
  try {
    if (parallel && lanes.size() > 1) {
      check_cuda(cudaEventRecord(target.fork, main.stream), "event record");
      for (size_t k = 1; k < lanes.size(); ++k) {
        const CaptureLane& side = target.lanes[k];
        check_cuda(cudaStreamWaitEvent(side.stream, target.fork, 0), "stream wait");
        forked = k;
        bind(blas, side, target.workspace_size);
        lanes[k](side.stream, blas);
      }
      bind(blas, main, target.workspace_size);
      lanes[0](main.stream, blas);
    } else {
      bind(blas, main, target.workspace_size);
      for (const Lane& lane : lanes) lane(main.stream, blas);
    }
  } catch (const std::exception& e) {
    failed = true;
    failure = e.what();
  }
  // join every forked lane, also after a failure, so that each side stream leaves the capture
  // with it
  for (size_t k = 1; k <= forked; ++k) {
    const CaptureLane& side = target.lanes[k];
    if (cudaEventRecord(side.done, side.stream) != cudaSuccess ||
        cudaStreamWaitEvent(main.stream, side.done, 0) != cudaSuccess) {
      failed = true;
      if (failure.empty()) failure = "joining a forked lane";
    }
  }
  cudaError_t status = cudaStreamEndCapture(main.stream, &graph);
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
                        const std::vector<Lane>& lanes) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();
  const bool parallel = enabled("RNNEXT_CUDA_PARALLEL_DIRECTIONS");
  // Eager: when disabled, for long calls, inside the caller's own capture (its graph takes
  // the launches, one lane after the other), and while an earlier error is pending (left for
  // the caller's check).
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess ||
      capturing != cudaStreamCaptureStatusNone) {
    enqueue_eagerly(stream, blas, lanes, false);
    return;
  }
  if (!enabled("RNNEXT_CUDA_GRAPHS") || steps > kMaxGraphSteps ||
      cudaPeekAtLastError() != cudaSuccess) {
    enqueue_eagerly(stream, blas, lanes, parallel);
    return;
  }
  const int device = c10::cuda::current_device();
  // the cuBLAS math mode (TF32, reduced-precision reductions) and workspace size decide the
  // kernels cuBLAS picks
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
  check_blas(cublasGetMathMode(blas, &math), "get math mode");
  std::vector<int64_t> key = make_key();
  key.insert(key.end(), {device, reinterpret_cast<int64_t>(stream), static_cast<int64_t>(math),
                         static_cast<int64_t>(at::cuda::getChosenWorkspaceSize()),
                         static_cast<int64_t>(lanes.size()), parallel ? 1 : 0});

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
    enqueue_eagerly(stream, blas, lanes, parallel);
    return;
  }
  c.entries.splice(c.entries.begin(), c.entries, entry);
  if (entry->graph == nullptr && !entry->capture_failed) {
    // whatever goes wrong here leaves the key eager: the call itself still runs below
    bool too_many_streams = false;
    cublasHandle_t capture_blas = nullptr;
    try {
      const CaptureTarget* target =
          target_for(c, device, stream, parallel ? lanes.size() : 1, capture_blas);
      too_many_streams = target == nullptr;
      if (target != nullptr) {
        entry->graph = capture(*target, capture_blas, math, lanes, parallel);
      }
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
    enqueue_eagerly(stream, blas, lanes, parallel);
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
