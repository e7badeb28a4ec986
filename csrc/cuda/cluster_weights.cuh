// The per-cluster rescaled weights that every weighted mean on CUDA starts from (the
// reductions' mean, tree and reptile epilogues, and the mean broadcast), as the CPU
// engine does (ClusterWeights in csrc/cpu/segment_engine_cpu.h):
//
//   k_c  = ilogb(max_{t in c} w_t)   the exponent of the cluster's largest weight
//   w'_t = w_t * 2^-k_c              exact (a power of two); the largest w' is in [1, 2)
//   W'_c = sum_{t in c} w'_t
//
// A mean (sum_t w_t x_t) / W_c is unchanged by the common factor 2^-k_c, and with it
// neither the weighted sums nor W'_c can overflow (weights of 3e38 gave inf, then
// NaN) and tiny weights keep their digits (weights of 1e-45 made 1 / W_c inf). The
// means then divide by W'_c; none multiplies by a reciprocal 1 / W'_c.
//
// One warp per cluster: lane l reads rows l, l + 32, ... and the maximum and the sum
// are fixed shuffle trees, so the result does not depend on timing. Two outputs:
//   NORMALISE = false: out[t] = w'_t            (the reductions add w'_t x_t and W'_c)
//   NORMALISE = true:  out[t] = w'_t / W'_c, 0 when W'_c = 0   (the broadcast's s_t)
// Offsets are clamped on every read, so invalid ones (unchecked during CUDA graph
// capture) give unspecified values but every access stays inside weights and out.
#pragma once

#include "device_common.cuh"
#include "launch.cuh"

namespace treepool {
namespace cuda {
namespace detail {
// Each .cu file gets its own copy of the kernel (as of its other kernels).
namespace {

constexpr int kWarpsPerBlock = kThreads / 32;

__device__ __forceinline__ int exponent_of(float v) { return ilogbf(v); }
__device__ __forceinline__ int exponent_of(double v) { return ilogb(v); }
__device__ __forceinline__ float times_pow2(float v, int k) { return ldexpf(v, k); }
__device__ __forceinline__ double times_pow2(double v, int k) { return ldexp(v, k); }

template <bool NORMALISE, typename T>
__global__ void __launch_bounds__(kThreads)
    cluster_weights_kernel(const int64_t* __restrict__ offsets, const T* __restrict__ weights,
                           int64_t C, int64_t rows, acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (c >= C) return;  // the whole warp leaves together
  const int64_t b = row_at(offsets, c, rows), e = row_at(offsets, c + 1, rows);
  A largest = A(0);
  for (int64_t t = b + lane; t < e; t += 32) {
    const A w = Num<T>::to_acc(weights[t]);
    largest = w > largest ? w : largest;
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const A other = __shfl_xor_sync(kAll, largest, o);
    largest = other > largest ? other : largest;
  }
  const int shift = largest > A(0) ? exponent_of(largest) : 0;
  A total = A(0);
  if (NORMALISE) {
    for (int64_t t = b + lane; t < e; t += 32)
      total += times_pow2(Num<T>::to_acc(weights[t]), -shift);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(kAll, total, o);
  }
  for (int64_t t = b + lane; t < e; t += 32) {
    const A w = times_pow2(Num<T>::to_acc(weights[t]), -shift);
    out[t] = !NORMALISE ? w : (total > A(0) ? w / total : A(0));
  }
}

// Bytes of scratch for the [T] rescaled weights.
inline size_t cluster_weights_bytes(int64_t T, DType dtype) {
  return align256(static_cast<size_t>(T) * static_cast<size_t>(acc_bytes(dtype)));
}

// Enqueues cluster_weights_kernel over the C clusters of `offsets` (`rows` rows),
// writing the [rows] rescaled (NORMALISE: and normalised) weights to `out`.
template <bool NORMALISE, typename T>
cudaError_t launch_cluster_weights(const int64_t* offsets, const T* weights, int64_t C,
                                   int64_t rows, acc_t<T>* out, cudaStream_t stream) {
  const int64_t blocks = ceil_div(C, kWarpsPerBlock);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch<kThreads>(cluster_weights_kernel<NORMALISE, T>,
                          dim3(static_cast<unsigned>(blocks)), dim3(kThreads), stream, offsets,
                          weights, C, rows, out);
}

}  // namespace
}  // namespace detail
}  // namespace cuda
}  // namespace treepool
