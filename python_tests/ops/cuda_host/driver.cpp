// C entry points of the host build of the CUDA kernels, for ctypes (test_cuda_host.py).
//
// Each launcher of csrc/cuda/kernels.h is exposed as it is: it takes an array of n
// argument structs (one per tensor of a multi-tensor op; mirrored field by field by a
// ctypes.Structure in the test, whose size is checked against tp_host_sizeof_*) and
// host pointers as device pointers.
// To cover a new launcher: add its workspace-size and launch wrappers and a sizeof
// here, and the matching Structure and calls in the test.
#include <cstddef>
#include <cstdint>
#include <string>

#include "../../../csrc/cuda/kernels.h"

using treepool::cuda::SegmentBroadcastArgs;
using treepool::cuda::SegmentReduceArgs;

extern "C" {

size_t tp_host_sizeof_reduce_args() { return sizeof(SegmentReduceArgs); }
size_t tp_host_sizeof_broadcast_args() { return sizeof(SegmentBroadcastArgs); }

size_t tp_host_segment_reduce_workspace_bytes(const SegmentReduceArgs* a, int64_t n) {
  return treepool::cuda::segment_reduce_workspace_bytes(a, n);
}

int tp_host_segment_reduce(const SegmentReduceArgs* a, int64_t n, void* workspace) {
  return static_cast<int>(treepool::cuda::segment_reduce(a, n, workspace, nullptr));
}

size_t tp_host_segment_broadcast_workspace_bytes(const SegmentBroadcastArgs* a, int64_t n) {
  return treepool::cuda::segment_broadcast_workspace_bytes(a, n);
}

int tp_host_segment_broadcast(const SegmentBroadcastArgs* a, int64_t n, void* workspace) {
  return static_cast<int>(treepool::cuda::segment_broadcast(a, n, workspace, nullptr));
}

// The emulation: block / warp / lane order (0 forward, 1 reverse, 2 shuffled with
// `seed`), the launches run so far, and the message of the last failed launch
// (cleared by reading it).
void tp_host_set_order(int order, uint64_t seed) {
  treepool_host::set_order(static_cast<treepool_host::Order>(order), seed);
}

long long tp_host_launch_count() { return treepool_host::state.launches; }

const char* tp_host_take_error() {
  static std::string last;
  last = treepool_host::state.last_error;
  treepool_host::state.last_error.clear();
  return last.c_str();
}

}  // extern "C"
