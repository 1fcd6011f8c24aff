// A small C++20 model of the Metal Shading Language subset the SMoA kernels use, so that the Metal source MLX
// generates for them compiles with g++ and runs on the CPU under a threadgroup emulator (see metal_emulator.py).
//
// Modelled: SIMD-groups of 32 consecutive threads and the simdgroup_matrix operations (the shim's
// include/metal_simdgroup_matrix, with its own notes), address-space qualifiers (device/constant/thread erased; threadgroup arrays become function-local
// statics, shared by the emulated threads of the one threadgroup that runs at a time), uint/uint3 and the
// fixed-width ints, MLX's float16_t/bfloat16_t storage types with round-to-nearest-even conversions,
// threadgroup_barrier as a real barrier across all threads of the group (a thread that never reaches a barrier
// the others wait at is reported as divergence instead of hanging), the thread-position attributes, and the
// [[kernel]] / [[buffer(n)]] / [[host_name]] attributes (ignored).
//
// NOT modelled: lockstep SIMD-group execution and SIMD-group functions (simd_sum, shuffles...), atomics, memory orderings
// weaker than a full barrier (every barrier here orders all memory), uninitialised threadgroup memory (statics
// start at zero and keep the previous group's values), device-memory out-of-bounds faults, the Metal math
// library and fast-math, float16/bfloat16 arithmetic (the kernels only load and store them; maths is float),
// threadgroup-memory size limits and occupancy.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

typedef unsigned int uint;
typedef unsigned long ulong;
struct uint3 {
  uint x, y, z;
};
struct ulong2 {
  ulong x, y;
  ulong2(ulong a, ulong b) : x(a), y(b) {}
};

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(bfloat16_t) == 2, "bfloat16_t must be 2 bytes");

typedef _Float16 float16_t;
typedef _Float16 half;

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

namespace smoa_shim {

// A reusable barrier for a fixed number of threads, with a timeout that turns divergence into an error.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait(const char* what) {
    std::unique_lock<std::mutex> lock(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(20), [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "shim: barrier divergence at %s (%d of %d threads arrived)\n", what, count_, n_);
      std::exit(3);
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

inline thread_local Barrier* current_barrier = nullptr;
inline thread_local int current_lane = 0;  // thread_index_in_simdgroup of the emulated thread
constexpr int kSimdWidth = 32;

struct ThreadCtx {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threads_per_threadgroup, threadgroups_per_grid;
  uint thread_index_in_threadgroup, simdgroup_index_in_threadgroup, thread_index_in_simdgroup;
};

// Runs fn for every thread of every threadgroup; groups run one after another, the threads of one group run
// concurrently on real OS threads, so threadgroup_barrier really blocks until the whole group has arrived.
inline void run_grid(uint3 groups, uint3 tg, const std::function<void(const ThreadCtx&)>& fn) {
  const int n = int(tg.x * tg.y * tg.z);
  Barrier in_kernel(n), between_groups(n);
  std::vector<std::thread> threads;
  for (int t = 0; t < n; ++t) {
    threads.emplace_back([&, t] {
      current_barrier = &in_kernel;
      ThreadCtx c{};
      c.threads_per_threadgroup = tg;
      c.threadgroups_per_grid = groups;
      c.thread_index_in_threadgroup = uint(t);
      c.simdgroup_index_in_threadgroup = uint(t / kSimdWidth);
      c.thread_index_in_simdgroup = uint(t % kSimdWidth);
      current_lane = t % kSimdWidth;
      c.thread_position_in_threadgroup = {uint(t) % tg.x, (uint(t) / tg.x) % tg.y, uint(t) / (tg.x * tg.y)};
      for (uint gz = 0; gz < groups.z; ++gz)
        for (uint gy = 0; gy < groups.y; ++gy)
          for (uint gx = 0; gx < groups.x; ++gx) {
            c.threadgroup_position_in_grid = {gx, gy, gz};
            c.thread_position_in_grid = {gx * tg.x + c.thread_position_in_threadgroup.x,
                                         gy * tg.y + c.thread_position_in_threadgroup.y,
                                         gz * tg.z + c.thread_position_in_threadgroup.z};
            fn(c);
            between_groups.wait("end of threadgroup (a thread returned early while others wait at a barrier?)");
          }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace smoa_shim

// Address spaces last: `thread` would otherwise erase std::thread above.
#define device
#define constant
#define thread
#define threadgroup static

inline void threadgroup_barrier(mem_flags) { smoa_shim::current_barrier->wait("threadgroup_barrier"); }
