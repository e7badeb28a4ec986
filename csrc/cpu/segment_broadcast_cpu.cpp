// CPU engine of segment_broadcast, the adjoint of segment_sum / segment_mean, for the
// single-tensor and the multi-tensor (`_multi`, Tensor[]) form:
//
//   out_i[t] = s_t * g_i[c(t)],  s_t = w_t (or 1), and w_t / W_c when mean (W_c = sum_{u in c} w_u)
//
// It is what the backward passes of the reductions call: the gradient of a pooled
// sum or mean is the upstream gradient broadcast back to the rows of each cluster.
// All tensors of a list run in one parallel region over (row, column block) units.
// csrc/bindings.cpp has checked the arguments and filled the structs; the ops are
// registered in segment_ops_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "segment_engine_cpu.h"

namespace treepool {
namespace cpu {
namespace {

template <typename scalar_t>
void broadcast_typed(const std::vector<SegmentBroadcastArgs>& as) {
  using acc_t = at::opmath_type<scalar_t>;
  const SegmentBroadcastArgs& a0 = as[0];
  const bool mean = a0.mean;
  const int64_t T = a0.T, C = a0.C;
  if (T == 0) return;
  // Per row: its cluster and its scale s_t (a division by W_c, never a product with
  // 1 / W_c, which overflows for tiny weights).
  const int64_t* off = a0.offsets;
  const ClusterWeights<acc_t> cw(static_cast<const scalar_t*>(a0.weights), T, off, C,
                                 /*rescale=*/mean);
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
  std::vector<scalar_t*> dst;
  std::vector<int64_t> dst_stride;
  for (const SegmentBroadcastArgs& a : as) {
    src.push_back({static_cast<const scalar_t*>(a.g), a.g_stride, a.P});
    dst.push_back(static_cast<scalar_t*>(a.out));
    dst_stride.push_back(a.out_stride);
  }
  int64_t P = 0;
  const std::vector<ColumnBlock> blocks = make_blocks(src, &P);
  const int64_t B = static_cast<int64_t>(blocks.size());
  if (P == 0) return;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::min(P, kBlock));
  at::parallel_for(0, T * B, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t t = u / B;
      const ColumnBlock& bl = blocks[u % B];
      const Rows<scalar_t>& g = src[bl.tensor];
      const scalar_t* __restrict__ from = g.data + cluster[t] * g.row_stride + bl.p0;
      scalar_t* __restrict__ to = dst[bl.tensor] + t * dst_stride[bl.tensor] + bl.p0;
      const acc_t s = scale[t];
      for (int64_t j = 0; j < bl.n; ++j) to[j] = static_cast<scalar_t>(s * static_cast<acc_t>(from[j]));
    }
  });
}

}  // namespace

void segment_broadcast_cpu(const std::vector<SegmentBroadcastArgs>& args) {
  if (args.empty()) return;
  dispatch_dtype(args[0].dtype, [&](auto* tag) {
    broadcast_typed<std::remove_pointer_t<decltype(tag)>>(args);
  });
}

}  // namespace cpu
}  // namespace treepool
