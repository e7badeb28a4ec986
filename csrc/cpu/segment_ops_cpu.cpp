// CPU kernels of the treepool reductions: segment_sum, segment_mean, tree_update,
// reptile_update and the in-place tree_update_ / reptile_update_. Each is the shared
// loop of segment_engine_cpu.h with its own epilogue; half types accumulate in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../checks.h"
#include "segment_engine_cpu.h"

namespace treepool {
namespace cpu {
namespace {

// The kernels take rows with unit column stride and any row stride; anything else
// (a transposed view, a column slice with a step) is copied once.
Tensor rows_view(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

// Weights as acc_t, and the reciprocal of every cluster's total weight (0 for a
// cluster of zero weight, whose mean is defined as 0).
template <typename acc_t>
struct ClusterWeights {
  std::vector<acc_t> weights;  // empty when unweighted
  std::vector<acc_t> inv_total;

  ClusterWeights(const OptTensor& w, const int64_t* offsets, int64_t C) : inv_total(C) {
    if (w) {
      auto wd = w->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      weights.assign(wd.template data_ptr<acc_t>(), wd.template data_ptr<acc_t>() + wd.numel());
    }
    for (int64_t c = 0; c < C; ++c) {
      acc_t total = 0;
      if (weights.empty()) {
        total = static_cast<acc_t>(offsets[c + 1] - offsets[c]);
      } else {
        for (int64_t t = offsets[c]; t < offsets[c + 1]; ++t) total += weights[t];
      }
      inv_total[c] = total > 0 ? acc_t(1) / total : acc_t(0);
    }
  }
  const acc_t* data() const { return weights.empty() ? nullptr : weights.data(); }
};

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

// Common setup of every reduction: checked views, weights, and the engine call.
template <typename scalar_t, typename Epilogue>
void run_reduction(const Tensor& x, const Tensor& offsets, const OptTensor& weights,
                   const ClusterWeights<at::opmath_type<scalar_t>>& cw, const Epilogue& epi) {
  const Tensor xv = rows_view(x);
  segment_reduce<scalar_t>(xv.data_ptr<scalar_t>(), xv.stride(0), xv.size(0), xv.size(1),
                           offsets.data_ptr<int64_t>(), offsets.numel() - 1, cw.data(), epi);
}

Tensor segment_reduce_op(const char* op, const Tensor& x_in, const Tensor& offsets_in,
                         const OptTensor& weights, bool mean) {
  const int64_t C = check_segments(op, "x", x_in, offsets_in, weights);
  const Tensor offsets = offsets_in.contiguous();
  check_offsets_values(op, offsets, x_in.size(0), "x");
  check_weights_values(op, weights);
  Tensor out = at::empty({C, x_in.size(1)}, x_in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "treepool_segment_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ClusterWeights<acc_t> cw(weights, offsets.data_ptr<int64_t>(), C);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t P = out.size(1);
    const acc_t* inv = cw.inv_total.data();
    run_reduction<scalar_t>(x_in, offsets, weights, cw,
                            [=](int64_t c, int64_t p0, int64_t n, const acc_t* acc) {
                              scalar_t* row = o + c * P + p0;
                              const acc_t s = mean ? inv[c] : acc_t(1);  // x * 1 is exact
                              for (int64_t j = 0; j < n; ++j) row[j] = static_cast<scalar_t>(acc[j] * s);
                            });
  });
  return out;
}

// out[c] = node_params[parents[c]] - lr * mean_c(grads), written into `out`.
void tree_update_into(const char* op, Tensor& out, const Tensor& node_params_in,
                      const Tensor& grads, const Tensor& offsets, const Tensor& parents,
                      const OptTensor& weights, double lr, const OptTensor& lr_tensor) {
  const int64_t C = offsets.numel() - 1;
  const Tensor node_params = rows_view(node_params_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads.scalar_type(), "treepool_tree_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ClusterWeights<acc_t> cw(weights, offsets.data_ptr<int64_t>(), C);
    Rate<scalar_t, acc_t> rate(lr, lr_tensor);
    const acc_t* inv = cw.inv_total.data();
    const int64_t* par = parents.data_ptr<int64_t>();
    const scalar_t* node = node_params.data_ptr<scalar_t>();
    const int64_t node_stride = node_params.stride(0);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t out_stride = out.stride(0);
    // No __restrict__ on node and out: tree_update_ may write node_params in place.
    run_reduction<scalar_t>(grads, offsets, weights, cw,
                            [=, &rate](int64_t c, int64_t p0, int64_t n, const acc_t* acc) {
                              const scalar_t* from = node + par[c] * node_stride + p0;
                              scalar_t* to = o + c * out_stride + p0;
                              const acc_t s = inv[c];
                              if (rate.per_column) {
                                const scalar_t* r = rate.per_column + p0;
                                for (int64_t j = 0; j < n; ++j)
                                  to[j] = static_cast<scalar_t>(static_cast<acc_t>(from[j]) -
                                                                static_cast<acc_t>(r[j]) * (acc[j] * s));
                              } else {
                                const acc_t r = rate.value;
                                for (int64_t j = 0; j < n; ++j)
                                  to[j] = static_cast<scalar_t>(static_cast<acc_t>(from[j]) -
                                                                r * (acc[j] * s));
                              }
                            });
  });
}

// out[c] = theta[c] + eps * (mean_c(phi) - theta[c]), written into `out` (may be theta).
void reptile_update_into(const char* op, Tensor& out, const Tensor& theta_in, const Tensor& phi,
                         const Tensor& offsets, const OptTensor& weights, double eps,
                         const OptTensor& eps_tensor) {
  const int64_t C = offsets.numel() - 1;
  const Tensor theta = rows_view(theta_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, phi.scalar_type(), "treepool_reptile_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ClusterWeights<acc_t> cw(weights, offsets.data_ptr<int64_t>(), C);
    Rate<scalar_t, acc_t> rate(eps, eps_tensor);
    const acc_t* inv = cw.inv_total.data();
    const scalar_t* th = theta.data_ptr<scalar_t>();
    const int64_t th_stride = theta.stride(0);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t out_stride = out.stride(0);
    run_reduction<scalar_t>(phi, offsets, weights, cw,
                            [=, &rate](int64_t c, int64_t p0, int64_t n, const acc_t* acc) {
                              const scalar_t* from = th + c * th_stride + p0;
                              scalar_t* to = o + c * out_stride + p0;
                              const acc_t s = inv[c];
                              if (rate.per_column) {
                                const scalar_t* e = rate.per_column + p0;
                                for (int64_t j = 0; j < n; ++j) {
                                  const acc_t t0 = static_cast<acc_t>(from[j]);
                                  to[j] = static_cast<scalar_t>(t0 + static_cast<acc_t>(e[j]) * (acc[j] * s - t0));
                                }
                              } else {
                                const acc_t e = rate.value;
                                for (int64_t j = 0; j < n; ++j) {
                                  const acc_t t0 = static_cast<acc_t>(from[j]);
                                  to[j] = static_cast<scalar_t>(t0 + e * (acc[j] * s - t0));
                                }
                              }
                            });
  });
}

}  // namespace

Tensor segment_sum_cpu(const Tensor& x, const Tensor& offsets, const OptTensor& weights) {
  return segment_reduce_op("segment_sum", x, offsets, weights, /*mean=*/false);
}

Tensor segment_mean_cpu(const Tensor& x, const Tensor& offsets, const OptTensor& weights) {
  return segment_reduce_op("segment_mean", x, offsets, weights, /*mean=*/true);
}

Tensor tree_update_cpu(const Tensor& node_params, const Tensor& grads, const Tensor& offsets_in,
                       const Tensor& parents_in, const OptTensor& weights, double lr,
                       const OptTensor& lr_tensor) {
  const char* op = "tree_update";
  const int64_t C = check_tree_update_args(op, node_params, grads, offsets_in, parents_in,
                                           lr_tensor, weights);
  const Tensor offsets = offsets_in.contiguous(), parents = parents_in.contiguous();
  check_tree_update_values(op, node_params, grads, offsets, parents, weights);
  Tensor out = at::empty({C, grads.size(1)}, grads.options());
  tree_update_into(op, out, node_params, grads, offsets, parents, weights, lr, lr_tensor);
  return out;
}

void tree_update__cpu(Tensor& out, const Tensor& node_params, const Tensor& grads,
                      const Tensor& offsets_in, const Tensor& parents_in,
                      const OptTensor& weights, double lr, const OptTensor& lr_tensor) {
  const char* op = "tree_update_";
  const int64_t C = check_tree_update_args(op, node_params, grads, offsets_in, parents_in,
                                           lr_tensor, weights);
  const Tensor offsets = offsets_in.contiguous(), parents = parents_in.contiguous();
  check_tree_update_values(op, node_params, grads, offsets, parents, weights);
  check_tree_update_out(op, out, node_params, grads, parents, lr_tensor, weights, C);
  tree_update_into(op, out, node_params, grads, offsets, parents, weights, lr, lr_tensor);
}

Tensor reptile_update_cpu(const Tensor& theta, const Tensor& phi, const Tensor& offsets_in,
                          const OptTensor& weights, double eps, const OptTensor& eps_tensor) {
  const char* op = "reptile_update";
  const int64_t C = check_reptile_update_args(op, theta, phi, offsets_in, eps_tensor, weights);
  const Tensor offsets = offsets_in.contiguous();
  check_offsets_values(op, offsets, phi.size(0), "phi");
  check_weights_values(op, weights);
  Tensor out = at::empty({C, phi.size(1)}, phi.options());
  reptile_update_into(op, out, theta, phi, offsets, weights, eps, eps_tensor);
  return out;
}

void reptile_update__cpu(Tensor& theta, const Tensor& phi, const Tensor& offsets_in,
                         const OptTensor& weights, double eps, const OptTensor& eps_tensor) {
  const char* op = "reptile_update_";
  check_reptile_update_args(op, theta, phi, offsets_in, eps_tensor, weights);
  const Tensor offsets = offsets_in.contiguous();
  check_offsets_values(op, offsets, phi.size(0), "phi");
  check_weights_values(op, weights);
  check_reptile_update_out(op, theta, phi, eps_tensor, weights);
  reptile_update_into(op, theta, theta, phi, offsets, weights, eps, eps_tensor);
}

TORCH_LIBRARY_IMPL(treepool, CPU, m) {
  m.impl("segment_sum", &segment_sum_cpu);
  m.impl("segment_mean", &segment_mean_cpu);
  m.impl("tree_update", &tree_update_cpu);
  m.impl("tree_update_", &tree_update__cpu);
  m.impl("reptile_update", &reptile_update_cpu);
  m.impl("reptile_update_", &reptile_update__cpu);
}

}  // namespace cpu
}  // namespace treepool
