// CPU engine of the treepool reductions (segment_sum, segment_mean, tree_update,
// reptile_update and the in-place forms) and the CPU registrations of all the ops.
// csrc/bindings.cpp has checked the arguments and filled one SegmentReduceArgs per
// tensor of the list; here they all run in the shared loop of segment_engine_cpu.h,
// once, with the op's epilogue. Half types accumulate in float.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../bindings.h"
#include "segment_engine_cpu.h"

namespace treepool {
namespace cpu {
namespace {

// A learning rate or step size: one value, or one per column.
template <typename scalar_t, typename acc_t>
struct Rate {
  acc_t value = 0;
  const scalar_t* per_column = nullptr;

  explicit Rate(const SegmentReduceArgs& a) : value(static_cast<acc_t>(a.rate)) {
    const scalar_t* t = static_cast<const scalar_t*>(a.rate_tensor);
    if (t == nullptr) return;
    if (a.rate_stride == 0)
      value = static_cast<acc_t>(t[0]);
    else
      per_column = t;
  }
};

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

template <typename scalar_t>
void reduce_typed(const std::vector<SegmentReduceArgs>& as) {
  using acc_t = at::opmath_type<scalar_t>;
  const SegmentReduceArgs& a0 = as[0];
  const Epilogue epilogue = a0.epilogue;
  const bool mean = epilogue == Epilogue::kMean;
  const int64_t T = a0.T, C = a0.C;
  const int64_t* off = a0.offsets;
  // Sums are not rescaled (their weights are taken as they are); means and updates are.
  ClusterWeights<acc_t> cw(static_cast<const scalar_t*>(a0.weights), T, off, C,
                           /*rescale=*/epilogue != Epilogue::kSum);
  std::vector<Rows<scalar_t>> xs;
  std::vector<Rate<scalar_t, acc_t>> rates;
  for (const SegmentReduceArgs& a : as) {
    xs.push_back({static_cast<const scalar_t*>(a.x), a.x_stride, a.P});
    rates.emplace_back(a);
  }
  // Row r of tensor i's output and base (node_params, theta). No __restrict__: the
  // in-place updates write their base.
  const auto out_row = [&](int64_t i, int64_t r) {
    return static_cast<scalar_t*>(as[i].out) + r * as[i].out_stride;
  };
  const auto base_row = [&](int64_t i, int64_t r) {
    return static_cast<const scalar_t*>(as[i].base) + r * as[i].base_stride;
  };
  switch (epilogue) {
    case Epilogue::kSum:
    case Epilogue::kMean:
      segment_reduce<scalar_t>(xs, T, off, C, cw.data(),
                               [&](int64_t i, int64_t c, int64_t p0, int64_t n, acc_t* acc) {
                                 if (mean) to_mean(acc, n, cw.total[c]);
                                 scalar_t* row = out_row(i, c) + p0;
                                 for (int64_t j = 0; j < n; ++j) row[j] = static_cast<scalar_t>(acc[j]);
                               });
      break;
    case Epilogue::kTreeUpdate: {
      const int64_t* par = a0.parents;
      segment_reduce<scalar_t>(xs, T, off, C, cw.data(),
                               [&](int64_t i, int64_t c, int64_t p0, int64_t n, acc_t* acc) {
                                 to_mean(acc, n, cw.total[c]);
                                 const scalar_t* from = base_row(i, par[c]) + p0;
                                 scalar_t* to = out_row(i, c) + p0;
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
      break;
    }
    case Epilogue::kReptile:
      segment_reduce<scalar_t>(xs, T, off, C, cw.data(),
                               [&](int64_t i, int64_t c, int64_t p0, int64_t n, acc_t* acc) {
                                 to_mean(acc, n, cw.total[c]);
                                 const scalar_t* from = base_row(i, c) + p0;
                                 scalar_t* to = out_row(i, c) + p0;
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
      break;
  }
}

}  // namespace

void segment_reduce_cpu(const std::vector<SegmentReduceArgs>& args) {
  if (args.empty()) return;
  dispatch_dtype(args[0].dtype, [&](auto* tag) {
    reduce_typed<std::remove_pointer_t<decltype(tag)>>(args);
  });
}

namespace {

struct CpuEngine {
  bool enter(const at::Device&) { return true; }  // the index tensors are readable here
  void reduce(const ReduceCall& call) { segment_reduce_cpu(call.args); }
  void broadcast(const BroadcastCall& call) { segment_broadcast_cpu(call.args); }
};

}  // namespace

TORCH_LIBRARY_IMPL(treepool, CPU, m) { register_ops<CpuEngine>(m); }

}  // namespace cpu
}  // namespace treepool
