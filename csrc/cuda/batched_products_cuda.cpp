// CUDA kernels of the batched products (semantics: csrc/batched_products.h): cuBLAS's
// batched GEMM through ATen for the products, and ATen's fused broadcast-and-reduce for
// the row ops, which has none of the CPU's extra pass to save (on CUDA the learners run
// layers with one input or output feature as batched GEMMs: treepool/meta/batched_mlp.py).
#include <torch/library.h>

#include "../batched_products.h"

TORCH_LIBRARY_IMPL(treepool, CUDA, m) {
  using namespace treepool::products;
  m.impl("bmm_nn", &bmm_nn);
  m.impl("bmm_nt", &bmm_nt);
  m.impl("bmm_tn", &bmm_tn);
  m.impl("outer", &outer);
  m.impl("row_dot", &row_dot_composite);
  m.impl("weighted_row_sum", &weighted_row_sum_composite);
  m.impl("bmm_nt_relu", &bmm_nt_relu);
  m.impl("outer_relu", &outer_relu);
}
