// CPU kernels of row_dot and weighted_row_sum (semantics: csrc/batched_products.h), the
// products of a linear layer with one output feature and of its derivatives:
//
//   row_dot(h, w)[b, n]          = sum_k h[b, n, k] w[b, k]
//   weighted_row_sum(g, h)[b, k] = sum_n g[b, n] h[b, n, k]
//
// Why: ATen computes both as a broadcast product and a sum, writing and reading back a
// temporary of h's size; bmm with one output column runs per-matrix GEMM calls of a
// few hundred flops each. One pass over h here: 25 against 45-57 us for row_dot on
// 256 x 10 x 64 floats, 15 against 38-49 us for weighted_row_sum (bench/RESULTS_meta.md).
// Accumulation in float for half and bfloat16 (at::opmath_type), in order over k (row_dot)
// or n (weighted_row_sum): deterministic, whatever the threads.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../batched_products.h"

namespace treepool {
namespace cpu {
namespace {

using at::Tensor;

template <typename scalar_t>
void row_dot_rows(const scalar_t* __restrict__ h, const scalar_t* __restrict__ w,
                  scalar_t* __restrict__ out, int64_t begin, int64_t end, int64_t N,
                  int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {  // row r = b * N + n
    const scalar_t* hr = h + r * K;
    const scalar_t* wb = w + (r / N) * K;
    acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) acc += acc_t(hr[k]) * acc_t(wb[k]);
    out[r] = scalar_t(acc);
  }
}

template <typename scalar_t>
void weighted_row_sum_batches(const scalar_t* __restrict__ g, const scalar_t* __restrict__ h,
                              scalar_t* __restrict__ out, int64_t begin, int64_t end,
                              int64_t N, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(K);
  for (int64_t b = begin; b < end; ++b) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    acc_t* a = acc.data();
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* hr = h + (b * N + n) * K;
      const acc_t gv = g[b * N + n];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) a[k] += gv * acc_t(hr[k]);
    }
    for (int64_t k = 0; k < K; ++k) out[b * K + k] = scalar_t(a[k]);
  }
}

Tensor row_dot_cpu(const Tensor& h_in, const Tensor& w_in) {
  products::check_row_dot(h_in, w_in);
  const Tensor h = h_in.contiguous(), w = w_in.contiguous();
  const int64_t B = h.size(0), N = h.size(1), K = h.size(2);
  Tensor out = at::empty({B, N}, h.options());
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "row_dot", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    // rows per task of the pool: about GRAIN_SIZE elements of h each (no fork for small h)
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / K);
    at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
      row_dot_rows(hp, wp, op, begin, end, N, K);
    });
  });
  return out;
}

Tensor weighted_row_sum_cpu(const Tensor& g_in, const Tensor& h_in) {
  products::check_weighted_row_sum(g_in, h_in);
  const Tensor g = g_in.contiguous(), h = h_in.contiguous();
  const int64_t B = h.size(0), N = h.size(1), K = h.size(2);
  Tensor out = at::empty({B, K}, h.options());
  if (out.numel() == 0) return out;
  if (N == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(),
                                  "weighted_row_sum", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (N * K));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      weighted_row_sum_batches(gp, hp, op, begin, end, N, K);
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace treepool

TORCH_LIBRARY_IMPL(treepool, CPU, m) {
  m.impl("row_dot", &treepool::cpu::row_dot_cpu);
  m.impl("weighted_row_sum", &treepool::cpu::weighted_row_sum_cpu);
}
