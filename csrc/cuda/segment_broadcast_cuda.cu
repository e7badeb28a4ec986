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
// A list of tensors (multi-tensor ops) runs as one launch per 16 tensors over a table
// in the kernel parameter, as the reductions do (segment_reduce_cuda.cu).
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

// What the tensors of one launch share.
template <typename T>
struct BroadcastParams {
  using A = acc_t<T>;
  const int64_t* offsets;
  const T* weights;  // nullptr: s_t = 1
  const A* scale;    // [T] s_t = w'_t / W'_c (weighted mean only), else nullptr
  int mean;
  int64_t num_rows, C;  // T, C
  int64_t chunk_rows, chunks;  // L, J
};

// One tensor of a launch (one [C, P] -> [T, P] buffer pair of a multi-tensor op).
template <typename T>
struct BroadcastTensor {
  const T* g;
  int64_t g_stride;
  T* out;
  int64_t out_stride;
  int64_t P;
  int64_t tile0;  // its first tile in the grid's x dimension
};

// The kernel's parameter: the shared part and a table of up to kMaxTensors tensors.
template <typename T>
struct BroadcastLaunch {
  BroadcastParams<T> p;
  int num_tensors;
  BroadcastTensor<T> tensors[kMaxTensors];
};

template <int VEC, bool VECTOR, typename T>
__global__ void __launch_bounds__(kThreads)
    segment_broadcast_kernel(const BroadcastLaunch<T> L) {
  using A = acc_t<T>;
  const BroadcastParams<T>& p = L.p;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (j >= p.chunks) return;
  const BroadcastTensor<T> bt = tensor_of_tile(L.tensors, L.num_tensors, blockIdx.x);
  const Cols<VEC, VECTOR> cm = thread_cols<VEC, VECTOR>(bt.P, blockIdx.x - bt.tile0);
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
      const Vec<T, VEC> v = load_cols(bt.g + c * bt.g_stride, cm);
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
    store_cols(bt.out + t * bt.out_stride, cm, res);
  }
}

// The plan of one launch: tensors [i0, i1) of the list.
Plan broadcast_plan(const SegmentBroadcastArgs* as, int64_t i0, int64_t i1) {
  return group_plan(as, i0, i1, kMinBroadcastRows, /*cap_sqrt=*/false);
}

bool needs_scale(const SegmentBroadcastArgs& a) { return a.mean && a.weights != nullptr; }

// Copies the plain SegmentBroadcastArgs into the kernel's typed BroadcastLaunch, as
// launch_reduce does for SegmentReduceArgs (segment_reduce_cuda.cu): the two look alike
// but fill different structs field by field; a shared helper would need the two
// param structs to share members they do not have.
template <typename T>
cudaError_t launch_broadcast(const SegmentBroadcastArgs* as, int64_t n, void* workspace,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int VEC = 16 / sizeof(T);
  const SegmentBroadcastArgs& a0 = as[0];
  BroadcastLaunch<T> L;
  BroadcastParams<T>& p = L.p;
  p.offsets = a0.offsets;
  p.weights = static_cast<const T*>(a0.weights);
  p.scale = nullptr;
  p.mean = a0.mean ? 1 : 0;
  p.num_rows = a0.T;
  p.C = a0.C;
  if (needs_scale(a0)) {
    A* scale = static_cast<A*>(workspace);
    const cudaError_t err =
        launch_cluster_weights<true>(a0.offsets, p.weights, a0.C, a0.T, scale, stream);
    if (err != cudaSuccess) return err;
    p.scale = scale;
  }
  const int eb = static_cast<int>(sizeof(T));
  for (int64_t i0 = 0; i0 < n; i0 += kMaxTensors) {
    const int64_t i1 = group_end(i0, n);
    const Plan pl = broadcast_plan(as, i0, i1);
    if (pl.tiles == 0) continue;  // every tensor of the group has P = 0
    p.chunk_rows = pl.rows;
    p.chunks = pl.chunks;
    L.num_tensors = 0;
    bool vector = true;
    int64_t tile = 0;
    for (int64_t i = i0; i < i1; ++i) {  // the tensors with columns
      const SegmentBroadcastArgs& a = as[i];
      if (a.P == 0) continue;
      BroadcastTensor<T>& bt = L.tensors[L.num_tensors++];
      bt.g = static_cast<const T*>(a.g);
      bt.g_stride = a.g_stride;
      bt.out = static_cast<T*>(a.out);
      bt.out_stride = a.out_stride;
      bt.P = a.P;
      bt.tile0 = tile;
      tile += pl.tiles_of(a.P);
      vector = vector && rows_aligned(a.g, a.g_stride, a.C, eb) &&
               rows_aligned(a.out, a.out_stride, a.T, eb);
    }
    const cudaError_t err =
        vector ? launch<kThreads>(segment_broadcast_kernel<VEC, true, T>, pl.grid(), pl.block(),
                                  stream, L)
               : launch<kThreads>(segment_broadcast_kernel<VEC, false, T>, pl.grid(),
                                  pl.block(), stream, L);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Whether the list can run: the shared fields equal, the pointers present.
bool valid_list(const SegmentBroadcastArgs* as, int64_t n) {
  const SegmentBroadcastArgs& a0 = as[0];
  if (a0.offsets == nullptr) return false;
  for (int64_t i = 0; i < n; ++i) {
    const SegmentBroadcastArgs& a = as[i];
    if (a.dtype != a0.dtype || a.mean != a0.mean || a.T != a0.T || a.C != a0.C ||
        a.offsets != a0.offsets || a.weights != a0.weights || a.P < 0)
      return false;
    if (a.P > 0 && (a.g == nullptr || a.out == nullptr)) return false;
  }
  return true;
}

}  // namespace
}  // namespace detail

size_t segment_broadcast_workspace_bytes(const SegmentBroadcastArgs* as, int64_t n) {
  if (n <= 0 || as[0].T <= 0 || as[0].C <= 0 || !detail::needs_scale(as[0])) return 0;
  return detail::cluster_weights_bytes(as[0].T, as[0].dtype);
}

cudaError_t segment_broadcast(const SegmentBroadcastArgs* as, int64_t n, void* workspace,
                              cudaStream_t stream) {
  if (n < 0 || (n > 0 && as == nullptr)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (as[0].T < 0 || as[0].C < 0) return cudaErrorInvalidValue;
  if (as[0].T == 0 || as[0].C == 0) return cudaSuccess;  // nothing to write from
  if (!detail::valid_list(as, n)) return cudaErrorInvalidValue;
  for (int64_t i0 = 0; i0 < n; i0 += detail::kMaxTensors) {
    const detail::Plan pl = detail::broadcast_plan(as, i0, detail::group_end(i0, n));
    if (pl.tiles > 0 && !pl.fits()) return cudaErrorInvalidConfiguration;
  }
  if (segment_broadcast_workspace_bytes(as, n) > 0 &&
      (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 256 != 0))
    return cudaErrorInvalidValue;
  return detail::dispatch_dtype(as[0].dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return detail::launch_broadcast<T>(as, n, workspace, stream);
  });
}

}  // namespace cuda
}  // namespace treepool
