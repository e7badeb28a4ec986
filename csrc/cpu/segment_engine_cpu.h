// The one CPU loop behind every treepool reduction: weighted sums of contiguous row
// ranges of a list of [T, P_i] buffers (one per model parameter, all sharing the rows
// and the offsets), handed column block by column block to an epilogue that turns them
// into the op's output (sum, mean, tree update, Reptile update).
//
//   acc_i[c, p] = sum_{t = offsets[c]}^{offsets[c+1]-1} w_t x_i[t, p]
//
// Work partition (it depends on the shapes and offsets only, never on the number of
// threads, so results are bitwise reproducible on any machine):
// - the columns of every tensor are cut into blocks of kBlock (a block never spans two
//   tensors); a unit of work is (column block, row chunk), and all units of all tensors
//   run in ONE parallel region, ordered block-major so that every thread's share of a
//   skewed tree covers all clusters of a few blocks, not all blocks of one cluster;
// - when there are fewer than kTargetUnits column blocks (small P), the rows of long
//   clusters are cut into chunks as well; chunk partial sums go to a scratch buffer
//   and a second pass adds them in chunk order, so the sum order is fixed;
// - a problem of fewer than kMinWorkPerTask elements runs on the calling thread;
// - identity layout (no weights, one row per cluster: offsets = 0, 1, ..., T) has no
//   sum to form: acc_i[c] = x_i[c] goes straight to the epilogue.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <cstring>
#include <vector>

#include "../segment_args.h"

namespace treepool {
namespace cpu {

constexpr int64_t kBlock = 8192;      // columns per unit: the accumulator stays in L2
constexpr int64_t kTargetUnits = 64;  // enough units to keep every core busy
// Elements below which a task is not worth a thread: torch's own grain size.
constexpr int64_t kMinWorkPerTask = at::internal::GRAIN_SIZE;

// One tensor of a multi-tensor op: rows [T, P] with unit column stride.
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t row_stride;
  int64_t P;
};

// A block of columns [p0, p0 + n) of tensor `tensor`; `col` is p0 plus the columns of
// the tensors before it (its place in the scratch rows).
struct ColumnBlock {
  int64_t tensor, p0, n, col;
};

template <typename scalar_t>
std::vector<ColumnBlock> make_blocks(const std::vector<Rows<scalar_t>>& xs, int64_t* total_cols) {
  std::vector<ColumnBlock> blocks;
  int64_t col = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(xs.size()); ++i) {
    for (int64_t p0 = 0; p0 < xs[i].P; p0 += kBlock)
      blocks.push_back({i, p0, std::min(kBlock, xs[i].P - p0), col + p0});
    col += xs[i].P;
  }
  *total_cols = col;
  return blocks;
}

// Per-row weights in acc_t and every cluster's total weight W_c (its row count when
// unweighted). With `rescale` (for a mean), the weights of each cluster are multiplied
// by the power of two that brings the largest into [1, 2): exact, it leaves every mean
// unchanged, and neither sum_t w_t x_t nor W_c can then overflow (weights of 3e38) or
// lose their digits to underflow (weights of 1e-45).
template <typename acc_t>
struct ClusterWeights {
  std::vector<acc_t> weights;  // empty when unweighted
  std::vector<acc_t> total;

  // w: [T] contiguous, or nullptr (unweighted).
  template <typename scalar_t>
  ClusterWeights(const scalar_t* w, int64_t T, const int64_t* offsets, int64_t C, bool rescale)
      : total(C) {
    if (w != nullptr) {
      weights.resize(T);
      for (int64_t t = 0; t < T; ++t) weights[t] = static_cast<acc_t>(w[t]);
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t b = offsets[c], e = offsets[c + 1];
      if (weights.empty()) {
        total[c] = static_cast<acc_t>(e - b);
        continue;
      }
      acc_t largest = 0;
      for (int64_t t = b; t < e; ++t) largest = std::max(largest, weights[t]);
      if (rescale && largest > 0) {
        const int shift = std::ilogb(largest);
        for (int64_t t = b; t < e; ++t) weights[t] = std::ldexp(weights[t], -shift);
      }
      acc_t sum = 0;
      for (int64_t t = b; t < e; ++t) sum += weights[t];
      total[c] = sum;
    }
  }
  const acc_t* data() const { return weights.empty() ? nullptr : weights.data(); }
};

// A contiguous range of rows of one cluster; slot >= 0 when the cluster was split and
// this chunk's partial sums go to scratch row `slot`.
struct RowChunk {
  int64_t cluster, begin, end, slot;
};

// Cuts clusters into row chunks of at most `chunk_rows` rows (an empty cluster gets one
// empty chunk, so that its output is still written).
inline std::vector<RowChunk> make_chunks(const int64_t* offsets, int64_t C, int64_t chunk_rows,
                                         int64_t* num_slots) {
  std::vector<RowChunk> chunks;
  chunks.reserve(C);
  int64_t slots = 0;
  for (int64_t c = 0; c < C; ++c) {
    int64_t b = offsets[c], e = offsets[c + 1];
    int64_t n = std::max<int64_t>(1, (e - b + chunk_rows - 1) / chunk_rows);
    for (int64_t k = 0; k < n; ++k) {
      int64_t lo = b + k * chunk_rows, hi = std::min(e, lo + chunk_rows);
      chunks.push_back({c, lo, n == 1 ? e : hi, n == 1 ? -1 : slots++});
    }
  }
  *num_slots = slots;
  return chunks;
}

// True when every cluster is exactly one row: offsets = 0, 1, ..., C.
inline bool one_row_per_cluster(const int64_t* offsets, int64_t C, int64_t T) {
  if (C != T) return false;
  for (int64_t c = 0; c <= C; ++c)
    if (offsets[c] != c) return false;
  return true;
}

// acc[0:n] = sum_t w_t x[t, p0:p0+n] over rows [begin, end) of x. Four rows per pass
// over acc, so that acc is loaded and stored a quarter as often; the inner loops are
// plain enough for the compiler to vectorise.
template <typename scalar_t, typename acc_t>
inline void accumulate_rows(const scalar_t* x, int64_t row_stride, int64_t begin, int64_t end,
                            int64_t p0, int64_t n, const acc_t* weights, acc_t* acc) {
  std::fill(acc, acc + n, acc_t(0));
  acc_t* __restrict__ a = acc;
  int64_t t = begin;
  for (; t + 4 <= end; t += 4) {
    const scalar_t* __restrict__ r0 = x + t * row_stride + p0;
    const scalar_t* __restrict__ r1 = r0 + row_stride;
    const scalar_t* __restrict__ r2 = r1 + row_stride;
    const scalar_t* __restrict__ r3 = r2 + row_stride;
    if (weights) {
      const acc_t w0 = weights[t], w1 = weights[t + 1], w2 = weights[t + 2], w3 = weights[t + 3];
      for (int64_t j = 0; j < n; ++j)
        a[j] += (w0 * static_cast<acc_t>(r0[j]) + w1 * static_cast<acc_t>(r1[j])) +
                (w2 * static_cast<acc_t>(r2[j]) + w3 * static_cast<acc_t>(r3[j]));
    } else {
      for (int64_t j = 0; j < n; ++j)
        a[j] += (static_cast<acc_t>(r0[j]) + static_cast<acc_t>(r1[j])) +
                (static_cast<acc_t>(r2[j]) + static_cast<acc_t>(r3[j]));
    }
  }
  for (; t < end; ++t) {
    const scalar_t* __restrict__ row = x + t * row_stride + p0;
    const acc_t w = weights ? weights[t] : acc_t(1);
    for (int64_t j = 0; j < n; ++j) a[j] += w * static_cast<acc_t>(row[j]);
  }
}

// Runs the reduction over every tensor of xs (all [T, P_i], sharing offsets [C + 1] and
// weights [T]). `epilogue(i, c, p0, n, acc)` receives the weighted sums of cluster c
// for columns [p0, p0 + n) of tensor i and writes the op's output for them.
template <typename scalar_t, typename acc_t, typename Epilogue>
void segment_reduce(const std::vector<Rows<scalar_t>>& xs, int64_t T, const int64_t* offsets,
                    int64_t C, const acc_t* weights, const Epilogue& epilogue) {
  int64_t P = 0;  // all columns of all tensors
  const std::vector<ColumnBlock> blocks = make_blocks(xs, &P);
  const int64_t B = static_cast<int64_t>(blocks.size());
  if (C == 0 || P == 0) return;

  if (!weights && one_row_per_cluster(offsets, C, T)) {
    // Identity layout: the sum of a one-row cluster is the row itself.
    const int64_t grain = std::max<int64_t>(1, kMinWorkPerTask / std::min(P, kBlock));
    at::parallel_for(0, B * C, grain, [&](int64_t u0, int64_t u1) {
      acc_t acc[kBlock];
      for (int64_t u = u0; u < u1; ++u) {
        const ColumnBlock& bl = blocks[u / C];
        const int64_t c = u % C;
        const scalar_t* row = xs[bl.tensor].data + c * xs[bl.tensor].row_stride + bl.p0;
        for (int64_t j = 0; j < bl.n; ++j) acc[j] = static_cast<acc_t>(row[j]);
        epilogue(bl.tensor, c, bl.p0, bl.n, acc);
      }
    });
    return;
  }

  // Rows are split only as far as every chunk still carries kMinWorkPerTask elements:
  // a small op is not worth threads, and a second pass would only add to it.
  const int64_t row_splits = std::max<int64_t>(1, (kTargetUnits + B - 1) / B);
  const int64_t chunk_rows = std::max<int64_t>(
      {int64_t(1), (T + row_splits - 1) / row_splits, (kMinWorkPerTask + P - 1) / P});
  int64_t num_slots = 0;
  const std::vector<RowChunk> chunks = make_chunks(offsets, C, chunk_rows, &num_slots);
  const int64_t U = static_cast<int64_t>(chunks.size());

  std::vector<acc_t> scratch(static_cast<size_t>(num_slots) * P);
  const int64_t total_work = (T + C) * P;
  const int64_t units = B * U;
  const int64_t grain =
      std::max<int64_t>(1, kMinWorkPerTask * units / std::max<int64_t>(1, total_work));

  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    acc_t acc[kBlock];
    for (int64_t u = u0; u < u1; ++u) {
      const ColumnBlock& bl = blocks[u / U];
      const RowChunk& ch = chunks[u % U];
      const Rows<scalar_t>& x = xs[bl.tensor];
      accumulate_rows(x.data, x.row_stride, ch.begin, ch.end, bl.p0, bl.n, weights, acc);
      if (ch.slot < 0) {
        epilogue(bl.tensor, ch.cluster, bl.p0, bl.n, acc);
      } else {
        std::memcpy(scratch.data() + ch.slot * P + bl.col, acc, bl.n * sizeof(acc_t));
      }
    }
  });
  if (num_slots == 0) return;

  // Second pass: the clusters that were split, their chunk sums added in chunk order.
  std::vector<int64_t> split_first;  // index in `chunks` of each split cluster's first chunk
  for (int64_t i = 0; i < U; ++i)
    if (chunks[i].slot >= 0 && (i == 0 || chunks[i - 1].cluster != chunks[i].cluster))
      split_first.push_back(i);
  const int64_t S = static_cast<int64_t>(split_first.size());
  const int64_t combine_grain =
      std::max<int64_t>(1, kMinWorkPerTask * B * S / std::max<int64_t>(1, num_slots * P));
  at::parallel_for(0, B * S, combine_grain, [&](int64_t u0, int64_t u1) {
    acc_t acc[kBlock];
    for (int64_t u = u0; u < u1; ++u) {
      const ColumnBlock& bl = blocks[u / S];
      int64_t i = split_first[u % S];
      const int64_t c = chunks[i].cluster;
      std::fill(acc, acc + bl.n, acc_t(0));
      for (; i < U && chunks[i].cluster == c; ++i) {
        const acc_t* part = scratch.data() + chunks[i].slot * P + bl.col;
        for (int64_t j = 0; j < bl.n; ++j) acc[j] += part[j];
      }
      epilogue(bl.tensor, c, bl.p0, bl.n, acc);
    }
  });
}

// Calls f(static_cast<scalar_t*>(nullptr)) with the C++ type of d.
template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(static_cast<float*>(nullptr));
    case DType::kFloat64: return f(static_cast<double*>(nullptr));
    case DType::kFloat16: return f(static_cast<at::Half*>(nullptr));
    case DType::kBFloat16: return f(static_cast<at::BFloat16*>(nullptr));
  }
}

// The CPU engine: runs the structs of one call (csrc/bindings.h), all tensors of the
// list in one parallel region. They share dtype, epilogue, T, C, offsets and weights.
void segment_reduce_cpu(const std::vector<SegmentReduceArgs>& args);     // segment_ops_cpu.cpp
void segment_broadcast_cpu(const std::vector<SegmentBroadcastArgs>& args);  // segment_broadcast_cpu.cpp

}  // namespace cpu
}  // namespace treepool
