// The one launch site of every treepool kernel: launch<kBound>(kernel, grid, block,
// stream, args...) enqueues `kernel` and returns the launch error.
//
// Under nvcc it is the `<<<grid, block, 0, stream>>>` launch. In the host build of
// the tests (python_tests/ops/cuda_host: the .cu files compiled by g++ with -x c++ and
// a shim header force-included) it runs the launch on the CPU as a loop over every
// block and thread, through treepool_host::launch of that shim. Either way the
// kernel source is the same, so there is a single copy of every kernel.
//
// kBound is the kernel's __launch_bounds__: a block of more threads is refused here
// (cudaErrorInvalidConfiguration) on the device as on the host, before it can fail
// as a launch with too few registers per thread.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#if !defined(__CUDACC__) && !defined(TREEPOOL_HOST_SHIM)
#error "launch.cuh: compile the .cu files with nvcc, or with g++ -x c++ and -include python_tests/ops/cuda_host/cuda_host_shim.h"
#endif

namespace treepool {
namespace cuda {
namespace detail {

template <int kBound, typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args&&... args) {
  if (static_cast<long long>(block.x) * block.y * block.z > kBound)
    return cudaErrorInvalidConfiguration;
#ifdef __CUDACC__
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#else
  (void)stream;  // the host emulation runs the launch at once
  return treepool_host::launch(kernel, grid, block, kBound, std::forward<Args>(args)...);
#endif
}

}  // namespace detail
}  // namespace cuda
}  // namespace treepool
