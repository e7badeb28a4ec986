// CPU kernels of bmm_nn, bmm_nt and bmm_tn (semantics: csrc/batched_products.h): the
// batch's small matrices by register-tiled loops, everything else by ATen's bmm.
//
// Why: a factored leaf (treepool/meta/factored.py) multiplies every task's rows by its
// own low-rank terms, e.g. [256, 10, 64] x [256, 10, 64]^T and [256, 10, 10] x
// [256, 10, 64]. ATen runs such a batch as one BLAS call per matrix (a few thousand
// multiply-adds each), at 20-40 GFLOP/s here; the loops below, one pass over the batch
// with the products' rows kept in AVX2 registers, take about half the time (74 against
// 158 us and 39 against 81 us for those two on this machine, 1 thread; bench/RESULTS_meta.md).
//
// The loops run for float32 on x86-64 CPUs with AVX2 and FMA (checked at run time; the
// functions are compiled for that target alone), contiguous operands, and matrices of
// at most SMALL_PRODUCT_MACS multiply-adds (nt: and at most SMALL_NT_COLUMNS output
// columns); else ATen's bmm (MKL) runs, which is faster on larger matrices. Two tiles:
//
//   rows:  out[i, j:j+16] = init + sum_k a(i, k) y[k, j:j+16]   for 4 rows i at a time
//          (nn: a(i, k) = x[i, k]; tn: a(i, k) = x[k, i]), y's rows contiguous;
//   dots:  out[i, j] = sum_k x[i, k] y[j, k]   for 2 x 5 (i, j) at a time, 8 k per FMA
//          (nt: both operands' rows contiguous along k).
//
// Each output element is summed in a fixed order whatever the threads: deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../batched_products.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TREEPOOL_SMALL_PRODUCTS 1
#else
#define TREEPOOL_SMALL_PRODUCTS 0
#endif

namespace treepool {
namespace cpu {
namespace {

using at::Tensor;

// Above this many multiply-adds per matrix ATen's bmm is faster (measured for 256
// matrices [10, 64] x [64, 64] (nn, 41k each): 268 against 409 us; [10, 64]^T x
// [10, 64] (tn, 41k): 222 against 350 us; 16 of [160, 64] x [64, 64]^T, 655k: 1.9x slower).
constexpr int64_t SMALL_PRODUCT_MACS = 64 * 64 * 16;
// The dot tiles of nt reduce every output across a vector (a few ops per output): they
// win for few output columns, ATen's bmm beyond (per matrix [10, 64] x [64, 64]^T: 472
// against 372 us for 256 matrices; [10, 64] x [10, 64]^T: 78 against 160 us).
constexpr int64_t SMALL_NT_COLUMNS = 16;

#if TREEPOOL_SMALL_PRODUCTS

#define TREEPOOL_AVX2 __attribute__((target("avx2,fma")))
typedef float f8 __attribute__((vector_size(32), aligned(4)));  // 8 floats, unaligned loads

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();  // idempotent; needed should this run before libgcc's constructor
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}

// R rows of out (row stride ldo) = a(r, k) y[k, :] (+ init's rows, stride ldi), with
// a(r, k) = x[r * sxi + k * sxk] and y [K, N] of row stride ldy.
template <int R>
TREEPOOL_AVX2 inline void row_tile(const float* x, int64_t sxi, int64_t sxk, const float* y,
                                   int64_t ldy, float* out, int64_t ldo, const float* init,
                                   int64_t ldi, int64_t K, int64_t N) {
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) {
    f8 lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      lo[r] = init ? *(const f8*)(init + r * ldi + j) : f8{};
      hi[r] = init ? *(const f8*)(init + r * ldi + j + 8) : f8{};
    }
    for (int64_t k = 0; k < K; ++k) {
      const f8 y_lo = *(const f8*)(y + k * ldy + j), y_hi = *(const f8*)(y + k * ldy + j + 8);
      for (int r = 0; r < R; ++r) {
        const float a = x[r * sxi + k * sxk];
        lo[r] += a * y_lo;
        hi[r] += a * y_hi;
      }
    }
    for (int r = 0; r < R; ++r) {
      *(f8*)(out + r * ldo + j) = lo[r];
      *(f8*)(out + r * ldo + j + 8) = hi[r];
    }
  }
  for (; j + 8 <= N; j += 8) {
    f8 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = init ? *(const f8*)(init + r * ldi + j) : f8{};
    for (int64_t k = 0; k < K; ++k) {
      const f8 yv = *(const f8*)(y + k * ldy + j);
      for (int r = 0; r < R; ++r) acc[r] += x[r * sxi + k * sxk] * yv;
    }
    for (int r = 0; r < R; ++r) *(f8*)(out + r * ldo + j) = acc[r];
  }
  for (; j < N; ++j) {
    for (int r = 0; r < R; ++r) {
      float acc = init ? init[r * ldi + j] : 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[r * sxi + k * sxk] * y[k * ldy + j];
      out[r * ldo + j] = acc;
    }
  }
}

// One matrix: out [M, N] = a [M, K] y [K, N] (+ init [M, N]), a(i, k) = x[i * sxi + k * sxk].
TREEPOOL_AVX2 void rows_product(const float* x, int64_t sxi, int64_t sxk, const float* y,
                                float* out, const float* init, int64_t M, int64_t K,
                                int64_t N) {
  int64_t i = 0;
  auto at_row = [&](int64_t row) { return init ? init + row * N : nullptr; };
  for (; i + 4 <= M; i += 4)
    row_tile<4>(x + i * sxi, sxi, sxk, y, N, out + i * N, N, at_row(i), N, K, N);
  switch (M - i) {
    case 3: row_tile<3>(x + i * sxi, sxi, sxk, y, N, out + i * N, N, at_row(i), N, K, N); break;
    case 2: row_tile<2>(x + i * sxi, sxi, sxk, y, N, out + i * N, N, at_row(i), N, K, N); break;
    case 1: row_tile<1>(x + i * sxi, sxi, sxk, y, N, out + i * N, N, at_row(i), N, K, N); break;
    default: break;
  }
}

TREEPOOL_AVX2 inline float sum8(f8 v) {
  typedef float f4 __attribute__((vector_size(16)));
  const f4 half = f4{v[0], v[1], v[2], v[3]} + f4{v[4], v[5], v[6], v[7]};
  return (half[0] + half[2]) + (half[1] + half[3]);
}

// R x C outputs out[r, c] = sum_k x[r, k] y[c, k] (+ bias[c]), x and y rows of K floats.
template <int R, int C>
TREEPOOL_AVX2 inline void dot_tile(const float* x, const float* y, const float* bias,
                                   int64_t K, float* out, int64_t ldo) {
  f8 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = f8{};
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    f8 xv[R], yv[C];
    for (int r = 0; r < R; ++r) xv[r] = *(const f8*)(x + r * K + k);
    for (int c = 0; c < C; ++c) yv[c] = *(const f8*)(y + c * K + k);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] += xv[r] * yv[c];
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float s = sum8(acc[r][c]);
      for (int64_t kk = k; kk < K; ++kk) s += x[r * K + kk] * y[c * K + kk];
      out[r * ldo + c] = bias ? s + bias[c] : s;
    }
  }
}

template <int R>
TREEPOOL_AVX2 inline void dot_rows(const float* x, const float* y, const float* bias, int64_t K,
                                   int64_t N, float* out) {
  int64_t j = 0;
  auto at_col = [&](int64_t col) { return bias ? bias + col : nullptr; };
  for (; j + 5 <= N; j += 5) dot_tile<R, 5>(x, y + j * K, at_col(j), K, out + j, N);
  switch (N - j) {
    case 4: dot_tile<R, 4>(x, y + j * K, at_col(j), K, out + j, N); break;
    case 3: dot_tile<R, 3>(x, y + j * K, at_col(j), K, out + j, N); break;
    case 2: dot_tile<R, 2>(x, y + j * K, at_col(j), K, out + j, N); break;
    case 1: dot_tile<R, 1>(x, y + j * K, at_col(j), K, out + j, N); break;
    default: break;
  }
}

// One matrix: out [M, N] = x [M, K] y [N, K]^T (+ bias [N] on every row).
TREEPOOL_AVX2 void dots_product(const float* x, const float* y, const float* bias, int64_t M,
                                int64_t K, int64_t N, float* out) {
  int64_t i = 0;
  for (; i + 2 <= M; i += 2) dot_rows<2>(x + i * K, y, bias, K, N, out + i * N);
  if (i < M) dot_rows<1>(x + i * K, y, bias, K, N, out + i * N);
}

// Whether the loops take this product: float32, contiguous, small, CPU with AVX2 + FMA.
bool small(std::initializer_list<const Tensor*> operands, int64_t M, int64_t K, int64_t N) {
  for (const Tensor* t : operands)
    if (t && (t->scalar_type() != at::kFloat || !t->is_contiguous())) return false;
  const int64_t most = SMALL_PRODUCT_MACS;
  return K > 0 && M <= most && N <= most && K <= most && M * N * K <= most &&
         cpu_has_avx2_fma();
}

// A new [B, M, N] float tensor whose matrix b is filled by per_matrix(b, its data), about
// GRAIN_SIZE multiply-adds (K per output) per task of the pool (no fork for small batches).
template <typename F>
Tensor each_matrix(const Tensor& like, int64_t B, int64_t M, int64_t N, int64_t K,
                   const F& per_matrix) {
  Tensor out = at::empty({B, M, N}, like.options());
  float* data = out.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(M * N * K, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) per_matrix(b, data + b * M * N);
  });
  return out;
}

Tensor nn_loops(const Tensor& x, const Tensor& y, const std::optional<Tensor>& acc) {
  const int64_t B = x.size(0), M = x.size(1), K = x.size(2), N = y.size(2);
  const float *xp = x.const_data_ptr<float>(), *yp = y.const_data_ptr<float>();
  const float* ap = acc ? acc->const_data_ptr<float>() : nullptr;
  return each_matrix(x, B, M, N, K, [&](int64_t b, float* out) {
    rows_product(xp + b * M * K, K, 1, yp + b * K * N, out, ap ? ap + b * M * N : nullptr, M,
                 K, N);
  });
}

Tensor nt_loops(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias) {
  const int64_t B = x.size(0), M = x.size(1), K = x.size(2), N = y.size(1);
  const float *xp = x.const_data_ptr<float>(), *yp = y.const_data_ptr<float>();
  const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
  return each_matrix(x, B, M, N, K, [&](int64_t b, float* out) {
    dots_product(xp + b * M * K, yp + b * N * K, bp ? bp + b * N : nullptr, M, K, N, out);
  });
}

Tensor tn_loops(const Tensor& x, const Tensor& y) {
  const int64_t B = x.size(0), K = x.size(1), M = x.size(2), N = y.size(2);
  const float *xp = x.const_data_ptr<float>(), *yp = y.const_data_ptr<float>();
  return each_matrix(x, B, M, N, K, [&](int64_t b, float* out) {
    rows_product(xp + b * K * M, 1, M, yp + b * K * N, out, nullptr, M, K, N);
  });
}

#endif  // TREEPOOL_SMALL_PRODUCTS

Tensor bmm_nn_cpu(const Tensor& x, const Tensor& y, const std::optional<Tensor>& acc) {
  products::check_bmm_nn(x, y, acc);
#if TREEPOOL_SMALL_PRODUCTS
  if (small({&x, &y, acc ? &*acc : nullptr}, x.size(1), x.size(2), y.size(2)))
    return nn_loops(x, y, acc);
#endif
  return products::bmm_nn(x, y, acc);
}

Tensor bmm_nt_cpu(const Tensor& x, const Tensor& y, const std::optional<Tensor>& bias) {
  products::check_bmm_nt(x, y, bias);
#if TREEPOOL_SMALL_PRODUCTS
  if (y.size(1) <= SMALL_NT_COLUMNS &&
      small({&x, &y, bias ? &*bias : nullptr}, x.size(1), x.size(2), y.size(1)))
    return nt_loops(x, y, bias);
#endif
  return products::bmm_nt(x, y, bias);
}

Tensor bmm_tn_cpu(const Tensor& x, const Tensor& y) {
  products::check_bmm_tn(x, y);
#if TREEPOOL_SMALL_PRODUCTS
  if (small({&x, &y}, x.size(2), x.size(1), y.size(2))) return tn_loops(x, y);
#endif
  return products::bmm_tn(x, y);
}

}  // namespace
}  // namespace cpu
}  // namespace treepool

TORCH_LIBRARY_IMPL(treepool, CPU, m) {
  m.impl("bmm_nn", &treepool::cpu::bmm_nn_cpu);
  m.impl("bmm_nt", &treepool::cpu::bmm_nt_cpu);
  m.impl("bmm_tn", &treepool::cpu::bmm_tn_cpu);
}
