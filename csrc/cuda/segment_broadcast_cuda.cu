// CUDA kernel of segment_broadcast, the adjoint of segment_sum / segment_mean:
//
//   out[t, p] = s_t * g[c(t), p],  s_t = w_t (or 1), divided by W_c (0 if W_c = 0)
//   when mean, W_c = sum_{u in c} w_u (the row count when unweighted).
//
// Partition: like the reductions (segment_reduce_cuda.cu), by rows. The T output rows
// are cut into J chunks of L rows; one thread owns VEC columns of one chunk, finds the
// cluster of its first row with a binary search on the offsets, then walks its rows
// and moves to the next cluster when a row reaches its end. The row g[c] is loaded
// once per cluster and chunk and kept in registers. Vector (16-byte) accesses when g
// and out rows are 16-byte aligned, else scalar coalesced accesses (see
// device_common.cuh).
//
// The weighted mean needs W_c first: cluster_weights.cuh's kernel, one warp per
// cluster, writes s_t = w'_t / W'_c into a [T] scratch array, the weights rescaled by a
// power of two per cluster (exact) and divided, so that weights of 1e-45 or 3e38 give
// finite scales. No atomics: every output is written once, in a fixed order.
//
// Robustness: offsets are clamped on every read and a thread's cluster index stays in
// [0, C), so invalid offsets (unchecked during CUDA graph capture) give unspecified
// values but no out-of-bounds access.
#include "cluster_weights.cuh"
#include "device_common.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace treepool {
namespace cuda {
namespace detail {
namespace {

constexpr int64_t kMinBroadcastRows = 4;  // rows per chunk, at least (one search each)

template <typename T>
struct BroadcastParams {
  using A = acc_t<T>;
  const T* g;
  int64_t g_stride;
  const int64_t* offsets;
  const T* weights;  // nullptr: s_t = 1
  const A* scale;    // [T] s_t = w'_t / W'_c (weighted mean only), else nullptr
  T* out;
  int64_t out_stride;
  int mean;
  int64_t num_rows, P, C;  // T, P, C
  int64_t chunk_rows, chunks;  // L, J
};

template <int VEC, bool VECTOR, typename T>
__global__ void __launch_bounds__(kThreads) segment_broadcast_kernel(const BroadcastParams<T> p) {
  using A = acc_t<T>;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (j >= p.chunks) return;
  const Cols<VEC, VECTOR> cm = thread_cols<VEC, VECTOR>(p.P);
  if (cm.n == 0) return;
  const int64_t r_lo = j * p.chunk_rows;
  const int64_t r_hi = chunk_end(j, p.chunk_rows, p.chunks, p.num_rows);

  // c = the last cluster whose first row is <= r_lo; `next` = the first row of c + 1.
  int64_t c = first_cluster_from(p.offsets, p.C, p.num_rows, r_lo + 1) - 1;
  if (c < 0) c = 0;
  int64_t next = c + 1 < p.C ? row_at(p.offsets, c + 1, p.num_rows) : p.num_rows;
  int64_t loaded = -1;
  A gv[VEC];
  A inv_n = A(1);  // 1 / n of the unweighted mean (n >= 1, so it is finite)
  for (int64_t t = r_lo; t < r_hi; ++t) {
    while (t >= next) {  // row t is past cluster c (skips empty clusters); c < C - 1 here
      ++c;
      next = c + 1 < p.C ? row_at(p.offsets, c + 1, p.num_rows) : p.num_rows;
    }
    if (c != loaded) {
      const Vec<T, VEC> v = load_cols(p.g + c * p.g_stride, cm);
#pragma unroll
      for (int k = 0; k < VEC; ++k) gv[k] = Num<T>::to_acc(v.v[k]);
      if (p.mean && p.scale == nullptr) {
        const int64_t n = next - row_at(p.offsets, c, p.num_rows);
        inv_n = n > 0 ? A(1) / A(n) : A(0);
      }
      loaded = c;
    }
    A s;
    if (p.scale != nullptr)
      s = p.scale[t];
    else if (p.weights != nullptr)
      s = Num<T>::to_acc(p.weights[t]);
    else
      s = p.mean ? inv_n : A(1);
    A res[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) res[k] = s * gv[k];
    store_cols(p.out + t * p.out_stride, cm, res);
  }
}

Plan broadcast_plan(const SegmentBroadcastArgs& a) {
  return make_plan(a.T, a.P, elem_bytes(a.dtype), kMinBroadcastRows, /*cap_sqrt=*/false);
}

bool needs_scale(const SegmentBroadcastArgs& a) { return a.mean && a.weights != nullptr; }

// Copies the plain SegmentBroadcastArgs into the kernel's typed BroadcastParams, as
// launch_reduce does for SegmentReduceArgs (segment_reduce_cuda.cu): the two look alike
// (`duplicates` pairs them) but fill different structs field by field; a shared
// helper would need the two param structs to share members they do not have.
template <typename T>
cudaError_t launch_broadcast(const SegmentBroadcastArgs& a, const Plan& pl, void* workspace,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int VEC = 16 / sizeof(T);
  BroadcastParams<T> p;
  p.g = static_cast<const T*>(a.g);
  p.g_stride = a.g_stride;
  p.offsets = a.offsets;
  p.weights = static_cast<const T*>(a.weights);
  p.scale = nullptr;
  p.out = static_cast<T*>(a.out);
  p.out_stride = a.out_stride;
  p.mean = a.mean ? 1 : 0;
  p.num_rows = a.T;
  p.P = a.P;
  p.C = a.C;
  p.chunk_rows = pl.rows;
  p.chunks = pl.chunks;

  if (needs_scale(a)) {
    A* scale = static_cast<A*>(workspace);
    const cudaError_t err =
        launch_cluster_weights<true>(a.offsets, p.weights, a.C, a.T, scale, stream);
    if (err != cudaSuccess) return err;
    p.scale = scale;
  }

  const int eb = static_cast<int>(sizeof(T));
  const bool vector =
      rows_aligned(a.g, a.g_stride, a.C, eb) && rows_aligned(a.out, a.out_stride, a.T, eb);
  return vector ? launch<kThreads>(segment_broadcast_kernel<VEC, true, T>, pl.grid(),
                                   pl.block(), stream, p)
                : launch<kThreads>(segment_broadcast_kernel<VEC, false, T>, pl.grid(),
                                   pl.block(), stream, p);
}

}  // namespace
}  // namespace detail

size_t segment_broadcast_workspace_bytes(const SegmentBroadcastArgs& a) {
  if (a.T <= 0 || a.P <= 0 || a.C <= 0 || !detail::needs_scale(a)) return 0;
  return detail::cluster_weights_bytes(a.T, a.dtype);
}

cudaError_t segment_broadcast(const SegmentBroadcastArgs& a, void* workspace,
                              cudaStream_t stream) {
  if (a.T < 0 || a.P < 0 || a.C < 0) return cudaErrorInvalidValue;
  if (a.T == 0 || a.P == 0 || a.C == 0) return cudaSuccess;  // nothing to write from
  if (a.g == nullptr || a.offsets == nullptr || a.out == nullptr) return cudaErrorInvalidValue;
  if (segment_broadcast_workspace_bytes(a) > 0 &&
      (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 256 != 0))
    return cudaErrorInvalidValue;
  const detail::Plan pl = detail::broadcast_plan(a);
  if (!pl.fits()) return cudaErrorInvalidConfiguration;
  return detail::dispatch_dtype(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return detail::launch_broadcast<T>(a, pl, workspace, stream);
  });
}

}  // namespace cuda
}  // namespace treepool
