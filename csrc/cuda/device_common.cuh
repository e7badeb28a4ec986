// Pieces shared by the treepool CUDA kernels: number types, 16-byte vectors, the
// columns a thread owns, index helpers that clamp into range, and the launch plan.
// CUDA runtime headers only (see kernels.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kernels.h"

namespace treepool {
namespace cuda {
namespace detail {

// --- numbers -----------------------------------------------------------------------

// Num<T>: the accumulation type of T (float for half types and float32, double for
// float64) and the conversions to it and back (round to nearest even, like c10).
template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};

template <>
struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

template <>
struct Num<__half> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) {
    return __float2bfloat16_rn(v);
  }
};

template <typename T>
using acc_t = typename Num<T>::acc;

// N values of T loaded or stored as one aligned access (16 bytes for the data
// vectors; 32 bytes for the float partial sums of a half type, which the compiler
// splits in two 16-byte accesses).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// --- the columns of one thread -----------------------------------------------------

constexpr int kThreads = 256;  // threads per block: blockDim.x * blockDim.y

// A block covers a tile of blockDim.x * VEC columns of one tensor (tile `tile` of its
// row); each thread owns VEC of them. VECTOR: VEC adjacent columns, read with one 16-byte access. Otherwise
// (misaligned rows) columns first + k * blockDim.x, read one by one: every access is
// still coalesced across the warp and each thread keeps VEC loads in flight.
template <int VEC, bool VECTOR>
struct Cols {
  int64_t first = 0;  // column of element 0
  int64_t step = 1;   // distance between elements (1 when VECTOR)
  int n = 0;          // elements 0..n-1 are inside the row (n == 0: thread has none)

  __device__ __forceinline__ int64_t at(int k) const {
    return VECTOR ? first + k : first + k * step;
  }
  __device__ __forceinline__ bool full() const { return VECTOR && n == VEC; }
};

template <int VEC, bool VECTOR>
__device__ __forceinline__ Cols<VEC, VECTOR> thread_cols(int64_t P, int64_t tile) {
  Cols<VEC, VECTOR> cm;
  const int64_t tile0 = tile * blockDim.x * VEC;
  if (VECTOR) {
    cm.first = tile0 + static_cast<int64_t>(threadIdx.x) * VEC;
    cm.step = 1;
  } else {
    cm.first = tile0 + threadIdx.x;
    cm.step = blockDim.x;
  }
  const int64_t rem = P - cm.first;  // columns from `first` to the end of the row
  if (rem <= 0) {
    cm.n = 0;
  } else {
    const int64_t n = VECTOR ? rem : (rem + cm.step - 1) / cm.step;
    cm.n = n < VEC ? static_cast<int>(n) : VEC;
  }
  return cm;
}

// The thread's VEC values of a row (zero past the end of the row).
template <int VEC, bool VECTOR, typename T>
__device__ __forceinline__ Vec<T, VEC> load_cols(const T* row, const Cols<VEC, VECTOR>& cm) {
  Vec<T, VEC> v;
  if (cm.full()) {
    v = *reinterpret_cast<const Vec<T, VEC>*>(row + cm.first);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      v.v[k] = k < cm.n ? row[cm.at(k)] : Num<T>::from_acc(acc_t<T>(0));
  }
  return v;
}

// Writes the thread's values (converted to T) into a row, the valid columns only.
template <int VEC, bool VECTOR, typename T>
__device__ __forceinline__ void store_cols(T* row, const Cols<VEC, VECTOR>& cm,
                                           const acc_t<T> (&vals)[VEC]) {
  if (cm.full()) {
    Vec<T, VEC> v;
#pragma unroll
    for (int k = 0; k < VEC; ++k) v.v[k] = Num<T>::from_acc(vals[k]);
    *reinterpret_cast<Vec<T, VEC>*>(row + cm.first) = v;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (k < cm.n) row[cm.at(k)] = Num<T>::from_acc(vals[k]);
  }
}

// --- the tensors of one launch ------------------------------------------------------

// A multi-tensor op launches once per kMaxTensors tensors: their table is a kernel
// parameter (well under CUDA's 4 KB), as torch's _foreach kernels do.
constexpr int64_t kMaxTensors = kMaxTensorsPerLaunch;

// A list of n tensors runs as launches of tensors [i0, group_end(i0, n)), i0 = 0,
// kMaxTensors, 2 kMaxTensors, ...
inline int64_t group_end(int64_t i0, int64_t n) {
  return i0 + kMaxTensors < n ? i0 + kMaxTensors : n;
}

// The entry of the tensor that grid tile `tile` belongs to: the last k < n with
// tensors[k].tile0 <= tile (the table holds only tensors with columns, so the first
// has tile0 = 0 and every later one a larger tile0). The loop has a fixed trip count
// and fixed indices: every load is a plain kernel-parameter load and the chosen entry
// stays in registers (a dynamic index into the parameter would go through memory).
template <typename Tensor>
__device__ __forceinline__ Tensor tensor_of_tile(const Tensor (&tensors)[kMaxTensors], int n,
                                                 int64_t tile) {
  Tensor t = tensors[0];
#pragma unroll
  for (int i = 1; i < kMaxTensors; ++i)
    if (i < n && tensors[i].tile0 <= tile) t = tensors[i];
  return t;
}

// --- index helpers -----------------------------------------------------------------

template <typename I>
__host__ __device__ __forceinline__ I clamp_to(I v, I lo, I hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// offsets[c] clamped into [0, T]: rows read through it are always inside x.
__device__ __forceinline__ int64_t row_at(const int64_t* __restrict__ offsets, int64_t c,
                                          int64_t T) {
  return clamp_to<int64_t>(offsets[c], 0, T);
}

// The first cluster c in [0, C) whose first row is >= r (C if none): a binary search
// on the cluster starts, which are sorted for valid offsets (for others it still
// returns an index in [0, C]).
__device__ __forceinline__ int64_t first_cluster_from(const int64_t* __restrict__ offsets,
                                                      int64_t C, int64_t T, int64_t r) {
  int64_t lo = 0, hi = C;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (row_at(offsets, mid, T) < r)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Chunk j of the plan below is rows [j L, chunk_end); the last one ends at T.
__device__ __forceinline__ int64_t chunk_end(int64_t j, int64_t L, int64_t J, int64_t T) {
  const int64_t end = (j + 1) * L;
  return j + 1 == J || end > T ? T : end;
}

// --- launch plan ---------------------------------------------------------------------

constexpr int64_t kTargetThreads = int64_t(1) << 19;  // ~2 waves of full blocks on an H100/H200
constexpr int64_t kMaxGridY = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest s >= 0 with s * s >= n (n >= 0).
inline int64_t ceil_sqrt(int64_t n) {
  int64_t s = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (s > 0 && (s - 1) * (s - 1) >= n) --s;
  while (s * s < n) ++s;
  return s;
}

// How the row spaces [T, P_i] of n tensors (the list of a multi-tensor op; n = 1 for
// one tensor) are cut for one launch: blocks of bx * by threads; bx threads (VEC
// columns each) cover a column tile of one tensor, tensor i has tiles_of(P_i) tiles
// and gridDim.x = `tiles`, their sum; the by threads of a column are independent row
// chunks. Rows are cut into `chunks` chunks of `rows` rows (the last one shorter),
// chunk j = [j * rows, min((j + 1) * rows, T)). The plan depends on T, the P_i and the
// element size only, never on the device or on timing.
struct Plan {
  int vec = 1;
  int bx = 32, by = 1;
  int64_t tiles = 0;        // gridDim.x: the tiles of every tensor
  int64_t chunks = 1;       // J
  int64_t rows = 1;         // L
  int64_t padded_cols = 0;  // tiles * bx * vec >= sum_i P_i

  int64_t tiles_of(int64_t P) const { return ceil_div(ceil_div(P, vec), bx); }

  dim3 grid() const {
    return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(ceil_div(chunks, by)), 1);
  }
  dim3 block() const { return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), 1); }
  bool fits() const {
    return tiles >= 1 && tiles <= 0x7fffffff && ceil_div(chunks, by) <= kMaxGridY;
  }
};

// bx covers the widest row (a multiple of 32, at most kThreads). Chunks are added
// until the grid has about kTargetThreads threads, but no chunk has fewer than
// min_rows rows, and with cap_sqrt no more chunks than rows per chunk.
inline Plan make_plan(int64_t T, const int64_t* P, int64_t n, int elem_bytes, int64_t min_rows,
                      bool cap_sqrt) {
  Plan pl;
  pl.vec = 16 / elem_bytes;
  int64_t widest = 0;
  for (int64_t i = 0; i < n; ++i) widest = P[i] > widest ? P[i] : widest;
  const int64_t nvec = ceil_div(widest, pl.vec);  // threads across the widest row
  const int64_t bx = nvec >= kThreads ? kThreads : ceil_div(nvec, 32) * 32;
  pl.bx = static_cast<int>(bx > 0 ? bx : 32);
  pl.by = static_cast<int>(kThreads / pl.bx);
  pl.tiles = 0;
  for (int64_t i = 0; i < n; ++i) pl.tiles += pl.tiles_of(P[i]);
  pl.padded_cols = pl.tiles * pl.bx * pl.vec;
  int64_t cap = T / min_rows;
  if (cap_sqrt) {
    const int64_t s = ceil_sqrt(T);
    if (s < cap) cap = s;
  }
  if (cap > kMaxGridY * pl.by) cap = kMaxGridY * pl.by;
  if (cap < 1) cap = 1;
  const int64_t want = pl.tiles > 0 ? ceil_div(kTargetThreads, pl.tiles * pl.bx) : 1;
  const int64_t J = clamp_to<int64_t>(want, 1, cap);
  pl.rows = T > 0 ? ceil_div(T, J) : 1;
  pl.chunks = T > 0 ? ceil_div(T, pl.rows) : 1;
  return pl;
}

// 16-byte accesses are possible when every row of the buffer starts 16-byte aligned.
inline bool rows_aligned(const void* p, int64_t stride, int64_t rows, int elem_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return rows <= 1 || (stride * elem_bytes) % 16 == 0;
}

inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

inline int elem_bytes(DType d) {
  switch (d) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

inline int acc_bytes(DType d) { return d == DType::kFloat64 ? 8 : 4; }

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with the C++ type of d.
template <typename F>
cudaError_t dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// The plan of one launch of a list: tensors [i0, i1) (at most kMaxTensors) of the
// argument structs `as` (SegmentReduceArgs or SegmentBroadcastArgs: T, P, dtype).
template <typename Args>
Plan group_plan(const Args* as, int64_t i0, int64_t i1, int64_t min_rows, bool cap_sqrt) {
  int64_t P[kMaxTensors];
  for (int64_t i = i0; i < i1; ++i) P[i - i0] = as[i].P;
  return make_plan(as[0].T, P, i1 - i0, elem_bytes(as[0].dtype), min_rows, cap_sqrt);
}

}  // namespace detail
}  // namespace cuda
}  // namespace treepool
