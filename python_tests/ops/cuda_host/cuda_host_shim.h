// Host execution of the treepool CUDA kernels, for tests on machines without a GPU.
//
// The .cu files are compiled by g++ as C++ (`-x c++ -include cuda_host_shim.h`),
// against CUDA's own headers, whose host paths give dim3, cudaError_t and the
// float16 / bfloat16 conversions. This header adds what only nvcc knows:
//   - the builtins threadIdx, blockIdx, blockDim, gridDim and warpSize;
//   - __launch_bounds__ (checked by the launch instead, see csrc/cuda/launch.cuh);
//   - the warp shuffles __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync;
//   - treepool_host::launch, which launch.cuh calls in place of <<<...>>>: it checks
//     CUDA's launch limits and runs every thread of every block.
//
// Execution model. Blocks run one after the other, warps of a block one after the
// other, and the (up to 32) threads of a warp as cooperating fibers (ucontext): a
// thread runs until it ends or reaches a shuffle; when every live lane of the warp
// has stopped, the lanes waiting at a shuffle exchange their values and go on. A lane
// named in a shuffle's mask that has already exited (or never existed) makes the
// launch fail with a message (last_error), instead of hanging. Blocks share no
// memory and nothing here offers __syncthreads or __shared__, so a kernel that needs
// them does not compile here (add them when a kernel does).
//
// The order in which blocks, warps and lanes run is a runtime setting (forward,
// reverse, or shuffled with a seed), so that a test can show that a result does not
// depend on it.
#pragma once

#define TREEPOOL_HOST_SHIM 1  // launch.cuh refuses a host build without this header

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define TREEPOOL_HOST_ASAN 1
#else
#define TREEPOOL_HOST_ASAN 0
#endif

#ifdef __CUDACC__
#error "cuda_host_shim.h is for the host (g++) build of the kernels, not for nvcc"
#endif

// The launch bound is enforced by launch<kBound>() (csrc/cuda/launch.cuh).
#undef __launch_bounds__
#define __launch_bounds__(...)

// The CUDA builtins of the running thread; the scheduler below sets them.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

namespace treepool_host {

// --- settings and results of the emulation --------------------------------------

enum class Order : int { kForward = 0, kReverse = 1, kShuffled = 2 };

struct State {
  Order order = Order::kForward;
  uint64_t seed = 0;
  std::mt19937_64 rng;
  std::string last_error;  // why the last failed launch failed
  long long launches = 0;  // launches run (successfully or not)
};

inline State state;

inline void set_order(Order order, uint64_t seed) {
  state.order = order;
  state.seed = seed;
  state.rng.seed(seed);
}

// 0..n-1 in the order of the setting.
inline std::vector<int64_t> ordered(int64_t n) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[static_cast<size_t>(i)] = i;
  if (state.order == Order::kReverse) std::reverse(idx.begin(), idx.end());
  if (state.order == Order::kShuffled) std::shuffle(idx.begin(), idx.end(), state.rng);
  return idx;
}

// --- the fibers of one warp -----------------------------------------------------

constexpr int kWarp = 32;
// Kernel frames are small; sanitizer builds enlarge them a lot.
constexpr size_t kStackBytes = TREEPOOL_HOST_ASAN ? (1u << 20) : (128u << 10);

enum class LaneState { kReady, kAtShuffle, kDone };

struct Lane {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 tid;  // threadIdx of the lane
  LaneState st = LaneState::kDone;
  unsigned mask = 0;   // the mask of the shuffle it waits at
  int src = 0;         // the lane it reads from (itself when out of range)
  unsigned char value[16];   // what it offers
  unsigned char result[16];  // what it gets
  void* fake_stack = nullptr;  // ASan's bookkeeping of the lane's stack
};

struct Warp {
  Lane lanes[kWarp];
  int n = 0;           // lanes of this warp (the last warp of a block may be partial)
  int current = -1;    // the lane running now
  ucontext_t scheduler;
  const void* sched_bottom = nullptr;  // the scheduler's stack (ASan)
  size_t sched_size = 0;
  const std::function<void()>* body = nullptr;  // one thread of the kernel
};

inline Warp& warp() {
  static Warp* w = [] {
    Warp* made = new Warp();  // lives for the process: its stacks are reused
    for (Lane& l : made->lanes) l.stack.resize(kStackBytes);
    return made;
  }();
  return *w;
}

// Leaves the running lane for the scheduler (for good when `done`).
inline void lane_yield(bool done) {
  Warp& w = warp();
  Lane& l = w.lanes[w.current];
  (void)done;
#if TREEPOOL_HOST_ASAN
  __sanitizer_start_switch_fiber(done ? nullptr : &l.fake_stack, w.sched_bottom, w.sched_size);
#endif
  swapcontext(&l.ctx, &w.scheduler);
#if TREEPOOL_HOST_ASAN
  __sanitizer_finish_switch_fiber(l.fake_stack, &w.sched_bottom, &w.sched_size);
#endif
}

inline void lane_entry() {
  Warp& w = warp();
#if TREEPOOL_HOST_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
  (*w.body)();
  w.lanes[w.current].st = LaneState::kDone;
  lane_yield(/*done=*/true);  // never resumed
}

// Runs lane i until it ends or stops at a shuffle.
inline void resume(int i) {
  Warp& w = warp();
  Lane& l = w.lanes[i];
  w.current = i;
  threadIdx = l.tid;
  void* fake = nullptr;
#if TREEPOOL_HOST_ASAN
  __sanitizer_start_switch_fiber(&fake, l.stack.data(), l.stack.size());
#endif
  swapcontext(&w.scheduler, &l.ctx);
#if TREEPOOL_HOST_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  (void)fake;
}

inline void fail(std::string why) {
  if (state.last_error.empty()) state.last_error = std::move(why);
}

// Makes lane l a fiber that starts at lane_entry. Kept out of run_warp: getcontext
// returns twice, which makes g++ warn about the locals of its caller.
__attribute__((noinline)) inline void start_fiber(Lane& l) {
  getcontext(&l.ctx);
  l.ctx.uc_stack.ss_sp = l.stack.data();
  l.ctx.uc_stack.ss_size = l.stack.size();
  l.ctx.uc_link = nullptr;
  makecontext(&l.ctx, lane_entry, 0);
}

// The message for lane m, named in the mask of a shuffle that lane i waits at, which
// has exited (or does not exist in a partial warp).
__attribute__((noinline)) inline void fail_missing_lane(unsigned mask, int m, bool exists, int i) {
  char hex[16];
  std::snprintf(hex, sizeof hex, "%08x", mask);
  fail(std::string("warp shuffle with mask 0x") + hex + ": lane " + std::to_string(m) +
       (exists ? " has exited" : " does not exist") + " while lane " + std::to_string(i) +
       " waits for it (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
       ")");
}

// Runs the threads tids[0..n) as one warp; false (and last_error) on a bad shuffle.
inline bool run_warp(const std::vector<uint3>& tids, const std::function<void()>& body) {
  Warp& w = warp();
  w.n = static_cast<int>(tids.size());
  w.body = &body;
  for (int i = 0; i < w.n; ++i) {
    Lane& l = w.lanes[i];
    l.tid = tids[static_cast<size_t>(i)];
    l.st = LaneState::kReady;
    start_fiber(l);
  }
  for (int i = w.n; i < kWarp; ++i) w.lanes[i].st = LaneState::kDone;
  while (true) {
    for (int64_t i : ordered(w.n))
      if (w.lanes[i].st == LaneState::kReady) resume(static_cast<int>(i));
    // Every lane has ended or waits at a shuffle: exchange, or report a missing lane.
    bool waiting = false;
    for (int i = 0; i < w.n; ++i) {
      const Lane& l = w.lanes[i];
      if (l.st != LaneState::kAtShuffle) continue;
      waiting = true;
      for (int m = 0; m < kWarp; ++m) {
        if (!((l.mask >> m) & 1u) || (m < w.n && w.lanes[m].st == LaneState::kAtShuffle)) continue;
        fail_missing_lane(l.mask, m, m < w.n, i);
        return false;  // the waiting fibers are abandoned; their stacks are reused
      }
    }
    if (!waiting) return true;
    for (int i = 0; i < w.n; ++i) {
      Lane& l = w.lanes[i];
      if (l.st != LaneState::kAtShuffle) continue;
      const Lane& from = w.lanes[l.src];
      std::memcpy(l.result, from.st == LaneState::kAtShuffle ? from.value : l.value, sizeof l.value);
    }
    for (int i = 0; i < w.n; ++i)
      if (w.lanes[i].st == LaneState::kAtShuffle) w.lanes[i].st = LaneState::kReady;
  }
}

// The running lane offers v, waits for the warp and returns the value of lane `src`
// (its own v when src lies outside its segment of `width` lanes).
template <typename T>
T shuffle(unsigned mask, T v, int src, int width) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value,
                "shuffle of a type the emulation does not carry");
  Warp& w = warp();
  Lane& l = w.lanes[w.current];
  const int lane = w.current;
  const int seg = lane - lane % width;
  l.mask = mask;
  l.src = (src >= seg && src < seg + width) ? src : lane;
  std::memcpy(l.value, &v, sizeof v);
  l.st = LaneState::kAtShuffle;
  lane_yield(/*done=*/false);
  T out;
  std::memcpy(&out, l.result, sizeof out);
  return out;
}

inline int lane_id() { return warp().current; }

// --- the launch -------------------------------------------------------------------

inline cudaError_t launch_error(std::string why) {
  fail("launch refused: " + std::move(why));
  return cudaErrorInvalidConfiguration;
}

// Runs `thread` for every thread of the grid; the checks are CUDA's launch limits.
inline cudaError_t run_grid(dim3 grid, dim3 block, int bound,
                            const std::function<void()>& thread) {
  ++state.launches;
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || threads < 1)
    return launch_error("empty grid or block");
  if (grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u)
    return launch_error("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                        std::to_string(grid.z) + ") exceeds (2^31 - 1, 65535, 65535)");
  if (block.x > 1024u || block.y > 1024u || block.z > 64u || threads > 1024)
    return launch_error("block of " + std::to_string(threads) + " threads: at most 1024");
  if (threads > bound)
    return launch_error("block of " + std::to_string(threads) +
                        " threads exceeds the kernel's __launch_bounds__(" +
                        std::to_string(bound) + ")");
  gridDim = grid;
  blockDim = block;
  const long long nblocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  const int nwarps = static_cast<int>((threads + kWarp - 1) / kWarp);
  std::vector<uint3> tids;
  for (int64_t b : ordered(nblocks)) {
    blockIdx = make_uint3(static_cast<unsigned>(b % grid.x),
                          static_cast<unsigned>(b / grid.x % grid.y),
                          static_cast<unsigned>(b / grid.x / grid.y));
    for (int64_t wi : ordered(nwarps)) {
      tids.clear();
      for (long long t = wi * kWarp; t < threads && t < (wi + 1) * kWarp; ++t)
        tids.push_back(make_uint3(static_cast<unsigned>(t % block.x),
                                  static_cast<unsigned>(t / block.x % block.y),
                                  static_cast<unsigned>(t / block.x / block.y)));
      if (!run_warp(tids, thread)) return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

// What launch.cuh calls for kernel<<<grid, block>>>(args...): the arguments are
// converted to the kernel's parameter types once, as a launch does, and every
// thread gets its own copy.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, int bound,
                   Args&&... args) {
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  const std::function<void()> thread = [&] {
    std::tuple<std::decay_t<Params>...> copy = params;
    std::apply(kernel, copy);
  };
  return run_grid(grid, block, bound, thread);
}

}  // namespace treepool_host

// --- warp intrinsics ------------------------------------------------------------------

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = warpSize) {
  const int lane = treepool_host::lane_id();
  return treepool_host::shuffle(mask, v, lane - lane % width + src % width, width);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return treepool_host::shuffle(mask, v, treepool_host::lane_id() - static_cast<int>(delta), width);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return treepool_host::shuffle(mask, v, treepool_host::lane_id() + static_cast<int>(delta), width);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return treepool_host::shuffle(mask, v, treepool_host::lane_id() ^ lane_mask, width);
}
