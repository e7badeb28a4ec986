// CUDA bindings of the treepool ops: the torch side of the kernels of kernels.h.
// Each op checks its arguments (csrc/checks.h, the same messages as on the CPU),
// allocates its output and scratch with the caching allocator, and enqueues the
// kernels on the current stream of the tensors' device.
//
// The multi-tensor forms (`<op>_multi`, Tensor[]) run the single-tensor launchers once
// per tensor, after checking the whole list: one launch per tensor, not yet one launch
// over a table of pointers (that needs a launcher in the .cu files), and the value
// checks read the index tensors once per tensor.
//
// Value checks (offsets, parents, weights) read the index tensors on the host: they
// are copied to the CPU first, which synchronises with the stream. While the stream is
// being captured into a CUDA graph such copies are illegal, so the value checks are
// skipped there: the kernels clamp every index they read (no access is ever out of
// bounds) but the results of invalid offsets or parents are unspecified. For the same
// reason tree_update_ during capture accepts `out` overlapping node_params only when it
// is the same tensor, and then trusts the caller that parents[c] == c.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../checks.h"
#include "kernels.h"

namespace treepool {
namespace cuda {
namespace {

// Rows with unit column stride and any row stride go to the kernels as they are;
// anything else (a transposed view, a column slice with a step) is copied once.
Tensor rows_view(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "treepool: unsupported dtype ", t.scalar_type());
  }
}

// True while `stream` is being captured into a CUDA graph (no host copies allowed).
bool capturing(cudaStream_t stream) {
  return c10::cuda::captureStatusMayInitCtx(stream) != c10::cuda::CaptureStatus::None;
}

OptTensor on_host(const OptTensor& t) {
  return t ? OptTensor(t->cpu()) : std::nullopt;
}

OptTensor contiguous(const OptTensor& t) {
  return t ? OptTensor(t->contiguous()) : std::nullopt;
}

const void* data_or_null(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

// Without the parents on the host (graph capture), a tree update over a node_params
// with no rows cannot be refused by value; refuse it by shape.
void check_nodes_exist(const char* op, const Tensor& node_params, int64_t C) {
  TORCH_CHECK_VALUE(C == 0 || node_params.size(0) > 0, "treepool.", op,
                    ": node_params has no rows, so no parents[c] is in range");
}

void run_reduce(const SegmentReduceArgs& args, const Tensor& like, cudaStream_t stream) {
  const size_t bytes = segment_reduce_workspace_bytes(args);
  Tensor scratch;  // freed at return: the caching allocator orders its reuse on `stream`
  if (bytes > 0)
    scratch = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  C10_CUDA_CHECK(segment_reduce(args, bytes > 0 ? scratch.data_ptr() : nullptr, stream));
}

// The fields of SegmentReduceArgs that describe x [T, P], offsets and weights.
SegmentReduceArgs reduce_args(Epilogue epilogue, const Tensor& x, const Tensor& offsets,
                              const OptTensor& weights, int64_t C) {
  SegmentReduceArgs a;
  a.dtype = dtype_of(x);
  a.epilogue = epilogue;
  a.T = x.size(0);
  a.P = x.size(1);
  a.C = C;
  a.x = x.data_ptr();
  a.x_stride = x.stride(0);
  a.offsets = offsets.data_ptr<int64_t>();
  a.weights = data_or_null(weights);
  return a;
}

// The rate r of an update: `rate`, or rate_tensor (0-d or [P]) read on the device.
void set_rate(SegmentReduceArgs& a, double rate, const Tensor& rate_tensor) {
  a.rate = rate;
  if (rate_tensor.defined()) {
    a.rate_tensor = rate_tensor.data_ptr();
    a.rate_stride = rate_tensor.dim() == 0 ? 0 : 1;
  }
}

Tensor segment_reduce_op(const char* op, const Tensor& x_in, const Tensor& offsets_in,
                         const OptTensor& weights_in, bool mean) {
  const int64_t C = check_segments(op, "x", x_in, offsets_in, weights_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor offsets = offsets_in.contiguous();
  if (!capturing(stream)) {
    check_offsets_values(op, offsets.cpu(), x_in.size(0), "x");
    check_weights_values(op, on_host(weights_in));
  }
  const Tensor x = rows_view(x_in);
  const OptTensor weights = contiguous(weights_in);
  Tensor out = at::empty({C, x.size(1)}, x.options());
  SegmentReduceArgs a =
      reduce_args(mean ? Epilogue::kMean : Epilogue::kSum, x, offsets, weights, C);
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  run_reduce(a, x, stream);
  return out;
}

// out[c] = node_params[parents[c]] - lr * mean_c(grads), written into `out`.
void tree_update_into(Tensor& out, const Tensor& node_params_in, const Tensor& grads_in,
                      const Tensor& offsets, const Tensor& parents, const OptTensor& weights_in,
                      double lr, const OptTensor& lr_tensor, cudaStream_t stream) {
  const int64_t C = offsets.numel() - 1;
  const Tensor grads = rows_view(grads_in), node_params = rows_view(node_params_in);
  const OptTensor weights = contiguous(weights_in);
  const Tensor rate = lr_tensor ? lr_tensor->contiguous() : Tensor();
  SegmentReduceArgs a = reduce_args(Epilogue::kTreeUpdate, grads, offsets, weights, C);
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.base = node_params.data_ptr();
  a.base_stride = node_params.stride(0);
  a.base_rows = node_params.size(0);
  a.parents = parents.data_ptr<int64_t>();
  set_rate(a, lr, rate);
  run_reduce(a, grads, stream);
}

// out[c] = theta[c] + eps * (mean_c(phi) - theta[c]), written into `out` (may be theta).
void reptile_update_into(Tensor& out, const Tensor& theta_in, const Tensor& phi_in,
                         const Tensor& offsets, const OptTensor& weights_in, double eps,
                         const OptTensor& eps_tensor, cudaStream_t stream) {
  const int64_t C = offsets.numel() - 1;
  const Tensor phi = rows_view(phi_in), theta = rows_view(theta_in);
  const OptTensor weights = contiguous(weights_in);
  const Tensor rate = eps_tensor ? eps_tensor->contiguous() : Tensor();
  SegmentReduceArgs a = reduce_args(Epilogue::kReptile, phi, offsets, weights, C);
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  a.base = theta.data_ptr();
  a.base_stride = theta.stride(0);
  a.base_rows = theta.size(0);
  set_rate(a, eps, rate);
  run_reduce(a, phi, stream);
}

}  // namespace

Tensor segment_sum_cuda(const Tensor& x, const Tensor& offsets, const OptTensor& weights) {
  return segment_reduce_op("segment_sum", x, offsets, weights, /*mean=*/false);
}

Tensor segment_mean_cuda(const Tensor& x, const Tensor& offsets, const OptTensor& weights) {
  return segment_reduce_op("segment_mean", x, offsets, weights, /*mean=*/true);
}

Tensor tree_update_cuda(const Tensor& node_params, const Tensor& grads, const Tensor& offsets_in,
                        const Tensor& parents_in, const OptTensor& weights, double lr,
                        const OptTensor& lr_tensor) {
  const char* op = "tree_update";
  const int64_t C = check_tree_update_args(op, node_params, grads, offsets_in, parents_in,
                                           lr_tensor, weights);
  const c10::cuda::CUDAGuard guard(grads.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor offsets = offsets_in.contiguous(), parents = parents_in.contiguous();
  if (!capturing(stream)) {
    check_tree_update_values(op, node_params, grads, offsets.cpu(), parents.cpu(),
                             on_host(weights));
  } else {
    check_nodes_exist(op, node_params, C);
  }
  Tensor out = at::empty({C, grads.size(1)}, grads.options());
  tree_update_into(out, node_params, grads, offsets, parents, weights, lr, lr_tensor, stream);
  return out;
}

void tree_update__cuda(Tensor& out, const Tensor& node_params, const Tensor& grads,
                       const Tensor& offsets_in, const Tensor& parents_in,
                       const OptTensor& weights, double lr, const OptTensor& lr_tensor) {
  const char* op = "tree_update_";
  const int64_t C = check_tree_update_args(op, node_params, grads, offsets_in, parents_in,
                                           lr_tensor, weights);
  // `out` alone may have brought the call here: name its device before using grads'.
  if (out.device() != grads.device()) check_out(op, out, "out", grads, "grads", C);
  const c10::cuda::CUDAGuard guard(grads.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor offsets = offsets_in.contiguous(), parents = parents_in.contiguous();
  Tensor parents_host;
  if (!capturing(stream)) {
    parents_host = parents.cpu();
    check_tree_update_values(op, node_params, grads, offsets.cpu(), parents_host,
                             on_host(weights));
  } else {
    check_nodes_exist(op, node_params, C);
    // Unreadable parents: taken as the identity, so out may alias node_params only as
    // the very same tensor (any other overlap is refused as usual).
    parents_host = at::arange(C, at::TensorOptions().dtype(at::kLong));
  }
  check_tree_update_out(op, out, node_params, grads, parents_host, lr_tensor, weights, C);
  tree_update_into(out, node_params, grads, offsets, parents, weights, lr, lr_tensor, stream);
}

Tensor reptile_update_cuda(const Tensor& theta, const Tensor& phi, const Tensor& offsets_in,
                           const OptTensor& weights, double eps, const OptTensor& eps_tensor) {
  const char* op = "reptile_update";
  const int64_t C = check_reptile_update_args(op, theta, phi, offsets_in, eps_tensor, weights);
  const c10::cuda::CUDAGuard guard(phi.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor offsets = offsets_in.contiguous();
  if (!capturing(stream)) {
    check_offsets_values(op, offsets.cpu(), phi.size(0), "phi");
    check_weights_values(op, on_host(weights));
  }
  Tensor out = at::empty({C, phi.size(1)}, phi.options());
  reptile_update_into(out, theta, phi, offsets, weights, eps, eps_tensor, stream);
  return out;
}

void reptile_update__cuda(Tensor& theta, const Tensor& phi, const Tensor& offsets_in,
                          const OptTensor& weights, double eps, const OptTensor& eps_tensor) {
  const char* op = "reptile_update_";
  check_reptile_update_args(op, theta, phi, offsets_in, eps_tensor, weights);
  const c10::cuda::CUDAGuard guard(phi.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor offsets = offsets_in.contiguous();
  if (!capturing(stream)) {
    check_offsets_values(op, offsets.cpu(), phi.size(0), "phi");
    check_weights_values(op, on_host(weights));
  }
  check_reptile_update_out(op, theta, phi, eps_tensor, weights);
  reptile_update_into(theta, theta, phi, offsets, weights, eps, eps_tensor, stream);
}

// out[t] = s_t g[c(t)], s_t = w_t (or 1), divided by W_c when mean.
Tensor segment_broadcast_cuda(const Tensor& g_in, const Tensor& offsets_in,
                              const OptTensor& weights_in, bool mean, int64_t num_rows) {
  const char* op = "segment_broadcast";
  const int64_t C = check_broadcast_args(op, g_in, offsets_in, weights_in, num_rows);
  const c10::cuda::CUDAGuard guard(g_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor offsets = offsets_in.contiguous();
  if (!capturing(stream)) {
    check_offsets_values(op, offsets.cpu(), num_rows, "the output");
    check_weights_values(op, on_host(weights_in));
  }
  const Tensor g = rows_view(g_in);
  const OptTensor weights = contiguous(weights_in);
  Tensor out = at::empty({num_rows, g.size(1)}, g.options());
  if (out.numel() == 0) return out;
  if (C == 0) return out.zero_();  // rows without a cluster: only unchecked (captured) input

  SegmentBroadcastArgs a;
  a.dtype = dtype_of(g);
  a.mean = mean;
  a.T = num_rows;
  a.P = g.size(1);
  a.C = C;
  a.g = g.data_ptr();
  a.g_stride = g.stride(0);
  a.offsets = offsets.data_ptr<int64_t>();
  a.weights = data_or_null(weights);
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  const size_t bytes = segment_broadcast_workspace_bytes(a);
  Tensor scratch;
  if (bytes > 0)
    scratch = at::empty({static_cast<int64_t>(bytes)}, g.options().dtype(at::kByte));
  C10_CUDA_CHECK(segment_broadcast(a, bytes > 0 ? scratch.data_ptr() : nullptr, stream));
  return out;
}

// --- multi-tensor forms: the whole list checked, then one launch per tensor ------------

namespace {

using Tensors = std::vector<Tensor>;

OptTensor rate_at(const std::optional<at::TensorList>& rates, size_t i) {
  return rates && i < rates->size() ? OptTensor((*rates)[i]) : std::nullopt;
}

void check_tree_update_list(const char* op, at::TensorList node_params, at::TensorList grads,
                            const Tensor& offsets, const Tensor& parents,
                            const std::optional<at::TensorList>& lr, const OptTensor& weights) {
  check_same_length(op, "node_params", node_params.size(), "grads", grads.size());
  if (lr) check_same_length(op, "lr", lr->size(), "grads", grads.size());
  for (size_t i = 0; i < grads.size(); ++i)
    check_tree_update_args(op, node_params[i], grads[i], offsets, parents, rate_at(lr, i),
                           weights);
  check_list(op, "grads", grads);
  check_list(op, "node_params", node_params);
}

void check_reptile_update_list(const char* op, at::TensorList theta, at::TensorList phi,
                               const Tensor& offsets, const std::optional<at::TensorList>& eps,
                               const OptTensor& weights) {
  check_same_length(op, "theta", theta.size(), "phi", phi.size());
  if (eps) check_same_length(op, "eps", eps->size(), "phi", phi.size());
  for (size_t i = 0; i < phi.size(); ++i)
    check_reptile_update_args(op, theta[i], phi[i], offsets, rate_at(eps, i), weights);
  check_list(op, "phi", phi);
}

}  // namespace

Tensors segment_sum_multi_cuda(at::TensorList x, const Tensor& offsets, const OptTensor& weights) {
  for (const Tensor& t : x) check_segments("segment_sum", "x", t, offsets, weights);
  check_list("segment_sum", "x", x);
  Tensors out;
  for (const Tensor& t : x) out.push_back(segment_sum_cuda(t, offsets, weights));
  return out;
}

Tensors segment_mean_multi_cuda(at::TensorList x, const Tensor& offsets, const OptTensor& weights) {
  for (const Tensor& t : x) check_segments("segment_mean", "x", t, offsets, weights);
  check_list("segment_mean", "x", x);
  Tensors out;
  for (const Tensor& t : x) out.push_back(segment_mean_cuda(t, offsets, weights));
  return out;
}

Tensors segment_broadcast_multi_cuda(at::TensorList g, const Tensor& offsets,
                                     const OptTensor& weights, bool mean, int64_t num_rows) {
  for (const Tensor& t : g) check_broadcast_args("segment_broadcast", t, offsets, weights, num_rows);
  check_list("segment_broadcast", "g", g);
  Tensors out;
  for (const Tensor& t : g)
    out.push_back(segment_broadcast_cuda(t, offsets, weights, mean, num_rows));
  return out;
}

Tensors tree_update_multi_cuda(at::TensorList node_params, at::TensorList grads,
                               const Tensor& offsets, const Tensor& parents,
                               const OptTensor& weights, double lr,
                               std::optional<at::TensorList> lr_tensor) {
  check_tree_update_list("tree_update", node_params, grads, offsets, parents, lr_tensor, weights);
  Tensors out;
  for (size_t i = 0; i < grads.size(); ++i)
    out.push_back(tree_update_cuda(node_params[i], grads[i], offsets, parents, weights, lr,
                                   rate_at(lr_tensor, i)));
  return out;
}

void tree_update_multi__cuda(at::TensorList out, at::TensorList node_params, at::TensorList grads,
                             const Tensor& offsets, const Tensor& parents,
                             const OptTensor& weights, double lr,
                             std::optional<at::TensorList> lr_tensor) {
  const char* op = "tree_update_";
  check_tree_update_list(op, node_params, grads, offsets, parents, lr_tensor, weights);
  check_same_length(op, "out", out.size(), "grads", grads.size());
  for (size_t i = 0; i < out.size(); ++i) {
    check_out(op, out[i], "out", grads[i], "grads", offsets.numel() - 1);
    for (size_t k = 0; k < out.size(); ++k) {
      if (k == i) continue;
      check_no_overlap(op, "out", out[i], "grads", grads[k]);
      check_no_overlap(op, "out", out[i], "node_params", node_params[k]);
      check_no_overlap(op, "out", out[i], "out", out[k]);
    }
  }
  for (size_t i = 0; i < out.size(); ++i) {
    Tensor o = out[i];
    tree_update__cuda(o, node_params[i], grads[i], offsets, parents, weights, lr,
                      rate_at(lr_tensor, i));
  }
}

Tensors reptile_update_multi_cuda(at::TensorList theta, at::TensorList phi, const Tensor& offsets,
                                  const OptTensor& weights, double eps,
                                  std::optional<at::TensorList> eps_tensor) {
  check_reptile_update_list("reptile_update", theta, phi, offsets, eps_tensor, weights);
  Tensors out;
  for (size_t i = 0; i < phi.size(); ++i)
    out.push_back(reptile_update_cuda(theta[i], phi[i], offsets, weights, eps,
                                      rate_at(eps_tensor, i)));
  return out;
}

void reptile_update_multi__cuda(at::TensorList theta, at::TensorList phi, const Tensor& offsets,
                                const OptTensor& weights, double eps,
                                std::optional<at::TensorList> eps_tensor) {
  const char* op = "reptile_update_";
  check_reptile_update_list(op, theta, phi, offsets, eps_tensor, weights);
  for (size_t i = 0; i < theta.size(); ++i) {
    check_reptile_update_out(op, theta[i], phi[i], rate_at(eps_tensor, i), weights);
    for (size_t k = 0; k < theta.size(); ++k) {
      if (k == i) continue;
      check_no_overlap(op, "theta", theta[i], "phi", phi[k]);
      check_no_overlap(op, "theta", theta[i], "theta", theta[k]);
    }
  }
  for (size_t i = 0; i < theta.size(); ++i) {
    Tensor t = theta[i];
    reptile_update__cuda(t, phi[i], offsets, weights, eps, rate_at(eps_tensor, i));
  }
}

TORCH_LIBRARY_IMPL(treepool, CUDA, m) {
  m.impl("segment_sum_multi", &segment_sum_multi_cuda);
  m.impl("segment_mean_multi", &segment_mean_multi_cuda);
  m.impl("segment_broadcast_multi", &segment_broadcast_multi_cuda);
  m.impl("tree_update_multi", &tree_update_multi_cuda);
  m.impl("tree_update_multi_", &tree_update_multi__cuda);
  m.impl("reptile_update_multi", &reptile_update_multi_cuda);
  m.impl("reptile_update_multi_", &reptile_update_multi__cuda);

  m.impl("segment_sum", &segment_sum_cuda);
  m.impl("segment_mean", &segment_mean_cuda);
  m.impl("segment_broadcast", &segment_broadcast_cuda);
  m.impl("tree_update", &tree_update_cuda);
  m.impl("tree_update_", &tree_update__cuda);
  m.impl("reptile_update", &reptile_update_cuda);
  m.impl("reptile_update_", &reptile_update__cuda);
}

}  // namespace cuda
}  // namespace treepool
