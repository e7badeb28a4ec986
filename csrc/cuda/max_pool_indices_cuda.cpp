// CUDA kernel of max_pool2d_indices (csrc/cpu/max_pool_indices_cpu.cpp has the
// semantics): ATen's CUDA max pooling already runs one thread per window without the
// CPU kernel's branch cost, so its indices are taken as they are, each plane of x
// [..., H, W] pooled as a 1-channel image.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace treepool {
namespace cuda {
namespace {

at::Tensor max_pool2d_indices_cuda(const at::Tensor& x, at::IntArrayRef kernel_size) {
  const std::vector<int64_t> sizes = check_max_pool_args("max_pool2d_indices", x, kernel_size);
  const int64_t H = x.size(-2), W = x.size(-1);
  if (x.numel() == 0) return at::empty(sizes, x.options().dtype(at::kLong));
  const at::Tensor planes = x.reshape({-1, 1, H, W});
  const auto pooled = at::max_pool2d_with_indices(planes, kernel_size, kernel_size);
  return std::get<1>(pooled).reshape(sizes);
}

}  // namespace
}  // namespace cuda
}  // namespace treepool

TORCH_LIBRARY_IMPL(treepool, CUDA, m) {
  m.impl("max_pool2d_indices", &treepool::cuda::max_pool2d_indices_cuda);
}
