// Host buffers kept for reuse: the workspace that a layer's forward saves for its backward, a
// bidirectional layer's per-direction input gradients, the packed copies of the weights
// (packed_gemm.h) that each call makes, the weight gradients backward returns, and the
// copies of the batch in the kernels' order (common/batch_order.h). glibc maps
// an allocation of 32 MB or more afresh each time and unmaps it when freed, so every call paid
// a page fault (and the zeroing of a page) per 4 KB it wrote: 10-20 ms of a 2-layer
// bidirectional (200, 32, 256) forward+backward. Smaller buffers fared the same whenever the
// heap had been trimmed since the last call, which depends on what the process did before:
// forward+backward at (1, 16, 512), gradients set to None between calls, took 1.0-3.2 ms (GRU,
// 25-1504 faults a call) and 2.1-4.3 ms (LSTM, 409-2016) in separate processes, against
// 1.1-1.2 and 1.4-1.8 ms with no fault once the weight gradients came from here. A buffer
// freed here goes back to a small cache instead, and the next call of the same size writes
// into pages already mapped. Buffers under 256 KB stay with at::empty (a few dozen pages at
// most, and the cache then holds few enough buffers for a linear search).
//
// What the cache holds stays allocated (up to the limit below) until release_cached_buffers();
// torch.profiler's memory view does not see it, and torch's fill of uninitialised memory
// (torch.utils.deterministic.fill_uninitialized_memory) does not apply to it, which is safe
// because backward reads only the workspace entries that forward wrote, the input gradients,
// packed weights, reordered copies and outputs in the kernels' order are written whole before
// they are read, and the weight gradients are zeroed (zeros_cached).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rnnext {
namespace cpu {

// An uninitialised CPU tensor of `sizes` and `options`' dtype, contiguous, 64-byte aligned,
// its memory taken from the cache where a freed buffer of at least its size (and at most
// 5/4 of it) is there, and given back to it when the tensor's storage dies. Buffers under
// kMinCachedBytes come from at::empty as usual. The cache keeps at most
// RNNEXT_CPU_CACHE_MB (a whole number, read at the first use; default 1024) megabytes of
// freed buffers, dropping the oldest first; 0 turns it off. A failed allocation empties the
// cache and tries once more. A fork() waits for the cache's lock to be free, so the child
// starts with it unlocked.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// empty_cached's tensor filled with zeros (weight gradients, which backward adds into).
at::Tensor zeros_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// Counters since the process started: buffers handed out from the cache, buffers newly
// allocated for it, and the bytes it holds now.
struct BufferCacheStats {
  int64_t reused = 0, allocated = 0, cached_bytes = 0;
};
BufferCacheStats buffer_cache_stats();

// Frees every buffer the cache holds; returns how many bytes that was.
int64_t release_cached_buffers();

inline constexpr int64_t kMinCachedBytes = int64_t{256} << 10;

}  // namespace cpu
}  // namespace rnnext
