// The batched products (semantics and why: batched_products.h): their device-generic
// forward values, their argument checks and their Autograd kernels.
//
// Each Autograd kernel is a torch::autograd::Function whose backward calls these ops
// again (through the same Functions), so that the gradients are differentiable in turn
// (a second-order meta-step differentiates the inner steps' gradients) and every
// gradient, at every order, is a product on contiguous operands:
//
//   z = x y            dx = nt(g, y)      dy = tn(x, g)
//   z = x y^T          dx = nn(g, y)      dy = tn(g, x)
//   z = x^T y          dx = nt(y, g)      dy = nn(x, g)
//   z = g w^T (outer)  dg = row_dot(G, w)          dw = weighted_row_sum(g, G)
//   z = row_dot(h, w)  dh = outer(G, w)            dw = weighted_row_sum(G, h)
//   z = wrs(g, h)      dg = row_dot(h, G)          dh = outer(g, G)
//   h = relu(z(...))   the gradients of z at dz = ReluGrad(G, h) = G 1[h > 0]
//
// with acc's gradient G itself and a bias's the sum of G over the rows.
#include "batched_products.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace treepool {
namespace products {

namespace {

void check_float(const char* op, const char* name, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "treepool.", op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "treepool.", op, ": ", name,
              " must have the dtype of the first argument (", like.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "treepool.", op, ": ", name,
              " must be on the first argument's device (", like.device(), "), got ",
              t.device());
}

void check_dims(const char* op, const char* name, const Tensor& t, int64_t dims,
                const char* shape) {
  TORCH_CHECK(t.dim() == dims, "treepool.", op, ": ", name, " must be ", shape, ", got ",
              t.sizes());
}

// x [B, ., .] and y [B, ., .] with the contraction sizes x_k and y_k equal.
void check_product(const char* op, const Tensor& x, const Tensor& y, int64_t x_k, int64_t y_k,
                   const char* x_shape, const char* y_shape) {
  check_dims(op, "x", x, 3, x_shape);
  check_dims(op, "y", y, 3, y_shape);
  check_float(op, "x", x, x);
  check_float(op, "y", y, x);
  TORCH_CHECK(y.size(0) == x.size(0) && y.size(y_k) == x.size(x_k), "treepool.", op,
              ": y must be ", y_shape, " with x's B and K (x is ", x_shape, " = ", x.sizes(),
              "), got ", y.sizes());
}

void check_row_vector(const char* op, const char* name, const Tensor& t, const Tensor& like,
                      int64_t B, int64_t K) {
  check_float(op, name, t, like);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == K, "treepool.", op, ": ", name,
              " must be [B, K] = [", B, ", ", K, "], got ", t.sizes());
}

}  // namespace

void check_row_dot(const Tensor& h, const Tensor& w) {
  check_dims("row_dot", "h", h, 3, "[B, N, K]");
  check_float("row_dot", "h", h, h);
  check_row_vector("row_dot", "w", w, h, h.size(0), h.size(2));
}

void check_weighted_row_sum(const Tensor& g, const Tensor& h) {
  check_dims("weighted_row_sum", "g", g, 2, "[B, N]");
  check_dims("weighted_row_sum", "h", h, 3, "[B, N, K]");
  check_float("weighted_row_sum", "g", g, g);
  check_float("weighted_row_sum", "h", h, g);
  TORCH_CHECK(h.size(0) == g.size(0) && h.size(1) == g.size(1), "treepool.weighted_row_sum: ",
              "h must be [B, N, K] with g's B and N (g is ", g.sizes(), "), got ", h.sizes());
}

void check_bmm_nn(const Tensor& x, const Tensor& y, const std::optional<Tensor>& acc) {
  check_product("bmm_nn", x, y, 2, 1, "[B, M, K]", "[B, K, N]");
  if (!acc) return;
  check_float("bmm_nn", "acc", *acc, x);
  TORCH_CHECK(acc->sizes() == at::IntArrayRef({x.size(0), x.size(1), y.size(2)}),
              "treepool.bmm_nn: acc must be [B, M, N] = [", x.size(0), ", ", x.size(1), ", ",
              y.size(2), "], got ", acc->sizes());
}

void check_bmm_nt(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias,
                  const char* op) {
  check_product(op, x, y, 2, 2, "[B, M, K]", "[B, N, K]");
  if (bias) check_row_vector(op, "bias", *bias, x, x.size(0), y.size(1));
}

void check_outer(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias,
                 const char* op) {
  check_dims(op, "g", g, 2, "[B, N]");
  check_float(op, "g", g, g);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == g.size(0), "treepool.", op, ": w must be [B, K] ",
              "with g's B (g is ", g.sizes(), "), got ", w.sizes());
  check_float(op, "w", w, g);
  if (bias) check_row_vector(op, "bias", *bias, g, g.size(0), w.size(1));
}

void check_bmm_tn(const Tensor& x, const Tensor& y) {
  check_product("bmm_tn", x, y, 1, 1, "[B, K, M]", "[B, K, N]");
}

Tensor bmm_nn(const Tensor& x, const Tensor& y, const std::optional<Tensor>& acc) {
  check_bmm_nn(x, y, acc);
  return acc ? at::baddbmm(*acc, x, y) : at::bmm(x, y);
}

Tensor bmm_nt(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias) {
  check_bmm_nt(x, y, bias);
  if (!bias) return at::bmm(x, y.transpose(1, 2));
  return at::baddbmm(bias->unsqueeze(1), x, y.transpose(1, 2));
}

Tensor bmm_tn(const Tensor& x, const Tensor& y) {
  check_bmm_tn(x, y);
  return at::bmm(x.transpose(1, 2), y);
}

namespace {

Tensor outer_values(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias) {
  if (!bias) return g.unsqueeze(-1) * w.unsqueeze(1);
  return at::addcmul(bias->unsqueeze(1), g.unsqueeze(-1), w.unsqueeze(1));
}

}  // namespace

Tensor outer(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias) {
  check_outer(g, w, bias);
  return outer_values(g, w, bias);
}

Tensor outer_relu(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias) {
  check_outer(g, w, bias, "outer_relu");
  return outer_values(g, w, bias).relu_();
}

Tensor row_dot_composite(const Tensor& h, const Tensor& w) {
  check_row_dot(h, w);
  return (h * w.unsqueeze(1)).sum(-1);
}

Tensor weighted_row_sum_composite(const Tensor& g, const Tensor& h) {
  check_weighted_row_sum(g, h);
  return (h * g.unsqueeze(-1)).sum(1);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

// The ops' kernels, below autograd: the CPU ones of csrc/cpu/ (small products and the
// row ops by treepool's loops), the CUDA ones of csrc/cuda/batched_products_cuda.cpp.
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel_of(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Optional = const std::optional<Tensor>&;

Tensor bmm_nn_kernel(const Tensor& x, const Tensor& y, Optional acc) {
  static const auto op = kernel_of<Tensor(const Tensor&, const Tensor&, Optional)>("treepool::bmm_nn");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, y, acc);
}

Tensor bmm_nt_kernel(const Tensor& x, const Tensor& y, Optional bias) {
  static const auto op = kernel_of<Tensor(const Tensor&, const Tensor&, Optional)>("treepool::bmm_nt");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, y, bias);
}

Tensor bmm_nt_relu_kernel(const Tensor& x, const Tensor& y, Optional bias) {
  static const auto op =
      kernel_of<Tensor(const Tensor&, const Tensor&, Optional)>("treepool::bmm_nt_relu");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, y, bias);
}

Tensor bmm_tn_kernel(const Tensor& x, const Tensor& y) {
  static const auto op = kernel_of<Tensor(const Tensor&, const Tensor&)>("treepool::bmm_tn");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, y);
}

Tensor row_dot_kernel(const Tensor& h, const Tensor& w) {
  static const auto op = kernel_of<Tensor(const Tensor&, const Tensor&)>("treepool::row_dot");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(h, w);
}

Tensor weighted_row_sum_kernel(const Tensor& g, const Tensor& h) {
  static const auto op =
      kernel_of<Tensor(const Tensor&, const Tensor&)>("treepool::weighted_row_sum");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(g, h);
}

// Function::apply takes no undefined tensor, so each optional operand has its own form.
struct NN : Function<NN> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y) {
    ctx->save_for_backward({x, y});
    return bmm_nn_kernel(x, y, std::nullopt);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g);
};
struct NNAcc : Function<NNAcc> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y, const Tensor& acc) {
    ctx->save_for_backward({x, y});
    return bmm_nn_kernel(x, y, acc);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g);
};
struct NT : Function<NT> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y) {
    ctx->save_for_backward({x, y});
    return bmm_nt_kernel(x, y, std::nullopt);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g);
};
struct NTBias : Function<NTBias> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y,
                        const Tensor& bias) {
    ctx->save_for_backward({x, y});
    return bmm_nt_kernel(x, y, bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g);
};
struct TN : Function<TN> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& y) {
    ctx->save_for_backward({x, y});
    return bmm_tn_kernel(x, y);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g);
};
struct Outer : Function<Outer> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& w) {
    ctx->save_for_backward({g, w});
    return outer(g, w, std::nullopt);
  }
  static variable_list backward(AutogradContext* ctx, variable_list G);
};
struct OuterBias : Function<OuterBias> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& w,
                        const Tensor& bias) {
    ctx->save_for_backward({g, w});
    return outer(g, w, bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list G);
};
struct RowDot : Function<RowDot> {
  static Tensor forward(AutogradContext* ctx, const Tensor& h, const Tensor& w) {
    ctx->save_for_backward({h, w});
    return row_dot_kernel(h, w);
  }
  static variable_list backward(AutogradContext* ctx, variable_list G);
};
struct WeightedRowSum : Function<WeightedRowSum> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& h) {
    ctx->save_for_backward({g, h});
    return weighted_row_sum_kernel(g, h);
  }
  static variable_list backward(AutogradContext* ctx, variable_list G);
};

// ReLU's derivative dz = g 1[h > 0] (h = relu(z), saved) as a node of its own:
// differentiated again it is the same mask on the incoming gradient, and nothing for h
// (its derivative in h is zero almost everywhere), where autograd's threshold_backward
// writes a zero tensor and adds it up the graph.
struct ReluGrad : Function<ReluGrad> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& h) {
    ctx->save_for_backward({h});
    return at::threshold_backward(g, h, 0);
  }
  static variable_list backward(AutogradContext* ctx, variable_list gg) {
    Tensor dg;
    if (ctx->needs_input_grad(0)) dg = ReluGrad::apply(gg[0], ctx->get_saved_variables()[0]);
    return {dg, Tensor()};
  }
};

// The ReLU forms save {their two operands, h}; their gradients are the product's at
// dz = ReluGrad(g, h).
Tensor relu_form(AutogradContext* ctx, Tensor (*kernel)(const Tensor&, const Tensor&, Optional),
                 const Tensor& a, const Tensor& b, Optional bias) {
  Tensor h = kernel(a, b, bias);
  ctx->save_for_backward({a, b, h});
  return h;
}

// The forward of a ReLU form on `kernel`, with and without the bias (Self gives backward).
template <typename Self, Tensor (*kernel)(const Tensor&, const Tensor&, Optional)>
struct ReluForm : Function<Self> {
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b) {
    return relu_form(ctx, kernel, a, b, std::nullopt);
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& b,
                        const Tensor& bias) {
    return relu_form(ctx, kernel, a, b, bias);
  }
};
struct NTRelu : ReluForm<NTRelu, bmm_nt_relu_kernel> {
  static variable_list backward(AutogradContext* ctx, variable_list g);
};
struct NTBiasRelu : ReluForm<NTBiasRelu, bmm_nt_relu_kernel> {
  static variable_list backward(AutogradContext* ctx, variable_list g);
};
struct OuterRelu : ReluForm<OuterRelu, outer_relu> {
  static variable_list backward(AutogradContext* ctx, variable_list G);
};
struct OuterBiasRelu : ReluForm<OuterBiasRelu, outer_relu> {
  static variable_list backward(AutogradContext* ctx, variable_list G);
};

Tensor relu_grad(AutogradContext* ctx, const Tensor& g) {
  return ReluGrad::apply(g, ctx->get_saved_variables()[2]);
}

// `grads` and the bias's (input 2), the sum of its output gradient dz over the rows.
variable_list with_bias_grad(AutogradContext* ctx, variable_list grads, const Tensor& dz) {
  grads.push_back(ctx->needs_input_grad(2) ? dz.sum(1) : Tensor());
  return grads;
}

// The gradients of x y (shared by NN and NNAcc): dx = g y^T, dy = x^T g.
variable_list product_grads(AutogradContext* ctx, const Tensor& g, size_t first) {
  const auto s = ctx->get_saved_variables();
  Tensor dx, dy;
  if (ctx->needs_input_grad(first)) dx = NT::apply(g, s[1]);
  if (ctx->needs_input_grad(first + 1)) dy = TN::apply(s[0], g);
  return {dx, dy};
}

variable_list NN::backward(AutogradContext* ctx, variable_list g) {
  return product_grads(ctx, g[0], 0);
}

variable_list NNAcc::backward(AutogradContext* ctx, variable_list g) {
  auto grads = product_grads(ctx, g[0], 0);
  grads.push_back(ctx->needs_input_grad(2) ? g[0] : Tensor());
  return grads;
}

// x y^T: dx = g y, dy = g^T x.
variable_list nt_grads(AutogradContext* ctx, const Tensor& g) {
  const auto s = ctx->get_saved_variables();
  Tensor dx, dy;
  if (ctx->needs_input_grad(0)) dx = NN::apply(g, s[1]);
  if (ctx->needs_input_grad(1)) dy = TN::apply(g, s[0]);
  return {dx, dy};
}

variable_list NT::backward(AutogradContext* ctx, variable_list g) { return nt_grads(ctx, g[0]); }

variable_list NTBias::backward(AutogradContext* ctx, variable_list g) {
  return with_bias_grad(ctx, nt_grads(ctx, g[0]), g[0]);
}

variable_list NTRelu::backward(AutogradContext* ctx, variable_list g) {
  return nt_grads(ctx, relu_grad(ctx, g[0]));
}

variable_list NTBiasRelu::backward(AutogradContext* ctx, variable_list g) {
  const Tensor dz = relu_grad(ctx, g[0]);
  return with_bias_grad(ctx, nt_grads(ctx, dz), dz);
}

// x^T y: dx = y g^T, dy = x g.
variable_list TN::backward(AutogradContext* ctx, variable_list g) {
  const auto s = ctx->get_saved_variables();
  Tensor dx, dy;
  if (ctx->needs_input_grad(0)) dx = NT::apply(s[1], g[0]);
  if (ctx->needs_input_grad(1)) dy = NN::apply(s[0], g[0]);
  return {dx, dy};
}

// g w^T per batch: dg = row_dot(G, w), dw = weighted_row_sum(g, G).
variable_list outer_grads(AutogradContext* ctx, const Tensor& G) {
  const auto s = ctx->get_saved_variables();
  Tensor dg, dw;
  if (ctx->needs_input_grad(0)) dg = RowDot::apply(G, s[1]);
  if (ctx->needs_input_grad(1)) dw = WeightedRowSum::apply(s[0], G);
  return {dg, dw};
}

variable_list Outer::backward(AutogradContext* ctx, variable_list G) {
  return outer_grads(ctx, G[0]);
}

variable_list OuterBias::backward(AutogradContext* ctx, variable_list G) {
  return with_bias_grad(ctx, outer_grads(ctx, G[0]), G[0]);
}

variable_list OuterRelu::backward(AutogradContext* ctx, variable_list G) {
  return outer_grads(ctx, relu_grad(ctx, G[0]));
}

variable_list OuterBiasRelu::backward(AutogradContext* ctx, variable_list G) {
  const Tensor dz = relu_grad(ctx, G[0]);
  return with_bias_grad(ctx, outer_grads(ctx, dz), dz);
}

variable_list RowDot::backward(AutogradContext* ctx, variable_list G) {
  const auto s = ctx->get_saved_variables();
  Tensor dh, dw;
  if (ctx->needs_input_grad(0)) dh = Outer::apply(G[0], s[1]);
  if (ctx->needs_input_grad(1)) dw = WeightedRowSum::apply(G[0], s[0]);
  return {dh, dw};
}

variable_list WeightedRowSum::backward(AutogradContext* ctx, variable_list G) {
  const auto s = ctx->get_saved_variables();
  Tensor dg, dh;
  if (ctx->needs_input_grad(0)) dg = RowDot::apply(s[1], G[0]);
  if (ctx->needs_input_grad(1)) dh = Outer::apply(s[0], G[0]);
  return {dg, dh};
}

Tensor bmm_nn_autograd(const Tensor& x, const Tensor& y, const std::optional<Tensor>& acc) {
  return acc ? NNAcc::apply(x, y, *acc) : NN::apply(x, y);
}
Tensor bmm_nt_autograd(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias) {
  return bias ? NTBias::apply(x, y, *bias) : NT::apply(x, y);
}
Tensor bmm_tn_autograd(const Tensor& x, const Tensor& y) { return TN::apply(x, y); }
Tensor outer_autograd(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias) {
  return bias ? OuterBias::apply(g, w, *bias) : Outer::apply(g, w);
}
Tensor bmm_nt_relu_autograd(const Tensor& x, const Tensor& y,
                            const std::optional<Tensor>& bias) {
  return bias ? NTBiasRelu::apply(x, y, *bias) : NTRelu::apply(x, y);
}
Tensor outer_relu_autograd(const Tensor& g, const Tensor& w, const std::optional<Tensor>& bias) {
  return bias ? OuterBiasRelu::apply(g, w, *bias) : OuterRelu::apply(g, w);
}
Tensor row_dot_autograd(const Tensor& h, const Tensor& w) { return RowDot::apply(h, w); }
Tensor weighted_row_sum_autograd(const Tensor& g, const Tensor& h) {
  return WeightedRowSum::apply(g, h);
}

}  // namespace

Tensor bmm_nt_relu(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias) {
  check_bmm_nt(x, y, bias, "bmm_nt_relu");
  return bmm_nt_kernel(x, y, bias).relu_();  // the device's bmm_nt kernel
}

}  // namespace products
}  // namespace treepool

TORCH_LIBRARY_IMPL(treepool, Autograd, m) {
  using namespace treepool::products;
  m.impl("bmm_nn", &bmm_nn_autograd);
  m.impl("bmm_nt", &bmm_nt_autograd);
  m.impl("bmm_tn", &bmm_tn_autograd);
  m.impl("outer", &outer_autograd);
  m.impl("row_dot", &row_dot_autograd);
  m.impl("weighted_row_sum", &weighted_row_sum_autograd);
  m.impl("bmm_nt_relu", &bmm_nt_relu_autograd);
  m.impl("outer_relu", &outer_relu_autograd);
}

// outer (and outer_relu) run ATen's kernels on every device, bmm_nt_relu the device's
// bmm_nt kernel and ReLU in place. The CPU kernels of the products (small
// matrices by treepool's loops, others by ATen's) are csrc/cpu/small_products_cpu.cpp,
// the row ops' csrc/cpu/row_products_cpu.cpp; the CUDA ones
// csrc/cuda/batched_products_cuda.cpp.
TORCH_LIBRARY_IMPL(treepool, CPU, m) {
  using namespace treepool::products;
  m.impl("outer", &outer);
  m.impl("bmm_nt_relu", &bmm_nt_relu);
  m.impl("outer_relu", &outer_relu);
}
