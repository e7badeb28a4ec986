// CPU kernel of segment_broadcast, the adjoint of segment_sum / segment_mean, in a
// single-tensor and a multi-tensor (`_multi`, Tensor[]) form:
//
//   out_i[t] = s_t * g_i[c(t)],  s_t = w_t (or 1), and w_t / W_c when mean (W_c = sum_{u in c} w_u)
//
// It is what the backward passes of the reductions call: the gradient of a pooled
// sum or mean is the upstream gradient broadcast back to the rows of each cluster.
// All tensors of a list run in one parallel region over (row, column block) units.
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
namespace {

std::vector<Tensor> broadcast_op(at::TensorList gs_in, const Tensor& offsets_in,
                                 const OptTensor& weights, bool mean, int64_t num_rows) {
  const char* op = "segment_broadcast";
  int64_t C = 0;
  for (const Tensor& g : gs_in) C = check_broadcast_args(op, g, offsets_in, weights, num_rows);
  check_list(op, "g", gs_in);
  const Tensor offsets = offsets_in.contiguous();
  check_offsets_values(op, offsets, num_rows, "the output");
  check_weights_values(op, weights);
  std::vector<Tensor> gs, outs;
  for (const Tensor& g : gs_in) {
    gs.push_back((g.size(1) <= 1 || g.stride(1) == 1) ? g : g.contiguous());
    outs.push_back(at::empty({num_rows, g.size(1)}, g.options()));
  }
  const int64_t T = num_rows;
  if (T == 0) return outs;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gs[0].scalar_type(), "treepool_segment_broadcast", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Per row: its cluster and its scale s_t (a division by W_c, never a product with
    // 1 / W_c, which overflows for tiny weights).
    const int64_t* off = offsets.data_ptr<int64_t>();
    const ClusterWeights<acc_t> cw(weights, off, C, /*rescale=*/mean);
    std::vector<int64_t> cluster(T);
    std::vector<acc_t> scale(T, acc_t(1));
    for (int64_t c = 0; c < C; ++c) {
      const acc_t total = cw.total[c];
      for (int64_t t = off[c]; t < off[c + 1]; ++t) {
        cluster[t] = c;
        const acc_t w = cw.weights.empty() ? acc_t(1) : cw.weights[t];
        scale[t] = !mean ? w : (total > 0 ? w / total : acc_t(0));
      }
    }
    std::vector<Rows<scalar_t>> src;
    for (const Tensor& g : gs) src.push_back({g.data_ptr<scalar_t>(), g.stride(0), g.size(1)});
    int64_t P = 0;
    const std::vector<ColumnBlock> blocks = make_blocks(src, &P);
    const int64_t B = static_cast<int64_t>(blocks.size());
    if (P == 0) return;
    std::vector<scalar_t*> dst;
    for (const Tensor& o : outs) dst.push_back(o.data_ptr<scalar_t>());
    const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::min(P, kBlock));
    at::parallel_for(0, T * B, grain, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t t = u / B;
        const ColumnBlock& bl = blocks[u % B];
        const Rows<scalar_t>& g = src[bl.tensor];
        const scalar_t* __restrict__ from = g.data + cluster[t] * g.row_stride + bl.p0;
        scalar_t* __restrict__ to = dst[bl.tensor] + t * g.P + bl.p0;
        const acc_t s = scale[t];
        for (int64_t j = 0; j < bl.n; ++j) to[j] = static_cast<scalar_t>(s * static_cast<acc_t>(from[j]));
      }
    });
  });
  return outs;
}

}  // namespace

Tensor segment_broadcast_cpu(const Tensor& g, const Tensor& offsets, const OptTensor& weights,
                             bool mean, int64_t num_rows) {
  return broadcast_op(g, offsets, weights, mean, num_rows)[0];
}

std::vector<Tensor> segment_broadcast_multi_cpu(at::TensorList g, const Tensor& offsets,
                                                const OptTensor& weights, bool mean,
                                                int64_t num_rows) {
  return broadcast_op(g, offsets, weights, mean, num_rows);
}

TORCH_LIBRARY_IMPL(treepool, CPU, m) {
  m.impl("segment_broadcast", &segment_broadcast_cpu);
  m.impl("segment_broadcast_multi", &segment_broadcast_multi_cpu);
}

}  // namespace cpu
}  // namespace treepool
