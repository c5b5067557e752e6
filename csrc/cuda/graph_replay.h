// Replay of a layer call's time loops as a CUDA graph. A call queues two or more launches per
// step (a GEMM and a pointwise kernel each way), each a few microseconds of host time, while
// the GPU work of a step at moderate sizes is shorter: the host sets the pace. When a call
// comes again with the same buffers, sizes and lengths, as each iteration of a training loop
// does once the caching allocator hands out the same blocks, its launches are replayed as one
// graph instead. Framework-free header; the cache lives in graph_replay.cpp.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "../common/layer_sizes.h"

namespace rnnext {
namespace cuda {

// One lane of a call's work: queues its launches on `stream`, with `blas` bound to that stream.
using Lane = std::function<void(cudaStream_t, cublasHandle_t)>;

// Queues a call's lanes (independent work: the directions of a bidirectional layer) for the
// current stream and cuBLAS handle, or replays them as a CUDA graph. Lanes past the first run
// on streams of their own, forked from the current stream and joined back into it, so that
// small steps of two directions fill the GPU together; they run one after the other on the
// current stream inside the caller's own stream capture and with
// RNNEXT_CUDA_PARALLEL_DIRECTIONS=0 in the environment. make_key() must return everything the
// lanes read on the host, so that equal keys queue equal work on the same memory: the second
// call with a key captures the graph, later ones replay it. `steps` (the time steps queued,
// all lanes) bounds the graph's size: longer calls, calls inside the caller's own stream
// capture, and any call with RNNEXT_CUDA_GRAPHS=0 in the environment run eagerly (without
// building a key). A capture that fails warns once and leaves its key eager.
void enqueue_replayable(const std::function<std::vector<int64_t>()>& make_key, int64_t steps,
                        const std::vector<Lane>& lanes);

// Appends a params struct (LayerSizes and raw pointers and sizes, value-initialised) to a
// key: its bytes, with the host arrays of the step order replaced by their contents.
template <typename Params>
void append_params(std::vector<int64_t>& key, const Params& p) {
  static_assert(std::is_trivially_copyable_v<Params> && sizeof(Params) % 8 == 0);
  // `reverse` owns its 8-byte word, whose padding bytes are unspecified (set below)
  static_assert(offsetof(LayerSizes, reverse) % 8 == 0 &&
                offsetof(LayerSizes, batch_sizes) == offsetof(LayerSizes, reverse) + 8);
  const size_t first = key.size();
  key.resize(first + sizeof(Params) / 8);
  std::memcpy(key.data() + first, &p, sizeof(Params));
  const auto word = [&](const void* member) {
    return first + (static_cast<const char*>(member) - reinterpret_cast<const char*>(&p)) / 8;
  };
  key[word(&p.reverse)] = p.reverse ? 1 : 0;
  key[word(&p.batch_sizes)] = key[word(&p.lengths)] = key[word(&p.row_starts)] = 0;
  key.insert(key.end(), p.batch_sizes, p.batch_sizes + p.steps);
  key.insert(key.end(), p.lengths, p.lengths + p.batch);
  key.insert(key.end(), p.row_starts, p.row_starts + p.steps + 1);
}

}  // namespace cuda
}  // namespace rnnext
