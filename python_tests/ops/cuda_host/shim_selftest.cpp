// Kernels that test the host emulation itself (cuda_host_shim.h), through the same
// launch<kBound>() as the treepool kernels: the launch limits, the warp shuffles, and
// a lane that exits while the others shuffle (which must be reported, not hang).
#include <cstdint>

#include "../../../csrc/cuda/launch.cuh"

namespace {

using treepool::cuda::detail::launch;

constexpr int kBound = 256;

// out[global thread] = 1: shows which threads ran.
__global__ void __launch_bounds__(kBound) mark_kernel(int* out) {
  const long long block = blockIdx.x + static_cast<long long>(gridDim.x) * blockIdx.y;
  const long long tid = threadIdx.x + static_cast<long long>(blockDim.x) * threadIdx.y;
  out[block * blockDim.x * blockDim.y + tid] = 1;
}

// out[lane] = the sum of lanes' values over the warp, by a shuffle-down tree, and the
// values of the other three shuffles.
__global__ void __launch_bounds__(kBound) shuffle_kernel(int* out, int exit_from) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (lane >= exit_from) return;  // exit_from < 32: those lanes leave before shuffling
  int s = lane;
  for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffffu, s, o);
  out[4 * lane + 0] = s;
  out[4 * lane + 1] = __shfl_up_sync(0xffffffffu, lane * 10, 1);
  out[4 * lane + 2] = __shfl_xor_sync(0xffffffffu, lane * 10, 3);
  out[4 * lane + 3] = __shfl_sync(0xffffffffu, lane * 10, 5);
}

}  // namespace

extern "C" {

// Launches mark_kernel on grid (gx, gy) with blocks (bx, by); returns the error.
int tp_selftest_mark(int* out, unsigned gx, unsigned gy, unsigned bx, unsigned by) {
  return static_cast<int>(launch<kBound>(mark_kernel, dim3(gx, gy), dim3(bx, by), nullptr, out));
}

// The same with a bound of 1024 passed to the emulation directly (block > 1024).
int tp_selftest_mark_unbounded(int* out, unsigned bx) {
  return static_cast<int>(treepool_host::launch(mark_kernel, dim3(1), dim3(bx), 1 << 20, out));
}

// One warp of shuffle_kernel; lanes >= exit_from exit first.
int tp_selftest_shuffle(int* out, int exit_from) {
  return static_cast<int>(launch<kBound>(shuffle_kernel, dim3(1), dim3(32), nullptr, out,
                                         exit_from));
}

}  // extern "C"
