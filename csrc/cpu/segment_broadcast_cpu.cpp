// CPU kernel of segment_broadcast, the adjoint of segment_sum / segment_mean:
//
//   out[t] = s_t * g[c(t)],  s_t = w_t (or 1), divided by W_c = sum_{u in c} w_u when mean
//
// It is what the backward passes of the reductions call: the gradient of a pooled
// sum or mean is the upstream gradient broadcast back to the rows of each cluster.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "segment_engine_cpu.h"

namespace treepool {
namespace cpu {

Tensor segment_broadcast_cpu(const Tensor& g_in, const Tensor& offsets_in,
                             const OptTensor& weights, bool mean, int64_t num_rows) {
  const char* op = "segment_broadcast";
  const int64_t C = check_broadcast_args(op, g_in, offsets_in, weights, num_rows);
  const Tensor offsets = offsets_in.contiguous();
  check_offsets_values(op, offsets, num_rows, "the output");
  check_weights_values(op, weights);
  const Tensor g = (g_in.size(1) <= 1 || g_in.stride(1) == 1) ? g_in : g_in.contiguous();
  const int64_t T = num_rows, P = g.size(1);
  Tensor out = at::empty({T, P}, g.options());
  if (T == 0 || P == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "treepool_segment_broadcast", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Per row: its cluster and its scale s_t.
    const int64_t* off = offsets.data_ptr<int64_t>();
    std::vector<int64_t> cluster(T);
    std::vector<acc_t> scale(T, acc_t(1));
    Tensor w_acc;
    if (weights) w_acc = weights->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    for (int64_t c = 0; c < C; ++c) {
      acc_t total = 0;
      for (int64_t t = off[c]; t < off[c + 1]; ++t) {
        cluster[t] = c;
        if (weights) scale[t] = w_acc.data_ptr<acc_t>()[t];
        total += scale[t];
      }
      if (mean) {
        const acc_t inv = total > 0 ? acc_t(1) / total : acc_t(0);
        for (int64_t t = off[c]; t < off[c + 1]; ++t) scale[t] *= inv;
      }
    }
    const scalar_t* src = g.data_ptr<scalar_t>();
    const int64_t src_stride = g.stride(0);
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t blocks = (P + kBlock - 1) / kBlock;
    const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::min(P, kBlock));
    at::parallel_for(0, T * blocks, grain, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t t = u / blocks, p0 = (u % blocks) * kBlock, n = std::min(kBlock, P - p0);
        const scalar_t* __restrict__ from = src + cluster[t] * src_stride + p0;
        scalar_t* __restrict__ to = dst + t * P + p0;
        const acc_t s = scale[t];
        for (int64_t j = 0; j < n; ++j) to[j] = static_cast<scalar_t>(s * static_cast<acc_t>(from[j]));
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(treepool, CPU, m) {
  m.impl("segment_broadcast", &segment_broadcast_cpu);
}

}  // namespace cpu
}  // namespace treepool
