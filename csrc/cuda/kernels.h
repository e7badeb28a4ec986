// Launchers of the treepool CUDA kernels: plain C++ types only (raw pointers, int64_t
// sizes and strides, a dtype enum of our own, a cudaStream_t), so that the .cu files
// build with plain `nvcc -c` and no torch headers. bindings_cuda.cpp is the torch side.
//
// The argument structs and their layout are csrc/segment_args.h's (the CPU engine takes
// the same); here every pointer is a device pointer.
//
// Robustness: the kernels never read or write out of bounds, whatever the values of
// offsets and parents (they are clamped into range on the device), so that the
// binding may skip its value checks where it cannot read them (CUDA graph capture).
// With invalid values the results are unspecified, but memory stays safe; a fuzz of
// invalid offsets and parents under AddressSanitizer and UBSan tests this
// (python_tests/ops/test_cuda_host_sanitizers.py, the kernels built for the host).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../segment_args.h"

namespace treepool {
namespace cuda {

using treepool::DType;
using treepool::Epilogue;
using treepool::SegmentBroadcastArgs;
using treepool::SegmentReduceArgs;

// Every launcher takes a list of n argument structs, one per tensor of a multi-tensor
// op (n = 1 for the single-tensor op). They share the dtype, T, C, offsets and weights
// (and epilogue, parents, base_rows / mean); each has its own buffers, strides, P and
// scalar rate. The list runs as one launch per kMaxTensorsPerLaunch tensors (a table
// of pointers and sizes passed as a kernel parameter), plus one small launch when
// weights are rescaled for a mean (cluster_weights.cuh).
constexpr int64_t kMaxTensorsPerLaunch = 16;

// Bytes of device scratch segment_reduce needs for these shapes (0: pass nullptr).
// The scratch must be 256-byte aligned (any caching-allocator block is).
size_t segment_reduce_workspace_bytes(const SegmentReduceArgs* args, int64_t n);

// Enqueues the reduction on `stream`. Nothing is launched when C == 0 or every P is 0.
// cudaErrorInvalidValue when the shared fields differ or a needed pointer is null.
cudaError_t segment_reduce(const SegmentReduceArgs* args, int64_t n, void* workspace,
                           cudaStream_t stream);

size_t segment_broadcast_workspace_bytes(const SegmentBroadcastArgs* args, int64_t n);

// Enqueues the broadcast on `stream`. Nothing is launched when T or C is 0 or every P
// is 0.
cudaError_t segment_broadcast(const SegmentBroadcastArgs* args, int64_t n, void* workspace,
                              cudaStream_t stream);

// The single-tensor forms: a list of one.
inline size_t segment_reduce_workspace_bytes(const SegmentReduceArgs& args) {
  return segment_reduce_workspace_bytes(&args, 1);
}
inline cudaError_t segment_reduce(const SegmentReduceArgs& args, void* workspace,
                                  cudaStream_t stream) {
  return segment_reduce(&args, 1, workspace, stream);
}
inline size_t segment_broadcast_workspace_bytes(const SegmentBroadcastArgs& args) {
  return segment_broadcast_workspace_bytes(&args, 1);
}
inline cudaError_t segment_broadcast(const SegmentBroadcastArgs& args, void* workspace,
                                     cudaStream_t stream) {
  return segment_broadcast(&args, 1, workspace, stream);
}

}  // namespace cuda
}  // namespace treepool
