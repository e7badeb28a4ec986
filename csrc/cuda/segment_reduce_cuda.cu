// CUDA kernels of the treepool reductions: segment_sum, segment_mean, tree_update and
// reptile_update (and their in-place forms), one engine with four epilogues:
//
//   acc[c, p] = sum_{t = offsets[c]}^{offsets[c+1]-1} w_t x[t, p]    (float; double for float64)
//   W_c       = sum_{t in c} w_t  (the row count when unweighted)
//   m[c, p]   = acc[c, p] / W_c  (0 when W_c = 0)
//   sum:      out[c, p] = acc[c, p]
//   mean:     out[c, p] = m[c, p]
//   tree:     out[c, p] = node[parents[c], p] - r_p * m[c, p]
//   reptile:  out[c, p] = theta[c, p] + r_p * (m[c, p] - theta[c, p])
//
// Weighted means (mean, tree, reptile) first rescale each cluster's weights by a power
// of two (cluster_weights.cuh: exact, so m is unchanged) and divide by W_c, never
// multiply by 1 / W_c: weights of 1e-45 or 3e38 give the finite mean they have. The
// weighted sum takes its weights as they are.
//
// Work partition. The unit of work is a range of ROWS, not a cluster: the T rows are
// cut into J chunks of L rows, chunk j = [j L, min((j+1) L, T)), and one thread owns
// VEC columns of one chunk (grid: x = column tiles, y = chunks). A thread walks its
// chunk top to bottom and meets the clusters in order:
//   - the cluster that started in an earlier chunk and runs into this one (at most
//     one): its partial sum goes to scratch slot (j, 0);
//   - the clusters that start in this chunk ("anchored" here; found by a binary search
//     on the offsets): a cluster that also ends here is finished at once (epilogue);
//     the last one may run past the chunk: its partial sum goes to slot (j, 1).
// A second kernel finishes the clusters that cross chunk boundaries: the thread of
// chunk j finishes the cluster that ends in chunk j, adding slot (j0, 1) and the slots
// (j0 + 1 .. j, 0) in chunk order, where j0 is the chunk it starts in.
//
// Why rows and not clusters: every thread reads about L rows whatever the tree, so
// the load is balanced for many small clusters, for a few long ones and for a tree
// whose one cluster holds 90% of the rows; no long cluster is left to a few blocks.
// Nothing needs the offsets on the host: the grid (tiles, ceil(J / by)) and the
// scratch [2 J, P] depend on T and P only, and a thread finds its clusters with two
// binary searches (log2 C cached loads). The alternative, a per-cluster chunk table,
// would need a scan kernel or the offsets on the host (a synchronisation).
//
// Choice of J (make_plan): enough chunks for about kTargetThreads threads in the
// grid, but
//   - L * sizeof(T) >= 64 bytes (L >= 16 float rows, 32 half rows): the partial sums
//     of a cluster cut by a chunk boundary cost 2 x 4 bytes per column (written, read
//     back), a small fraction of the L rows the chunk reads;
//   - J <= ceil(sqrt(T)): the second pass is one thread per column vector for each
//     cut cluster, adding up to J partials (8 loads in flight); this bounds it by the
//     first pass's per-thread work.
// For P >= 1e6 the column tiles alone give >= 125k threads, so J is 1 to 5 and the
// second pass is negligible; small P with many rows gets up to sqrt(T) chunks.
//
// Small P: a block is kThreads = bx * by threads; bx (a multiple of 32) covers the
// row and the by rows of threads take by different chunks, so narrow rows still
// fill the block.
//
// Vectorisation: when x, out, base and a per-column rate are 16-byte aligned and so
// are their row strides, a thread's VEC = 16 / sizeof(T) columns are adjacent and
// read / written with one 16-byte access (8 bf16/fp16, 4 float, 2 double); the last,
// partial vector of a row is done element by element. Otherwise the same VEC
// elements per thread are taken blockDim.x apart, with scalar coalesced accesses.
// Rows are read four at a time before they are added (more loads in flight).
//
// Multi-tensor ops: a list of tensors that share the tree level (a model's parameters)
// runs as one launch per kMaxTensorsPerLaunch tensors. Their pointers, strides and
// widths are a table in the kernel parameter (ReduceLaunch); the grid's x dimension
// is the column tiles of every tensor, one after the other, and a block finds its
// tensor by the first tile of each (at most 16 compares). bx is chosen for the widest
// tensor and J for the whole grid; the scratch rows hold every tensor's columns.
//
// Determinism: no atomics; each partial and each output element is written by one
// thread, and every sum has a fixed order (rows in order inside a chunk, chunks in
// order), given by the shapes alone, so results are the same run to run; the order is
// the same on the vector and the scalar path.
//
// Robustness: offsets and parents are clamped into range on every read; rows read
// are always inside the thread's chunk. With invalid offsets (possible only when the
// binding cannot check them, during CUDA graph capture) the output is unspecified
// but no access is out of bounds.
#include "cluster_weights.cuh"
#include "device_common.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace treepool {
namespace cuda {
namespace detail {
namespace {

constexpr int64_t kMinChunkBytes = 64;  // L * sizeof(T) >= this (see above)
constexpr int kRowUnroll = 4;           // rows loaded before they are added
constexpr int kCombineUnroll = 8;       // partial sums loaded before they are added

// What the tensors of one launch share: the tree level, the weights and the plan.
template <typename T>
struct ReduceParams {
  using A = acc_t<T>;
  const int64_t* offsets;
  const T* weights;  // nullptr: unweighted
  const A* scaled;   // [T] w'_t of cluster_weights.cuh (weighted means), else nullptr
  int64_t base_rows;
  const int64_t* parents;
  int64_t num_rows, C;  // T, C
  int64_t chunk_rows, chunks, padded_cols;  // the plan: L, J, row length of the scratch
  A* part;   // [2 J, padded_cols] partial sums, slot (j, s) at row 2 j + s
  A* wpart;  // [2 J] partial weight sums
};

// One tensor of a launch (one [T, P] buffer of a multi-tensor op).
template <typename T>
struct ReduceTensor {
  using A = acc_t<T>;
  const T* x;
  int64_t x_stride;
  T* out;
  int64_t out_stride;
  const T* base;  // node_params (tree) or theta (reptile); may equal out
  int64_t base_stride;
  const T* rate_tensor;  // nullptr: `rate`
  int64_t rate_stride;   // 0 (0-d) or 1 ([P])
  A rate;
  int64_t P;
  int64_t tile0;  // its first tile in the grid's x dimension
  int64_t col0;   // its first column in the scratch rows
};

// The kernels' parameter: the shared part and a table of up to kMaxTensors tensors
// (a kernel parameter, so no copy to the device is needed, in a CUDA graph too).
template <typename T>
struct ReduceLaunch {
  ReduceParams<T> p;
  int num_tensors;
  ReduceTensor<T> tensors[kMaxTensors];
};

// The weight of row r: rescaled (weighted means) or as given (weighted sum).
template <typename T>
__device__ __forceinline__ acc_t<T> row_weight(const ReduceParams<T>& p, int64_t r) {
  return p.scaled != nullptr ? p.scaled[r] : Num<T>::to_acc(p.weights[r]);
}

// acc = sum_{t = r0}^{r1 - 1} w_t x[t] over the thread's columns, W = sum w_t (weighted
// only), rows added in order.
template <bool WEIGHTED, int VEC, bool VECTOR, typename T>
__device__ __forceinline__ void sum_rows(const ReduceParams<T>& p, const ReduceTensor<T>& t,
                                         int64_t r0, int64_t r1, const Cols<VEC, VECTOR>& cm,
                                         acc_t<T> (&acc)[VEC], acc_t<T>& W) {
  using A = acc_t<T>;
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = A(0);
  W = A(0);
  int64_t r = r0;
  for (; r + kRowUnroll <= r1; r += kRowUnroll) {
    Vec<T, VEC> v[kRowUnroll];
    A w[kRowUnroll];
#pragma unroll
    for (int i = 0; i < kRowUnroll; ++i) {
      v[i] = load_cols(t.x + (r + i) * t.x_stride, cm);
      w[i] = WEIGHTED ? row_weight(p, r + i) : A(1);
    }
#pragma unroll
    for (int i = 0; i < kRowUnroll; ++i) {
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        acc[k] = WEIGHTED ? acc[k] + w[i] * Num<T>::to_acc(v[i].v[k])
                          : acc[k] + Num<T>::to_acc(v[i].v[k]);
      if (WEIGHTED) W += w[i];
    }
  }
  for (; r < r1; ++r) {
    const Vec<T, VEC> v = load_cols(t.x + r * t.x_stride, cm);
    const A w = WEIGHTED ? row_weight(p, r) : A(1);
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      acc[k] = WEIGHTED ? acc[k] + w * Num<T>::to_acc(v.v[k]) : acc[k] + Num<T>::to_acc(v.v[k]);
    if (WEIGHTED) W += w;
  }
}

// The rate of each of the thread's columns.
template <int VEC, bool VECTOR, typename T>
__device__ __forceinline__ void load_rates(const ReduceTensor<T>& t, const Cols<VEC, VECTOR>& cm,
                                           acc_t<T> (&r)[VEC]) {
  if (t.rate_tensor == nullptr) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) r[k] = t.rate;
  } else if (t.rate_stride == 0) {
    const acc_t<T> v = Num<T>::to_acc(t.rate_tensor[0]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) r[k] = v;
  } else {
    const Vec<T, VEC> v = load_cols(t.rate_tensor, cm);
#pragma unroll
    for (int k = 0; k < VEC; ++k) r[k] = Num<T>::to_acc(v.v[k]);
  }
}

// Writes out[c] from the cluster's weighted sums and total weight W. The epilogue E is
// a template parameter: segment_reduce picks it once per launch, no thread switches.
template <Epilogue E, int VEC, bool VECTOR, typename T>
__device__ __forceinline__ void finish(const ReduceParams<T>& p, const ReduceTensor<T>& t,
                                       int64_t c, const Cols<VEC, VECTOR>& cm,
                                       const acc_t<T> (&acc)[VEC], acc_t<T> W) {
  using A = acc_t<T>;
  // The cluster mean of column k: a division (see the top of this file).
  const auto mean = [&](int k) { return W > A(0) ? acc[k] / W : A(0); };
  A res[VEC];
  switch (E) {
    default:
    case Epilogue::kSum:
#pragma unroll
      for (int k = 0; k < VEC; ++k) res[k] = acc[k];
      break;
    case Epilogue::kMean:
#pragma unroll
      for (int k = 0; k < VEC; ++k) res[k] = mean(k);
      break;
    case Epilogue::kTreeUpdate: {
      // The parent row, clamped into node_params (checked on the host when possible).
      const int64_t parent = clamp_to<int64_t>(p.parents[c], 0, p.base_rows - 1);
      const Vec<T, VEC> from = load_cols(t.base + parent * t.base_stride, cm);
      A r[VEC];
      load_rates(t, cm, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) res[k] = Num<T>::to_acc(from.v[k]) - r[k] * mean(k);
      break;
    }
    case Epilogue::kReptile: {
      const Vec<T, VEC> th = load_cols(t.base + c * t.base_stride, cm);
      A r[VEC];
      load_rates(t, cm, r);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A t0 = Num<T>::to_acc(th.v[k]);
        res[k] = t0 + r[k] * (mean(k) - t0);
      }
      break;
    }
  }
  store_cols(t.out + c * t.out_stride, cm, res);
}

// Partial sums of chunk j into slot (j, s); the thread of column 0 of the first tensor
// stores W as well (the same for every tensor).
template <int VEC, bool VECTOR, typename T>
__device__ __forceinline__ void save_partial(const ReduceParams<T>& p, const ReduceTensor<T>& t,
                                             bool first_tensor, int64_t j, int s,
                                             const Cols<VEC, VECTOR>& cm,
                                             const acc_t<T> (&acc)[VEC], acc_t<T> W) {
  using A = acc_t<T>;
  // padded: every column k of the tensor's tiles is inside its part of the row
  A* row = p.part + (2 * j + s) * p.padded_cols + t.col0;
  if (VECTOR) {
    Vec<A, VEC> v;
#pragma unroll
    for (int k = 0; k < VEC; ++k) v.v[k] = acc[k];
    *reinterpret_cast<Vec<A, VEC>*>(row + cm.first) = v;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) row[cm.at(k)] = acc[k];
  }
  if (first_tensor && cm.first == 0) p.wpart[2 * j + s] = W;
}

// The partial sums of slot (j, s) at the thread's columns.
template <int VEC, bool VECTOR, typename T>
__device__ __forceinline__ Vec<acc_t<T>, VEC> load_partial(const ReduceParams<T>& p,
                                                           const ReduceTensor<T>& t, int64_t j,
                                                           int s, const Cols<VEC, VECTOR>& cm) {
  using A = acc_t<T>;
  const A* row = p.part + (2 * j + s) * p.padded_cols + t.col0;
  Vec<A, VEC> v;
  if (VECTOR) {
    v = *reinterpret_cast<const Vec<A, VEC>*>(row + cm.first);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v.v[k] = row[cm.at(k)];
  }
  return v;
}

// First pass, one thread = (VEC columns, chunk j).
template <Epilogue E, bool WEIGHTED, int VEC, bool VECTOR, typename T>
__device__ __forceinline__ void reduce_chunk(const ReduceParams<T>& p, const ReduceTensor<T>& t,
                                             bool first_tensor, int64_t j,
                                             const Cols<VEC, VECTOR>& cm) {
  using A = acc_t<T>;
  const bool last = j + 1 == p.chunks;
  const int64_t r_lo = j * p.chunk_rows;
  const int64_t r_hi = chunk_end(j, p.chunk_rows, p.chunks, p.num_rows);
  // Clusters anchored here: [c, c_end), those whose first row is in [r_lo, r_hi)
  // (the last chunk also takes the empty clusters that start at T).
  int64_t c = first_cluster_from(p.offsets, p.C, p.num_rows, r_lo);
  const int64_t c_end = last ? p.C : first_cluster_from(p.offsets, p.C, p.num_rows, r_hi);
  A acc[VEC];
  A W;
  if (c > 0) {  // cluster c - 1 started before this chunk: does it run into it?
    const int64_t b = row_at(p.offsets, c - 1, p.num_rows);
    const int64_t e = row_at(p.offsets, c, p.num_rows);
    if (b < r_lo && e > r_lo) {
      sum_rows<WEIGHTED>(p, t, r_lo, e < r_hi ? e : r_hi, cm, acc, W);
      save_partial(p, t, first_tensor, j, 0, cm, acc, W);
    }
  }
  if (c >= c_end) return;
  // Cluster c owns rows [b, e) with b = offsets[c], e = offsets[c + 1]; the next
  // cluster starts at this e, and its end is loaded one cluster ahead.
  int64_t b = row_at(p.offsets, c, p.num_rows);
  if (b < r_lo) b = r_lo;
  int64_t e = row_at(p.offsets, c + 1, p.num_rows);
  for (; c < c_end; ++c) {
    const int64_t e_next = c + 1 < c_end ? row_at(p.offsets, c + 2, p.num_rows) : 0;
    const int64_t stop = e < r_hi ? e : r_hi;
    sum_rows<WEIGHTED>(p, t, b, stop, cm, acc, W);
    if (e <= r_hi)
      finish<E>(p, t, c, cm, acc, WEIGHTED ? W : A(stop > b ? stop - b : 0));
    else  // runs past the chunk (only the last anchored cluster can)
      save_partial(p, t, first_tensor, j, 1, cm, acc, W);
    b = e > r_lo ? e : r_lo;
    e = e_next;
  }
}

// Second pass, one thread = (VEC columns, chunk j): finishes the cluster that started
// in an earlier chunk j0 and ends in chunk j, if there is one.
template <Epilogue E, bool WEIGHTED, int VEC, bool VECTOR, typename T>
__device__ __forceinline__ void combine_chunk(const ReduceParams<T>& p, const ReduceTensor<T>& t,
                                              int64_t j, const Cols<VEC, VECTOR>& cm) {
  using A = acc_t<T>;
  if (j == 0) return;
  const bool last = j + 1 == p.chunks;
  const int64_t r_lo = j * p.chunk_rows;
  const int64_t r_hi = chunk_end(j, p.chunk_rows, p.chunks, p.num_rows);
  const int64_t c = first_cluster_from(p.offsets, p.C, p.num_rows, r_lo);
  if (c == 0) return;
  const int64_t b = row_at(p.offsets, c - 1, p.num_rows);
  const int64_t e = row_at(p.offsets, c, p.num_rows);
  if (!(b < r_lo && e > r_lo)) return;  // no cluster runs into chunk j
  if (!last && e > r_hi) return;        // it ends in a later chunk, which finishes it
  int64_t j0 = b / p.chunk_rows;        // b < r_lo, so j0 < j
  if (j0 > p.chunks - 1) j0 = p.chunks - 1;
  // acc = slot (j0, 1) + slot (j0 + 1, 0) + ... + slot (j, 0), in this order; the
  // slots are loaded kCombineUnroll at a time (independent loads in flight).
  A acc[VEC];
  const Vec<A, VEC> first = load_partial(p, t, j0, 1, cm);
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = first.v[k];
  A W = WEIGHTED ? p.wpart[2 * j0 + 1] : A(0);
  int64_t m = j0 + 1;
  for (; m + kCombineUnroll <= j + 1; m += kCombineUnroll) {
    Vec<A, VEC> v[kCombineUnroll];
#pragma unroll
    for (int i = 0; i < kCombineUnroll; ++i) v[i] = load_partial(p, t, m + i, 0, cm);
#pragma unroll
    for (int i = 0; i < kCombineUnroll; ++i) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += v[i].v[k];
      if (WEIGHTED) W += p.wpart[2 * (m + i)];
    }
  }
  for (; m <= j; ++m) {
    const Vec<A, VEC> v = load_partial(p, t, m, 0, cm);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] += v.v[k];
    if (WEIGHTED) W += p.wpart[2 * m];
  }
  finish<E>(p, t, c - 1, cm, acc, WEIGHTED ? W : A(e - b));
}

// One thread's work in either pass: the first (reduce_chunk) or the second
// (combine_chunk), weighted or not, on the tensor its block's tile belongs to.
template <bool COMBINE, Epilogue E, int VEC, bool VECTOR, typename T>
__device__ __forceinline__ void run_pass(const ReduceLaunch<T>& L) {
  const ReduceParams<T>& p = L.p;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  if (j >= p.chunks) return;
  const ReduceTensor<T> t = tensor_of_tile(L.tensors, L.num_tensors, blockIdx.x);
  const bool first_tensor = t.tile0 == 0;  // it stores the partial weights
  const Cols<VEC, VECTOR> cm = thread_cols<VEC, VECTOR>(t.P, blockIdx.x - t.tile0);
  if (cm.n == 0) return;
  if (COMBINE) {
    if (p.weights != nullptr)
      combine_chunk<E, true>(p, t, j, cm);
    else
      combine_chunk<E, false>(p, t, j, cm);
  } else {
    if (p.weights != nullptr)
      reduce_chunk<E, true>(p, t, first_tensor, j, cm);
    else
      reduce_chunk<E, false>(p, t, first_tensor, j, cm);
  }
}

template <Epilogue E, int VEC, bool VECTOR, typename T>
__global__ void __launch_bounds__(kThreads) segment_reduce_kernel(const ReduceLaunch<T> L) {
  run_pass<false, E, VEC, VECTOR>(L);
}

template <Epilogue E, int VEC, bool VECTOR, typename T>
__global__ void __launch_bounds__(kThreads) segment_combine_kernel(const ReduceLaunch<T> L) {
  run_pass<true, E, VEC, VECTOR>(L);
}

// The plan of one launch: tensors [i0, i1) of the list.
Plan reduce_plan(const SegmentReduceArgs* as, int64_t i0, int64_t i1) {
  return group_plan(as, i0, i1, kMinChunkBytes / elem_bytes(as[0].dtype), /*cap_sqrt=*/true);
}

// Whether the weights are rescaled per cluster first (a weighted mean or update).
bool rescales_weights(const SegmentReduceArgs& a) {
  return a.weights != nullptr && a.T > 0 && a.epilogue != Epilogue::kSum;
}

// Scratch layout: the rescaled weights [T] (rescales_weights only), then, for a launch
// whose rows are cut into more than one chunk, partial sums [2 J, padded_cols] and
// partial weights [2 J]. The launches of a list run one after the other on the stream,
// so they share the partial region (sized for the largest).
size_t scaled_bytes(const SegmentReduceArgs& a) {
  return rescales_weights(a) ? cluster_weights_bytes(a.T, a.dtype) : 0;
}

size_t partial_bytes(const SegmentReduceArgs& a, const Plan& pl) {
  return align256(static_cast<size_t>(2 * pl.chunks) * static_cast<size_t>(pl.padded_cols) *
                  static_cast<size_t>(acc_bytes(a.dtype)));
}

size_t partial_region_bytes(const SegmentReduceArgs& a, const Plan& pl) {
  if (pl.chunks <= 1) return 0;  // one chunk finishes every cluster itself
  return partial_bytes(a, pl) +
         align256(static_cast<size_t>(2 * pl.chunks) * static_cast<size_t>(acc_bytes(a.dtype)));
}

size_t workspace_bytes(const SegmentReduceArgs* as, int64_t n) {
  size_t most = 0;
  for (int64_t i0 = 0; i0 < n; i0 += kMaxTensors) {
    const size_t b = partial_region_bytes(as[0], reduce_plan(as, i0, group_end(i0, n)));
    most = b > most ? b : most;
  }
  return scaled_bytes(as[0]) + most;
}

// Fills the table of one launch with the tensors of [i0, i1) that have columns (the
// first of them stores the partial weights) and says whether every buffer allows the
// 16-byte vector path.
template <Epilogue E, typename T>
bool fill_tensors(const SegmentReduceArgs* as, int64_t i0, int64_t i1, const Plan& pl,
                  ReduceLaunch<T>& L) {
  constexpr bool uses_base = E == Epilogue::kTreeUpdate || E == Epilogue::kReptile;
  const int eb = static_cast<int>(sizeof(T));
  bool vector = true;
  int64_t tile = 0;
  L.num_tensors = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const SegmentReduceArgs& a = as[i];
    if (a.P == 0) continue;
    ReduceTensor<T>& t = L.tensors[L.num_tensors++];
    t.x = static_cast<const T*>(a.x);
    t.x_stride = a.x_stride;
    t.out = static_cast<T*>(a.out);
    t.out_stride = a.out_stride;
    t.base = static_cast<const T*>(a.base);
    t.base_stride = a.base_stride;
    t.rate_tensor = static_cast<const T*>(a.rate_tensor);
    t.rate_stride = a.rate_stride;
    t.rate = static_cast<acc_t<T>>(a.rate);
    t.P = a.P;
    t.tile0 = tile;
    t.col0 = tile * pl.bx * pl.vec;
    tile += pl.tiles_of(a.P);
    vector = vector && rows_aligned(a.x, a.x_stride, a.T, eb) &&
             rows_aligned(a.out, a.out_stride, a.C, eb);
    if (uses_base) vector = vector && rows_aligned(a.base, a.base_stride, a.base_rows, eb);
    if (uses_base && a.rate_tensor != nullptr && a.rate_stride != 0)
      vector = vector && rows_aligned(a.rate_tensor, 0, 1, eb);
  }
  return vector;
}

// The launches of a list: the weights' rescaling once, then per group of tensors the
// reduction and, when rows are cut into chunks, the combine pass.
template <Epilogue E, typename T>
cudaError_t launch_reduce(const SegmentReduceArgs* as, int64_t n, void* workspace,
                          cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int VEC = 16 / sizeof(T);
  const SegmentReduceArgs& a0 = as[0];
  ReduceLaunch<T> L;
  ReduceParams<T>& p = L.p;
  p.offsets = a0.offsets;
  p.weights = static_cast<const T*>(a0.weights);
  p.scaled = nullptr;
  p.base_rows = a0.base_rows;
  p.parents = a0.parents;
  p.num_rows = a0.T;
  p.C = a0.C;
  char* scratch = static_cast<char*>(workspace);
  if (rescales_weights(a0)) {
    A* scaled = reinterpret_cast<A*>(scratch);
    const cudaError_t err =
        launch_cluster_weights<false>(a0.offsets, p.weights, a0.C, a0.T, scaled, stream);
    if (err != cudaSuccess) return err;
    p.scaled = scaled;
    scratch += scaled_bytes(a0);
  }
  for (int64_t i0 = 0; i0 < n; i0 += kMaxTensors) {
    const int64_t i1 = group_end(i0, n);
    const Plan pl = reduce_plan(as, i0, i1);
    if (pl.tiles == 0) continue;  // every tensor of the group has P = 0
    p.chunk_rows = pl.rows;
    p.chunks = pl.chunks;
    p.padded_cols = pl.padded_cols;
    p.part = nullptr;
    p.wpart = nullptr;
    if (pl.chunks > 1) {
      p.part = reinterpret_cast<A*>(scratch);
      p.wpart = reinterpret_cast<A*>(scratch + partial_bytes(a0, pl));
    }
    const bool vector = fill_tensors<E>(as, i0, i1, pl, L);
    const dim3 grid = pl.grid(), block = pl.block();
    cudaError_t err =
        vector ? launch<kThreads>(segment_reduce_kernel<E, VEC, true, T>, grid, block, stream, L)
               : launch<kThreads>(segment_reduce_kernel<E, VEC, false, T>, grid, block, stream, L);
    if (err == cudaSuccess && pl.chunks > 1)
      err = vector ? launch<kThreads>(segment_combine_kernel<E, VEC, true, T>, grid, block,
                                      stream, L)
                   : launch<kThreads>(segment_combine_kernel<E, VEC, false, T>, grid, block,
                                      stream, L);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Whether the list can run: sizes not negative, the shared fields equal, the pointers
// an op needs present.
bool valid_list(const SegmentReduceArgs* as, int64_t n) {
  const SegmentReduceArgs& a0 = as[0];
  if (a0.T < 0 || a0.C < 0 || a0.offsets == nullptr) return false;
  if (a0.epilogue == Epilogue::kTreeUpdate && (a0.parents == nullptr || a0.base_rows < 1))
    return false;
  for (int64_t i = 0; i < n; ++i) {
    const SegmentReduceArgs& a = as[i];
    if (a.dtype != a0.dtype || a.epilogue != a0.epilogue || a.T != a0.T || a.C != a0.C ||
        a.offsets != a0.offsets || a.weights != a0.weights || a.parents != a0.parents ||
        a.base_rows != a0.base_rows || a.P < 0)
      return false;
    if (a.P == 0) continue;
    if (a.out == nullptr || (a.T > 0 && a.x == nullptr)) return false;
    if (a.epilogue == Epilogue::kTreeUpdate && a.base == nullptr) return false;
    if (a.epilogue == Epilogue::kReptile && (a.base == nullptr || a.base_rows < a.C))
      return false;
  }
  return true;
}

}  // namespace
}  // namespace detail

size_t segment_reduce_workspace_bytes(const SegmentReduceArgs* args, int64_t n) {
  if (n <= 0 || args[0].C <= 0 || args[0].T < 0) return 0;
  return detail::workspace_bytes(args, n);
}

cudaError_t segment_reduce(const SegmentReduceArgs* as, int64_t n, void* workspace,
                           cudaStream_t stream) {
  if (n < 0 || (n > 0 && as == nullptr)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (as[0].T < 0 || as[0].C < 0) return cudaErrorInvalidValue;
  if (as[0].C == 0) return cudaSuccess;  // empty outputs: nothing to launch
  if (!detail::valid_list(as, n)) return cudaErrorInvalidValue;
  for (int64_t i0 = 0; i0 < n; i0 += detail::kMaxTensors) {
    const detail::Plan pl = detail::reduce_plan(as, i0, detail::group_end(i0, n));
    if (pl.tiles > 0 && !pl.fits()) return cudaErrorInvalidConfiguration;
  }
  if (detail::workspace_bytes(as, n) > 0 &&
      (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 256 != 0))
    return cudaErrorInvalidValue;
  return detail::dispatch_dtype(as[0].dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // The runtime epilogue becomes the kernels' template parameter, here, once.
    switch (as[0].epilogue) {
      case Epilogue::kMean:
        return detail::launch_reduce<Epilogue::kMean, T>(as, n, workspace, stream);
      case Epilogue::kTreeUpdate:
        return detail::launch_reduce<Epilogue::kTreeUpdate, T>(as, n, workspace, stream);
      case Epilogue::kReptile:
        return detail::launch_reduce<Epilogue::kReptile, T>(as, n, workspace, stream);
      default:
        return detail::launch_reduce<Epilogue::kSum, T>(as, n, workspace, stream);
    }
  });
}

}  // namespace cuda
}  // namespace treepool
