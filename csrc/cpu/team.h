// A team: the threads of one parallel region that run a whole time loop together, each on its
// own share of the hidden units (and of the other column ranges a step multiplies), meeting at
// a barrier wherever a step needs the others' results. A step then costs one barrier of a few
// hundred nanoseconds where a parallel region per step costs microseconds of fork and join,
// and the pointwise passes run in parallel at any batch size.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>

namespace rnnext {
namespace cpu {

// Columns [begin, end) of a product or a buffer.
struct Cols {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};

// All threads of a team wait in arrive_and_wait until the weights of their arrivals add up to
// `total` (a thread that holds several of the team's slots arrives with their count, so the
// barrier is right however the region hands slots to threads).
class SpinBarrier {
 public:
  explicit SpinBarrier(int64_t total) : total_(total) {}

  void arrive_and_wait(int64_t weight) {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(weight, std::memory_order_acq_rel) + weight == total_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      // spin briefly (the other threads are a step's work away), then give way to the OS in
      // case the machine has fewer free cores than the team has threads
      if (spins < (int64_t{1} << 14)) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  alignas(64) std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<int64_t> generation_{0};
  const int64_t total_;
};

// One thread's part of a team: the slots [first, last) of `slots`. A dimension is shared out
// in tiles of `tile` columns, slot by slot. A member alone (slots == 1) owns every column, its
// sync() does nothing, and the calls it makes may use every thread themselves.
struct TeamMember {
  int64_t first = 0, last = 1, slots = 1;
  SpinBarrier* barrier = nullptr;

  bool alone() const { return barrier == nullptr; }
  bool leader() const { return first == 0; }
  void sync() const {
    if (barrier != nullptr) barrier->arrive_and_wait(last - first);
  }
  // This member's columns of an N-column dimension split into tiles of `tile` columns.
  Cols share(int64_t N, int64_t tile) const {
    const int64_t tiles = (N + tile - 1) / tile;
    return {std::min(N, first * tiles / slots * tile), std::min(N, last * tiles / slots * tile)};
  }
  // This member's part of the range [0, count), for work of uniform items (steps, say).
  Cols share_items(int64_t count) const { return {first * count / slots, last * count / slots}; }
};

// at::parallel_for for a body that starts no parallel work of its own (a pointwise pass, a
// GEMM tile range). A range under one grain runs here directly, where at::parallel_for would
// also run it on this thread but after setting up a parallel region's thread state, each
// time: a few percent of a batch-1 step, whose GEMM and pass are each one small range.
template <typename F>
void parallel_for_leaf(int64_t begin, int64_t end, int64_t grain, const F& body) {
  if (end - begin < grain) {
    if (end > begin) body(begin, end);
    return;
  }
  at::parallel_for(begin, end, grain, body);
}

// Runs body(member) on a team of `slots` members at once, one per thread of torch's pool, or
// on one member alone where no team can form: slots <= 1, one thread, inside another parallel
// region (the directions of a bidirectional layer), or a thread pool that does not run a
// region's tasks all at once (only OpenMP's teams do, which the barrier needs).
template <typename Body>
void run_team(int64_t slots, const Body& body) {
  slots = std::min<int64_t>(slots, at::get_num_threads());
#if AT_PARALLEL_OPENMP
  const bool team = slots > 1 && !at::in_parallel_region();
#else
  const bool team = false;
#endif
  if (!team) {
    body(TeamMember{});
    return;
  }
  SpinBarrier barrier(slots);
  at::parallel_for(0, slots, 1, [&](int64_t first, int64_t last) {
    body(TeamMember{first, last, slots, &barrier});
  });
}

}  // namespace cpu
}  // namespace rnnext
