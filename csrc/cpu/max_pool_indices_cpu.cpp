// CPU kernel of max_pool2d_indices: where each window of a non-overlapping max pooling
// takes its maximum, for an NCHW (channels-first) tensor.
//
//   idx[p, i, j] = argmax over the kh x kw window (i kh .. i kh + kh - 1, j kw .. ) of
//                  plane p, as the flat index r * W + c within the plane
//
// with stride = kernel, no padding, floor mode, and ATen's rule for ties and NaN: the
// first maximum in row-major order wins, and every NaN replaces the maximum so far
// (the last NaN wins). The indices are exactly those of
// `F.max_pool2d(x, (kh, kw), return_indices=True)`.
//
// Why: ATen's channels-first CPU max pooling compares element by element with a branch
// per comparison (pytorch/pytorch#51393), about 20 ns per output on random data: 20 ms
// for 80 x 64 x 28 x 28, an eighth of bench_meta's conv MAML step. The 2 x 2 kernel
// below is branch-free, and compiled for AVX-512 and AVX2 as well as the baseline ISA
// (the best one is chosen when the library loads), 5.5 ms there. treepool's learners
// take the values with a gather at these indices, which autograd differentiates as
// max pooling (treepool/meta/max_pool.py, FastMaxPool).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../checks.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define TREEPOOL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef TREEPOOL_VECTOR_CLONES
#define TREEPOOL_VECTOR_CLONES
#endif

namespace treepool {
namespace cpu {
namespace {

// `value` replaces the maximum `best` when larger, or NaN (v != v), as in ATen.
template <typename scalar_t>
inline bool replaces(scalar_t value, scalar_t best) {
  return (value > best) | (value != value);
}

// 2 x 2 windows of `planes` planes [H, W]: no branches, so the compiler vectorises the
// loop over a row of windows.
template <typename scalar_t>
inline void windows_2x2(const scalar_t* __restrict__ x, int64_t* __restrict__ idx,
                        int64_t planes, int64_t H, int64_t W) {
  const int64_t oh = H / 2, ow = W / 2;
  for (int64_t p = 0; p < planes; ++p) {
    const scalar_t* plane = x + p * H * W;
    int64_t* out = idx + p * oh * ow;
    for (int64_t i = 0; i < oh; ++i) {
      const scalar_t* top = plane + 2 * i * W;
      const scalar_t* bottom = top + W;
      int64_t* row = out + i * ow;
      for (int64_t j = 0; j < ow; ++j) {
        scalar_t best = top[2 * j];
        int64_t at = 0;
        scalar_t v = top[2 * j + 1];
        bool c = replaces(v, best);
        best = c ? v : best;
        at = c ? 1 : at;
        v = bottom[2 * j];
        c = replaces(v, best);
        best = c ? v : best;
        at = c ? W : at;
        v = bottom[2 * j + 1];
        c = replaces(v, best);
        at = c ? W + 1 : at;
        row[j] = 2 * i * W + 2 * j + at;
      }
    }
  }
}

TREEPOOL_VECTOR_CLONES
void windows_2x2_float(const float* x, int64_t* idx, int64_t planes, int64_t H, int64_t W) {
  windows_2x2(x, idx, planes, H, W);
}

TREEPOOL_VECTOR_CLONES
void windows_2x2_double(const double* x, int64_t* idx, int64_t planes, int64_t H, int64_t W) {
  windows_2x2(x, idx, planes, H, W);
}

// The 2 x 2 kernel where there is one for the dtype (float, double); false elsewhere.
inline bool try_2x2(const float* x, int64_t* idx, int64_t planes, int64_t H, int64_t W) {
  windows_2x2_float(x, idx, planes, H, W);
  return true;
}
inline bool try_2x2(const double* x, int64_t* idx, int64_t planes, int64_t H, int64_t W) {
  windows_2x2_double(x, idx, planes, H, W);
  return true;
}
template <typename scalar_t>
inline bool try_2x2(const scalar_t*, int64_t*, int64_t, int64_t, int64_t) {
  return false;
}

// Any kh x kw window, any floating dtype: the same rule, in a plain loop.
template <typename scalar_t>
void windows_any(const scalar_t* x, int64_t* idx, int64_t planes, int64_t H, int64_t W,
                 int64_t kh, int64_t kw) {
  const int64_t oh = H / kh, ow = W / kw;
  for (int64_t p = 0; p < planes; ++p) {
    const scalar_t* plane = x + p * H * W;
    int64_t* out = idx + p * oh * ow;
    for (int64_t i = 0; i < oh; ++i) {
      for (int64_t j = 0; j < ow; ++j) {
        int64_t at = i * kh * W + j * kw;
        scalar_t best = plane[at];
        for (int64_t r = i * kh; r < (i + 1) * kh; ++r) {
          for (int64_t c = j * kw; c < (j + 1) * kw; ++c) {
            if (replaces(plane[r * W + c], best)) {
              best = plane[r * W + c];
              at = r * W + c;
            }
          }
        }
        out[i * ow + j] = at;
      }
    }
  }
}

at::Tensor max_pool2d_indices_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size) {
  const std::vector<int64_t> sizes = check_max_pool_args("max_pool2d_indices", x_in, kernel_size);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t H = x_in.size(-2), W = x_in.size(-1);
  const at::Tensor x = x_in.contiguous();
  at::Tensor idx = at::empty(sizes, x.options().dtype(at::kLong));
  const int64_t planes = x.numel() / (H * W);  // H, W >= 1: checked
  if (idx.numel() == 0) return idx;
  // A task of at least torch's grain size in elements: small inputs stay on one thread.
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (H * W));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "max_pool2d_indices", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    int64_t* out = idx.mutable_data_ptr<int64_t>();
    const int64_t per_plane = (H / kh) * (W / kw);
    at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
      const scalar_t* first = data + p0 * H * W;
      int64_t* first_out = out + p0 * per_plane;
      if (kh == 2 && kw == 2 && try_2x2(first, first_out, p1 - p0, H, W)) return;
      windows_any(first, first_out, p1 - p0, H, W, kh, kw);
    });
  });
  return idx;
}

}  // namespace
}  // namespace cpu
}  // namespace treepool

TORCH_LIBRARY_IMPL(treepool, CPU, m) {
  m.impl("max_pool2d_indices", &treepool::cpu::max_pool2d_indices_cpu);
}
