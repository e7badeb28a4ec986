// CUDA registrations of the treepool ops: the engine of csrc/bindings.h over the
// launchers of kernels.h. csrc/bindings.cpp checks the arguments (the same messages as
// on the CPU), allocates the outputs and fills the argument structs; here the engine
// makes the tensors' device current, allocates the scratch with the caching allocator
// and enqueues the kernels on the device's current stream.
//
// The multi-tensor forms (`<op>_multi`, Tensor[]) are checked once as a whole and run
// as one launch per 16 tensors of the list (a table of pointers and sizes; kernels.h),
// with one scratch buffer for the whole list.
//
// Value checks (offsets, parents, weights) read the index tensors on the host: they
// are copied to the CPU first, which synchronises with the stream. While the stream is
// being captured into a CUDA graph such copies are illegal, so `enter` says the values
// are unreadable and the checks are skipped: the kernels clamp every index they read
// (no access is ever out of bounds) but the results of invalid offsets or parents are
// unspecified. For the same reason tree_update_ during capture accepts `out`
// overlapping node_params only when it is the same tensor, and then trusts the caller
// that parents[c] == c.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../bindings.h"
#include "kernels.h"

namespace treepool {
namespace cuda {
namespace {

// Device scratch of `bytes` on like's device (an undefined tensor for 0), freed when
// the call returns: the caching allocator orders its reuse on the stream.
Tensor scratch(size_t bytes, const Tensor& like) {
  return bytes > 0 ? at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte))
                   : Tensor();
}

void* data_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

struct CudaEngine {
  c10::cuda::OptionalCUDAGuard guard;
  cudaStream_t stream = nullptr;

  // The device of the data becomes current; its values are readable on the host
  // unless the stream is being captured into a CUDA graph.
  bool enter(const at::Device& device) {
    guard.set_device(device);
    stream = c10::cuda::getCurrentCUDAStream();
    return c10::cuda::captureStatusMayInitCtx(stream) == c10::cuda::CaptureStatus::None;
  }

  void reduce(const ReduceCall& call) {
    const int64_t n = static_cast<int64_t>(call.args.size());
    if (n == 0) return;
    const Tensor work = scratch(segment_reduce_workspace_bytes(call.args.data(), n), call.outs[0]);
    C10_CUDA_CHECK(segment_reduce(call.args.data(), n, data_or_null(work), stream));
  }

  void broadcast(const BroadcastCall& call) {
    const int64_t n = static_cast<int64_t>(call.args.size());
    if (n == 0) return;
    if (call.args[0].C == 0) {  // rows without a cluster: only unchecked (captured) input
      for (const Tensor& out : call.outs) out.zero_();
      return;
    }
    const Tensor work =
        scratch(segment_broadcast_workspace_bytes(call.args.data(), n), call.outs[0]);
    C10_CUDA_CHECK(segment_broadcast(call.args.data(), n, data_or_null(work), stream));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(treepool, CUDA, m) { register_ops<CudaEngine>(m); }

}  // namespace cuda
}  // namespace treepool
