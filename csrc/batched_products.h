// The batched products of the learners' plain-MLP path (treepool/meta/batched_mlp.py,
// factored.py), a batch B of tasks or tree nodes, each with its own matrices:
//
//   bmm_nn(x, y, acc?)        out[b] = acc[b] + x[b] y[b]        x [B, M, K], y [B, K, N]
//   bmm_nt(x, y, bias?)       out[b] = x[b] y[b]^T + bias[b]     x [B, M, K], y [B, N, K]
//   bmm_tn(x, y)              out[b] = x[b]^T y[b]               x [B, K, M], y [B, K, N]
//   outer(g, w, bias?)        out[b, n, k] = g[b, n] w[b, k] + bias[b, k]   (a layer with
//                                                                one input feature)
//   row_dot(h, w)             out[b, n] = sum_k h[b, n, k] w[b, k]          (one output)
//   weighted_row_sum(g, h)    out[b, k] = sum_n g[b, n] h[b, n, k]
//   bmm_nt_relu(x, y, bias?)  relu(bmm_nt(x, y, bias))     a hidden layer and its ReLU
//   outer_relu(g, w, bias?)   relu(outer(g, w, bias))      (the ReLU in place on the
//                                                           product's fresh output)
//
// Why ops and not torch.bmm: their Autograd kernels (batched_products.cpp) choose how
// every gradient is computed, in the operands' own layout. Autograd's rule for
// torch.bmm on a transposed view (x @ W^T, a linear layer) returns the view's gradient
// as a product in the transposed layout; in a second-order meta-step that gradient is
// then added to contiguous ones (a strided add, 3-4x a contiguous one) and fed to the
// next products (the small per-task products: 4x slower in that orientation). The
// three products and their derivatives close over {nn, nt, tn}: every gradient here
// is one of them on contiguous operands. The row ops replace ATen's multiply-then-sum
// (two passes and a temporary) by one pass (csrc/cpu/row_products_cpu.cpp), and their
// derivatives close over {outer, row_dot, weighted_row_sum}. The ReLU forms save the
// second-order meta-step a pass and a node per layer, and their derivative
// g 1[h > 0], differentiated again, gives no zero tensor for h (autograd's
// threshold_backward writes one and adds it up the graph).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace treepool {
namespace products {

using at::Tensor;

// The forward values, on any device (ATen's products); the CPU kernels of the
// products are in csrc/cpu/small_products_cpu.cpp (small matrices), the row ops' in
// csrc/cpu/row_products_cpu.cpp.
Tensor bmm_nn(const Tensor& x, const Tensor& y, const std::optional<Tensor>& acc);
Tensor bmm_nt(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias);
Tensor bmm_tn(const Tensor& x, const Tensor& y);
Tensor outer(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias);
Tensor row_dot_composite(const Tensor& h, const Tensor& w);
Tensor weighted_row_sum_composite(const Tensor& g, const Tensor& h);
// The ReLU forms on any device: the product's kernel for the device, then ReLU in place.
Tensor bmm_nt_relu(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias);
Tensor outer_relu(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias);

// Argument checks (a clear message naming the argument; shared by every kernel).
void check_bmm_nn(const Tensor& x, const Tensor& y, const std::optional<Tensor>& acc);
void check_bmm_nt(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias,
                  const char* op = "bmm_nt");
void check_outer(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias,
                 const char* op = "outer");
void check_bmm_tn(const Tensor& x, const Tensor& y);
void check_row_dot(const Tensor& h, const Tensor& w);
void check_weighted_row_sum(const Tensor& g, const Tensor& h);

}  // namespace products
}  // namespace treepool
