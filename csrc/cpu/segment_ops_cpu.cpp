// CPU kernels of the treepool reductions: segment_sum, segment_mean, tree_update,
// reptile_update and the in-place tree_update_ / reptile_update_, each in a single-tensor
// and a multi-tensor (`_multi`, Tensor[]) form. The single-tensor form is the list of
// one: every op is the shared loop of segment_engine_cpu.h, run once over all tensors,
// with its own epilogue. Half types accumulate in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "segment_engine_cpu.h"

namespace treepool {
namespace cpu {
namespace {

using Tensors = std::vector<Tensor>;
using OptTensors = std::vector<OptTensor>;

// The kernels take rows with unit column stride and any row stride; anything else
// (a transposed view, a column slice with a step) is copied once.
Tensor rows_view(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

Tensors rows_views(at::TensorList ts) {
  Tensors v;
  for (const Tensor& t : ts) v.push_back(rows_view(t));
  return v;
}

template <typename scalar_t>
std::vector<Rows<scalar_t>> rows_of(const Tensors& views) {
  std::vector<Rows<scalar_t>> rows;
  for (const Tensor& t : views) rows.push_back({t.data_ptr<scalar_t>(), t.stride(0), t.size(1)});
  return rows;
}

// Where row r of every tensor of a list starts, for the epilogues.
template <typename scalar_t>
struct RowPtrs {
  std::vector<scalar_t*> data;
  std::vector<int64_t> stride;

  explicit RowPtrs(const Tensors& ts) {
    for (const Tensor& t : ts) {
      data.push_back(static_cast<scalar_t*>(t.data_ptr()));
      stride.push_back(t.stride(0));
    }
  }
  scalar_t* row(int64_t i, int64_t r) const { return data[i] + r * stride[i]; }
};

// A rate given per tensor (lr_tensor, eps_tensor), or none: one entry per tensor.
OptTensors rates_of(const std::optional<at::TensorList>& rates, size_t n) {
  OptTensors r(n);
  if (rates)
    for (size_t i = 0; i < rates->size() && i < n; ++i) r[i] = (*rates)[i];
  return r;
}

// A learning rate or step size: one value, or one per column.
template <typename scalar_t, typename acc_t>
struct Rate {
  acc_t value = 0;
  Tensor holder;
  const scalar_t* per_column = nullptr;

  Rate(double rate, const OptTensor& t) : value(static_cast<acc_t>(rate)) {
    if (!t) return;
    if (t->dim() == 0) {
      value = static_cast<acc_t>(t->item<scalar_t>());
    } else {
      holder = t->contiguous();
      per_column = holder.data_ptr<scalar_t>();
    }
  }
};

template <typename scalar_t, typename acc_t>
std::vector<Rate<scalar_t, acc_t>> make_rates(double rate, const OptTensors& tensors) {
  std::vector<Rate<scalar_t, acc_t>> r;
  for (const OptTensor& t : tensors) r.emplace_back(rate, t);
  return r;
}

// acc[j] /= W_c: the block's sums become the cluster mean (0 for a cluster of zero
// weight). A division, not a product with 1 / W_c, which overflows for tiny W_c; a
// one-row unweighted cluster (W_c = 1) is left as it is.
template <typename acc_t>
inline void to_mean(acc_t* acc, int64_t n, acc_t total) {
  if (total == acc_t(1)) return;
  if (total > 0) {
    for (int64_t j = 0; j < n; ++j) acc[j] /= total;
  } else {
    std::fill(acc, acc + n, acc_t(0));
  }
}

// --- checks of the list forms ---------------------------------------------------

int64_t check_segment_list(const char* op, at::TensorList xs, const Tensor& offsets,
                           const OptTensor& weights) {
  int64_t C = 0;
  for (const Tensor& x : xs) C = check_segments(op, "x", x, offsets, weights);
  check_list(op, "x", xs);
  return C;
}

int64_t check_tree_update_list(const char* op, at::TensorList node_params, at::TensorList grads,
                               const Tensor& offsets, const Tensor& parents,
                               const OptTensors& rates, const std::optional<at::TensorList>& lr,
                               const OptTensor& weights) {
  check_same_length(op, "node_params", node_params.size(), "grads", grads.size());
  if (lr) check_same_length(op, "lr", lr->size(), "grads", grads.size());
  int64_t C = 0;
  for (size_t i = 0; i < grads.size(); ++i)
    C = check_tree_update_args(op, node_params[i], grads[i], offsets, parents, rates[i], weights);
  check_list(op, "grads", grads);
  check_list(op, "node_params", node_params);
  return C;
}

int64_t check_reptile_update_list(const char* op, at::TensorList theta, at::TensorList phi,
                                  const Tensor& offsets, const OptTensors& rates,
                                  const std::optional<at::TensorList>& eps,
                                  const OptTensor& weights) {
  check_same_length(op, "theta", theta.size(), "phi", phi.size());
  if (eps) check_same_length(op, "eps", eps->size(), "phi", phi.size());
  int64_t C = 0;
  for (size_t i = 0; i < phi.size(); ++i)
    C = check_reptile_update_args(op, theta[i], phi[i], offsets, rates[i], weights);
  check_list(op, "phi", phi);
  return C;
}

// --- the ops ----------------------------------------------------------------------

Tensors segment_reduce_op(const char* op, at::TensorList xs_in, const Tensor& offsets_in,
                          const OptTensor& weights, bool mean) {
  const int64_t C = check_segment_list(op, xs_in, offsets_in, weights);
  const Tensor offsets = offsets_in.contiguous();
  const int64_t T = xs_in[0].size(0);
  check_offsets_values(op, offsets, T, "x");
  check_weights_values(op, weights);
  const Tensors xs = rows_views(xs_in);
  Tensors outs;
  for (const Tensor& x : xs) outs.push_back(at::empty({C, x.size(1)}, x.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "treepool_segment_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* off = offsets.data_ptr<int64_t>();
    ClusterWeights<acc_t> cw(weights, off, C, /*rescale=*/mean);
    const RowPtrs<scalar_t> o(outs);
    segment_reduce<scalar_t>(rows_of<scalar_t>(xs), T, off, C, cw.data(),
                             [&](int64_t i, int64_t c, int64_t p0, int64_t n, acc_t* acc) {
                               if (mean) to_mean(acc, n, cw.total[c]);
                               scalar_t* row = o.row(i, c) + p0;
                               for (int64_t j = 0; j < n; ++j) row[j] = static_cast<scalar_t>(acc[j]);
                             });
  });
  return outs;
}

// out_i[c] = node_i[parents[c]] - lr_i * mean_c(grads_i), written into outs.
void tree_update_into(Tensors& outs, const Tensors& nodes, const Tensors& grads,
                      const Tensor& offsets, const Tensor& parents, const OptTensor& weights,
                      double lr, const OptTensors& lr_tensors) {
  const int64_t C = offsets.numel() - 1, T = grads[0].size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "treepool_tree_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* off = offsets.data_ptr<int64_t>();
    ClusterWeights<acc_t> cw(weights, off, C, /*rescale=*/true);
    const auto rates = make_rates<scalar_t, acc_t>(lr, lr_tensors);
    const int64_t* par = parents.data_ptr<int64_t>();
    const RowPtrs<scalar_t> node(nodes), o(outs);
    // No __restrict__ on node and out: tree_update_ may write node_params in place.
    segment_reduce<scalar_t>(rows_of<scalar_t>(grads), T, off, C, cw.data(),
                             [&](int64_t i, int64_t c, int64_t p0, int64_t n, acc_t* acc) {
                               to_mean(acc, n, cw.total[c]);
                               const scalar_t* from = node.row(i, par[c]) + p0;
                               scalar_t* to = o.row(i, c) + p0;
                               const Rate<scalar_t, acc_t>& rate = rates[i];
                               if (rate.per_column) {
                                 const scalar_t* r = rate.per_column + p0;
                                 for (int64_t j = 0; j < n; ++j)
                                   to[j] = static_cast<scalar_t>(static_cast<acc_t>(from[j]) -
                                                                 static_cast<acc_t>(r[j]) * acc[j]);
                               } else {
                                 const acc_t r = rate.value;
                                 for (int64_t j = 0; j < n; ++j)
                                   to[j] = static_cast<scalar_t>(static_cast<acc_t>(from[j]) - r * acc[j]);
                               }
                             });
  });
}

// out_i[c] = theta_i[c] + eps_i * (mean_c(phi_i) - theta_i[c]), into outs (may be theta).
void reptile_update_into(Tensors& outs, const Tensors& thetas, const Tensors& phis,
                         const Tensor& offsets, const OptTensor& weights, double eps,
                         const OptTensors& eps_tensors) {
  const int64_t C = offsets.numel() - 1, T = phis[0].size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, phis[0].scalar_type(), "treepool_reptile_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* off = offsets.data_ptr<int64_t>();
    ClusterWeights<acc_t> cw(weights, off, C, /*rescale=*/true);
    const auto rates = make_rates<scalar_t, acc_t>(eps, eps_tensors);
    const RowPtrs<scalar_t> th(thetas), o(outs);
    segment_reduce<scalar_t>(rows_of<scalar_t>(phis), T, off, C, cw.data(),
                             [&](int64_t i, int64_t c, int64_t p0, int64_t n, acc_t* acc) {
                               to_mean(acc, n, cw.total[c]);
                               const scalar_t* from = th.row(i, c) + p0;
                               scalar_t* to = o.row(i, c) + p0;
                               const Rate<scalar_t, acc_t>& rate = rates[i];
                               if (rate.per_column) {
                                 const scalar_t* e = rate.per_column + p0;
                                 for (int64_t j = 0; j < n; ++j) {
                                   const acc_t t0 = static_cast<acc_t>(from[j]);
                                   to[j] = static_cast<scalar_t>(t0 + static_cast<acc_t>(e[j]) * (acc[j] - t0));
                                 }
                               } else {
                                 const acc_t e = rate.value;
                                 for (int64_t j = 0; j < n; ++j) {
                                   const acc_t t0 = static_cast<acc_t>(from[j]);
                                   to[j] = static_cast<scalar_t>(t0 + e * (acc[j] - t0));
                                 }
                               }
                             });
  });
}

Tensors tree_update_impl(const char* op, at::TensorList node_params, at::TensorList grads,
                         const Tensor& offsets_in, const Tensor& parents_in,
                         const OptTensor& weights, double lr,
                         const std::optional<at::TensorList>& lr_tensor) {
  const OptTensors rates = rates_of(lr_tensor, grads.size());
  const int64_t C = check_tree_update_list(op, node_params, grads, offsets_in, parents_in, rates,
                                           lr_tensor, weights);
  const Tensor offsets = offsets_in.contiguous(), parents = parents_in.contiguous();
  check_tree_update_values(op, node_params[0], grads[0], offsets, parents, weights);
  Tensors outs;
  for (const Tensor& g : grads) outs.push_back(at::empty({C, g.size(1)}, g.options()));
  tree_update_into(outs, rows_views(node_params), rows_views(grads), offsets, parents, weights,
                   lr, rates);
  return outs;
}

void tree_update__impl(const char* op, at::TensorList out, at::TensorList node_params,
                       at::TensorList grads, const Tensor& offsets_in, const Tensor& parents_in,
                       const OptTensor& weights, double lr,
                       const std::optional<at::TensorList>& lr_tensor) {
  const OptTensors rates = rates_of(lr_tensor, grads.size());
  const int64_t C = check_tree_update_list(op, node_params, grads, offsets_in, parents_in, rates,
                                           lr_tensor, weights);
  check_same_length(op, "out", out.size(), "grads", grads.size());
  const Tensor offsets = offsets_in.contiguous(), parents = parents_in.contiguous();
  check_tree_update_values(op, node_params[0], grads[0], offsets, parents, weights);
  for (size_t i = 0; i < out.size(); ++i) {
    check_tree_update_out(op, out[i], node_params[i], grads[i], parents, rates[i], weights, C);
    // One output must not overlap another input of the list either.
    for (size_t k = 0; k < out.size(); ++k) {
      if (k == i) continue;
      check_no_overlap(op, "out", out[i], "grads", grads[k]);
      check_no_overlap(op, "out", out[i], "node_params", node_params[k]);
      check_no_overlap(op, "out", out[i], "out", out[k]);
    }
  }
  Tensors outs(out.begin(), out.end());
  tree_update_into(outs, rows_views(node_params), rows_views(grads), offsets, parents, weights,
                   lr, rates);
}

Tensors reptile_update_impl(const char* op, at::TensorList theta, at::TensorList phi,
                            const Tensor& offsets_in, const OptTensor& weights, double eps,
                            const std::optional<at::TensorList>& eps_tensor) {
  const OptTensors rates = rates_of(eps_tensor, phi.size());
  const int64_t C = check_reptile_update_list(op, theta, phi, offsets_in, rates, eps_tensor, weights);
  const Tensor offsets = offsets_in.contiguous();
  check_offsets_values(op, offsets, phi[0].size(0), "phi");
  check_weights_values(op, weights);
  Tensors outs;
  for (const Tensor& p : phi) outs.push_back(at::empty({C, p.size(1)}, p.options()));
  reptile_update_into(outs, rows_views(theta), rows_views(phi), offsets, weights, eps, rates);
  return outs;
}

void reptile_update__impl(const char* op, at::TensorList theta, at::TensorList phi,
                          const Tensor& offsets_in, const OptTensor& weights, double eps,
                          const std::optional<at::TensorList>& eps_tensor) {
  const OptTensors rates = rates_of(eps_tensor, phi.size());
  check_reptile_update_list(op, theta, phi, offsets_in, rates, eps_tensor, weights);
  const Tensor offsets = offsets_in.contiguous();
  check_offsets_values(op, offsets, phi[0].size(0), "phi");
  check_weights_values(op, weights);
  for (size_t i = 0; i < theta.size(); ++i) {
    check_reptile_update_out(op, theta[i], phi[i], rates[i], weights);
    for (size_t k = 0; k < theta.size(); ++k) {
      if (k == i) continue;
      check_no_overlap(op, "theta", theta[i], "phi", phi[k]);
      check_no_overlap(op, "theta", theta[i], "theta", theta[k]);
    }
  }
  Tensors outs(theta.begin(), theta.end());
  reptile_update_into(outs, outs, rows_views(phi), offsets, weights, eps, rates);
}

std::optional<at::TensorList> one(const OptTensor& t) {
  return t ? std::optional<at::TensorList>(at::TensorList(*t)) : std::nullopt;
}

}  // namespace

// --- single-tensor forms: the list of one ------------------------------------------

Tensor segment_sum_cpu(const Tensor& x, const Tensor& offsets, const OptTensor& weights) {
  return segment_reduce_op("segment_sum", x, offsets, weights, /*mean=*/false)[0];
}

Tensor segment_mean_cpu(const Tensor& x, const Tensor& offsets, const OptTensor& weights) {
  return segment_reduce_op("segment_mean", x, offsets, weights, /*mean=*/true)[0];
}

Tensor tree_update_cpu(const Tensor& node_params, const Tensor& grads, const Tensor& offsets,
                       const Tensor& parents, const OptTensor& weights, double lr,
                       const OptTensor& lr_tensor) {
  return tree_update_impl("tree_update", node_params, grads, offsets, parents, weights, lr,
                          one(lr_tensor))[0];
}

void tree_update__cpu(Tensor& out, const Tensor& node_params, const Tensor& grads,
                      const Tensor& offsets, const Tensor& parents, const OptTensor& weights,
                      double lr, const OptTensor& lr_tensor) {
  tree_update__impl("tree_update_", out, node_params, grads, offsets, parents, weights, lr,
                    one(lr_tensor));
}

Tensor reptile_update_cpu(const Tensor& theta, const Tensor& phi, const Tensor& offsets,
                          const OptTensor& weights, double eps, const OptTensor& eps_tensor) {
  return reptile_update_impl("reptile_update", theta, phi, offsets, weights, eps,
                             one(eps_tensor))[0];
}

void reptile_update__cpu(Tensor& theta, const Tensor& phi, const Tensor& offsets,
                         const OptTensor& weights, double eps, const OptTensor& eps_tensor) {
  reptile_update__impl("reptile_update_", theta, phi, offsets, weights, eps, one(eps_tensor));
}

// --- multi-tensor forms --------------------------------------------------------------

Tensors segment_sum_multi_cpu(at::TensorList x, const Tensor& offsets, const OptTensor& weights) {
  return segment_reduce_op("segment_sum", x, offsets, weights, /*mean=*/false);
}

Tensors segment_mean_multi_cpu(at::TensorList x, const Tensor& offsets, const OptTensor& weights) {
  return segment_reduce_op("segment_mean", x, offsets, weights, /*mean=*/true);
}

Tensors tree_update_multi_cpu(at::TensorList node_params, at::TensorList grads,
                              const Tensor& offsets, const Tensor& parents,
                              const OptTensor& weights, double lr,
                              std::optional<at::TensorList> lr_tensor) {
  return tree_update_impl("tree_update", node_params, grads, offsets, parents, weights, lr,
                          lr_tensor);
}

void tree_update_multi__cpu(at::TensorList out, at::TensorList node_params, at::TensorList grads,
                            const Tensor& offsets, const Tensor& parents,
                            const OptTensor& weights, double lr,
                            std::optional<at::TensorList> lr_tensor) {
  tree_update__impl("tree_update_", out, node_params, grads, offsets, parents, weights, lr,
                    lr_tensor);
}

Tensors reptile_update_multi_cpu(at::TensorList theta, at::TensorList phi, const Tensor& offsets,
                                 const OptTensor& weights, double eps,
                                 std::optional<at::TensorList> eps_tensor) {
  return reptile_update_impl("reptile_update", theta, phi, offsets, weights, eps, eps_tensor);
}

void reptile_update_multi__cpu(at::TensorList theta, at::TensorList phi, const Tensor& offsets,
                               const OptTensor& weights, double eps,
                               std::optional<at::TensorList> eps_tensor) {
  reptile_update__impl("reptile_update_", theta, phi, offsets, weights, eps, eps_tensor);
}

TORCH_LIBRARY_IMPL(treepool, CPU, m) {
  m.impl("segment_sum", &segment_sum_cpu);
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("tree_update", &tree_update_cpu);
  m.impl("tree_update_", &tree_update__cpu);
  m.impl("reptile_update", &reptile_update_cpu);
  m.impl("reptile_update_", &reptile_update__cpu);
  m.impl("segment_sum_multi", &segment_sum_multi_cpu);
  m.impl("segment_mean_multi", &segment_mean_multi_cpu);
  m.impl("tree_update_multi", &tree_update_multi_cpu);
  m.impl("tree_update_multi_", &tree_update_multi__cpu);
  m.impl("reptile_update_multi", &reptile_update_multi_cpu);
  m.impl("reptile_update_multi_", &reptile_update_multi__cpu);
}

}  // namespace cpu
}  // namespace treepool
