#include "buffer_cache.h"

#include <ATen/ATen.h>
#include <pthread.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

namespace rnnext {
namespace cpu {
namespace {

class BufferCache {
 public:
  BufferCache() {
    const char* env = std::getenv("RNNEXT_CPU_CACHE_MB");
    int64_t megabytes = 1024;
    if (env != nullptr && *env != '\0') {  // (set but empty counts as unset)
      char* end = nullptr;
      megabytes = std::strtoll(env, &end, 10);
      TORCH_CHECK(end != env && *end == '\0' && megabytes >= 0 && megabytes <= (int64_t{1} << 30),
                  "rnnext: RNNEXT_CPU_CACHE_MB must be a whole number of megabytes from 0 (no "
                  "cache) to 2^30, got '",
                  env, "'");
    }
    limit_ = megabytes << 20;
  }

  // Held across fork() (pthread_atfork), so that the child's copy is never locked forever by
  // a thread that does not exist there.
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

  int64_t limit() const { return limit_; }

  // The smallest free buffer of `bytes` to 5/4 of it (a larger one would hold memory that
  // goes unused while the tensor lives), or a new one; sets its capacity.
  void* take(int64_t bytes, int64_t& capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes >= bytes && it->bytes <= bytes + bytes / 4 &&
            (best == free_.end() || it->bytes < best->bytes)) {
          best = it;
        }
      }
      if (best != free_.end()) {
        void* data = best->data;
        capacity = best->bytes;
        cached_ -= best->bytes;
        free_.erase(best);
        ++stats_.reused;
        return data;
      }
      ++stats_.allocated;
    }
    capacity = bytes;
    void* data = allocate(bytes);
    if (data == nullptr) {  // the cached buffers may be what is missing
      release();
      data = allocate(bytes);
    }
    TORCH_CHECK(data != nullptr, "rnnext: out of memory allocating a CPU workspace of ", bytes,
                " bytes");
    return data;
  }

  // Keeps a freed buffer, dropping the oldest ones beyond the limit.
  void give_back(void* data, int64_t bytes) {
    std::deque<Entry> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        dropped.push_back({data, bytes});
      } else {
        free_.push_back({data, bytes});
        cached_ += bytes;
        while (cached_ > limit_) {
          dropped.push_back(free_.front());
          cached_ -= free_.front().bytes;
          free_.pop_front();
        }
      }
    }
    for (const Entry& e : dropped) std::free(e.data);
  }

  BufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    BufferCacheStats out = stats_;
    out.cached_bytes = cached_;
    return out;
  }

  int64_t release() {
    std::deque<Entry> dropped;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(free_);
      bytes = cached_;
      cached_ = 0;
    }
    for (const Entry& e : dropped) std::free(e.data);
    return bytes;
  }

 private:
  static void* allocate(int64_t bytes) {
    void* data = nullptr;
    return posix_memalign(&data, 64, static_cast<size_t>(bytes)) == 0 ? data : nullptr;
  }

  struct Entry {
    void* data;
    int64_t bytes;
  };
  std::mutex mutex_;
  std::deque<Entry> free_;  // oldest first
  int64_t cached_ = 0;
  int64_t limit_ = 0;
  BufferCacheStats stats_;
};

// Never destroyed: tensors that outlive static destruction at exit still give their buffers
// back to it.
BufferCache& cache() {
  static BufferCache* instance = [] {
    BufferCache* created = new BufferCache();
    pthread_atfork([] { cache().lock(); }, [] { cache().unlock(); }, [] { cache().unlock(); });
    return created;
  }();
  return *instance;
}

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t bytes = static_cast<int64_t>(options.dtype().itemsize());
  for (const int64_t size : sizes) bytes *= size;
  if (bytes < kMinCachedBytes || cache().limit() <= 0) return at::empty(sizes, options);
  int64_t capacity = 0;
  void* data = cache().take(bytes, capacity);
  return at::from_blob(
      data, sizes, [capacity](void* p) { cache().give_back(p, capacity); }, options);
}

at::Tensor zeros_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = empty_cached(sizes, options);
  std::memset(t.data_ptr(), 0, t.nbytes());
  return t;
}

BufferCacheStats buffer_cache_stats() {
  return cache().stats();
}

int64_t release_cached_buffers() {
  return cache().release();
}

}  // namespace cpu
}  // namespace rnnext
