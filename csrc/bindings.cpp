// The shared binding layer (bindings.h): checks once, allocates, fills the plain structs.
#include "bindings.h"

namespace treepool {
namespace {

// Rows with unit column stride and any row stride go to the engines as they are;
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

// Index tensors on the host for the value checks (no copy when already there).
OptTensor on_host(const OptTensor& t) { return t ? OptTensor(t->cpu()) : std::nullopt; }

// A rate given per tensor (lr_tensor, eps_tensor), or none: one entry per tensor.
std::vector<OptTensor> rates_of(const OptTensorList& rates, size_t n) {
  std::vector<OptTensor> r(n);
  if (rates)
    for (size_t i = 0; i < rates->size() && i < n; ++i) r[i] = (*rates)[i];
  return r;
}

// What every argument struct of a call shares: the dtype, offsets and weights.
struct Shared {
  DType dtype;
  const int64_t* offsets;
  const void* weights;
};

// offsets and weights contiguous, kept alive by the call.
template <typename Args>
Shared index_tensors(Call<Args>& call, const Tensor& x, const Tensor& offsets_in,
                           const OptTensor& weights_in) {
  const Tensor offsets = offsets_in.contiguous();
  call.keep.push_back(offsets);
  const void* w = nullptr;
  if (weights_in) {
    const Tensor weights = weights_in->contiguous();
    call.keep.push_back(weights);
    w = weights.data_ptr();
  }
  return {dtype_of(x), offsets.data_ptr<int64_t>(), w};
}

// The fields both argument structs have: shapes, dtype, offsets, weights, output.
template <typename Args>
Args common_args(const Shared& s, int64_t T, int64_t P, int64_t C, const Tensor& out) {
  Args a;
  a.dtype = s.dtype;
  a.T = T;
  a.P = P;
  a.C = C;
  a.offsets = s.offsets;
  a.weights = s.weights;
  a.out = out.data_ptr();
  a.out_stride = out.stride(0);
  return a;
}

// One tensor's SegmentReduceArgs: x [T, P], offsets, weights, the output and the rate.
SegmentReduceArgs reduce_args(ReduceCall& call, const Shared& s,
                              Epilogue epilogue, const Tensor& x_in, const Tensor& out,
                              int64_t C, double rate, const OptTensor& rate_tensor) {
  const Tensor x = rows_view(x_in);
  call.keep.push_back(x);
  auto a = common_args<SegmentReduceArgs>(s, x.size(0), x.size(1), C, out);
  a.epilogue = epilogue;
  a.x = x.data_ptr();
  a.x_stride = x.stride(0);
  a.rate = rate;
  if (rate_tensor) {
    const Tensor r = rate_tensor->contiguous();
    call.keep.push_back(r);
    a.rate_tensor = r.data_ptr();
    a.rate_stride = r.dim() == 0 ? 0 : 1;
  }
  return a;
}

// --- checks of the list forms ---------------------------------------------------

int64_t check_tree_update_list(const char* op, at::TensorList node_params, at::TensorList grads,
                               const Tensor& offsets, const Tensor& parents,
                               const std::vector<OptTensor>& rates, const OptTensorList& lr,
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
                                  const Tensor& offsets, const std::vector<OptTensor>& rates,
                                  const OptTensorList& eps, const OptTensor& weights) {
  check_same_length(op, "theta", theta.size(), "phi", phi.size());
  if (eps) check_same_length(op, "eps", eps->size(), "phi", phi.size());
  int64_t C = 0;
  for (size_t i = 0; i < phi.size(); ++i)
    C = check_reptile_update_args(op, theta[i], phi[i], offsets, rates[i], weights);
  check_list(op, "phi", phi);
  return C;
}

}  // namespace

ReduceCall prepare_segment_reduce(const char* op, at::TensorList xs, const Tensor& offsets,
                                  const OptTensor& weights, bool mean, const Enter& enter) {
  int64_t C = 0;
  for (const Tensor& x : xs) C = check_segments(op, "x", x, offsets, weights);
  check_list(op, "x", xs);
  if (enter(xs[0].device())) {
    check_offsets_values(op, offsets.contiguous().cpu(), xs[0].size(0), "x");
    check_weights_values(op, on_host(weights));
  }
  ReduceCall call;
  const auto s = index_tensors(call, xs[0], offsets, weights);
  for (const Tensor& x : xs) {
    call.outs.push_back(at::empty({C, x.size(1)}, x.options()));
    call.args.push_back(reduce_args(call, s, mean ? Epilogue::kMean : Epilogue::kSum, x,
                                    call.outs.back(), C, 1.0, std::nullopt));
  }
  return call;
}

BroadcastCall prepare_segment_broadcast(const char* op, at::TensorList gs, const Tensor& offsets,
                                        const OptTensor& weights, bool mean, int64_t num_rows,
                                        const Enter& enter) {
  int64_t C = 0;
  for (const Tensor& g : gs) C = check_broadcast_args(op, g, offsets, weights, num_rows);
  check_list(op, "g", gs);
  if (enter(gs[0].device())) {
    check_offsets_values(op, offsets.contiguous().cpu(), num_rows, "the output");
    check_weights_values(op, on_host(weights));
  }
  BroadcastCall call;
  const auto s = index_tensors(call, gs[0], offsets, weights);
  for (const Tensor& g_in : gs) {
    const Tensor g = rows_view(g_in);
    call.keep.push_back(g);
    call.outs.push_back(at::empty({num_rows, g.size(1)}, g.options()));
    auto a = common_args<SegmentBroadcastArgs>(s, num_rows, g.size(1), C, call.outs.back());
    a.mean = mean;
    a.g = g.data_ptr();
    a.g_stride = g.stride(0);
    call.args.push_back(a);
  }
  return call;
}

ReduceCall prepare_tree_update(const char* op, const OptTensorList& out,
                               at::TensorList node_params, at::TensorList grads,
                               const Tensor& offsets, const Tensor& parents_in,
                               const OptTensor& weights, double lr, const OptTensorList& lr_tensor,
                               const Enter& enter) {
  const std::vector<OptTensor> rates = rates_of(lr_tensor, grads.size());
  const int64_t C = check_tree_update_list(op, node_params, grads, offsets, parents_in, rates,
                                           lr_tensor, weights);
  if (out) {
    check_same_length(op, "out", out->size(), "grads", grads.size());
    // An `out` alone may have brought the call to this backend: name its device before
    // entering grads'.
    for (size_t i = 0; i < out->size(); ++i)
      if ((*out)[i].device() != grads[i].device())
        check_out(op, (*out)[i], "out", grads[i], "grads", C);
  }
  const Tensor parents = parents_in.contiguous();
  Tensor parents_host;
  if (enter(grads[0].device())) {
    parents_host = parents.cpu();
    check_tree_update_values(op, node_params[0], grads[0], offsets.contiguous().cpu(),
                             parents_host, on_host(weights));
  } else {
    // Without the parents on the host (CUDA graph capture), a tree update over a
    // node_params with no rows cannot be refused by value; refuse it by shape.
    TORCH_CHECK_VALUE(C == 0 || node_params[0].size(0) > 0, "treepool.", op,
                      ": node_params has no rows, so no parents[c] is in range");
    // Unreadable parents: taken as the identity, so out may alias node_params only as
    // the very same tensor (any other overlap is refused as usual).
    parents_host = at::arange(C, at::TensorOptions().dtype(at::kLong));
  }
  ReduceCall call;
  if (out) {
    for (size_t i = 0; i < out->size(); ++i) {
      const Tensor& o = (*out)[i];
      check_tree_update_out(op, o, node_params[i], grads[i], parents_host, rates[i], weights, C);
      // One output must not overlap another input of the list either.
      for (size_t k = 0; k < out->size(); ++k) {
        if (k == i) continue;
        check_no_overlap(op, "out", o, "grads", grads[k]);
        check_no_overlap(op, "out", o, "node_params", node_params[k]);
        check_no_overlap(op, "out", o, "out", (*out)[k]);
      }
    }
    call.outs.assign(out->begin(), out->end());
  } else {
    for (const Tensor& g : grads) call.outs.push_back(at::empty({C, g.size(1)}, g.options()));
  }
  call.keep.push_back(parents);
  const auto s = index_tensors(call, grads[0], offsets, weights);
  for (size_t i = 0; i < grads.size(); ++i) {
    SegmentReduceArgs a = reduce_args(call, s, Epilogue::kTreeUpdate, grads[i], call.outs[i], C,
                                      lr, rates[i]);
    const Tensor node = rows_view(node_params[i]);
    call.keep.push_back(node);
    a.base = node.data_ptr();
    a.base_stride = node.stride(0);
    a.base_rows = node.size(0);
    a.parents = parents.data_ptr<int64_t>();
    call.args.push_back(a);
  }
  return call;
}

ReduceCall prepare_reptile_update(const char* op, bool in_place, at::TensorList theta,
                                  at::TensorList phi, const Tensor& offsets,
                                  const OptTensor& weights, double eps,
                                  const OptTensorList& eps_tensor, const Enter& enter) {
  const std::vector<OptTensor> rates = rates_of(eps_tensor, phi.size());
  const int64_t C = check_reptile_update_list(op, theta, phi, offsets, rates, eps_tensor, weights);
  if (enter(phi[0].device())) {
    check_offsets_values(op, offsets.contiguous().cpu(), phi[0].size(0), "phi");
    check_weights_values(op, on_host(weights));
  }
  ReduceCall call;
  if (in_place) {
    for (size_t i = 0; i < theta.size(); ++i) {
      check_reptile_update_out(op, theta[i], phi[i], rates[i], weights);
      for (size_t k = 0; k < theta.size(); ++k) {
        if (k == i) continue;
        check_no_overlap(op, "theta", theta[i], "phi", phi[k]);
        check_no_overlap(op, "theta", theta[i], "theta", theta[k]);
      }
    }
    call.outs.assign(theta.begin(), theta.end());
  } else {
    for (const Tensor& p : phi) call.outs.push_back(at::empty({C, p.size(1)}, p.options()));
  }
  const auto s = index_tensors(call, phi[0], offsets, weights);
  for (size_t i = 0; i < phi.size(); ++i) {
    SegmentReduceArgs a =
        reduce_args(call, s, Epilogue::kReptile, phi[i], call.outs[i], C, eps, rates[i]);
    // In place, theta is the output itself (unit column stride, checked above).
    const Tensor base = in_place ? theta[i] : rows_view(theta[i]);
    call.keep.push_back(base);
    a.base = base.data_ptr();
    a.base_stride = base.stride(0);
    a.base_rows = base.size(0);
    call.args.push_back(a);
  }
  return call;
}

}  // namespace treepool
