// The plain argument structs of the treepool reductions and broadcast, shared by the
// CPU and CUDA engines: raw pointers, int64_t sizes and strides and enums of our own,
// no torch and no CUDA headers. csrc/bindings.cpp checks the at::Tensor arguments of an
// op once and fills one struct per tensor of its list; csrc/cpu runs them on the CPU,
// csrc/cuda/kernels.h launches them on the GPU.
//
// Layout: a "rows" buffer is [rows, P] with unit column stride and a row stride in
// elements (>= P, or anything when it has <= 1 row). offsets [C + 1] and parents [C]
// are int64 arrays on the data's device; weights [T] has the dtype of the data. Half
// types are read and written as float16 / bfloat16 and accumulated in float; float32
// in float; float64 in double.
#pragma once

#include <cstdint>

namespace treepool {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// What segment_reduce writes for cluster c, from acc[c] = sum_{t in c} w_t x[t] and
// m[c] = W_c > 0 ? acc[c] / W_c : 0 with W_c = sum_{t in c} w_t (the row count
// unweighted). Both engines rescale a cluster's weights by a power of two before a
// mean (exact) and divide by W_c, so that tiny or huge weights give a finite mean.
enum class Epilogue : int {
  kSum = 0,         // out[c] = acc[c]
  kMean = 1,        // out[c] = m[c]
  kTreeUpdate = 2,  // out[c] = base[parents[c]] - r * m[c]
  kReptile = 3,     // out[c] = base[c] + r * (m[c] - base[c])
};

struct SegmentReduceArgs {
  DType dtype = DType::kFloat32;
  Epilogue epilogue = Epilogue::kSum;
  int64_t T = 0;  // rows of x
  int64_t P = 0;  // columns of x, out and base
  int64_t C = 0;  // clusters (rows of out)

  const void* x = nullptr;  // [T, P]
  int64_t x_stride = 0;
  const int64_t* offsets = nullptr;  // [C + 1]
  const void* weights = nullptr;     // [T] contiguous, or nullptr (every w_t = 1)

  void* out = nullptr;  // [C, P]; may be `base` itself (in-place update, see below)
  int64_t out_stride = 0;

  // Tree update: base = node_params [base_rows, P] and parents [C]. Reptile: base =
  // theta [C, P] (base_rows = C). out may equal base when each cluster reads its own
  // row only (Reptile; tree update with parents[c] == c): every element is read once,
  // by the thread that then writes it.
  const void* base = nullptr;
  int64_t base_stride = 0;
  int64_t base_rows = 0;
  const int64_t* parents = nullptr;

  // The rate r (lr or eps): `rate`, unless rate_tensor is given (dtype of x, 0-d with
  // rate_stride 0 or [P] contiguous with rate_stride 1), read on the device.
  double rate = 1.0;
  const void* rate_tensor = nullptr;
  int64_t rate_stride = 0;
};

// out[t] = s_t g[c(t)] with s_t = w_t (or 1), divided by W_c(t) when mean.
struct SegmentBroadcastArgs {
  DType dtype = DType::kFloat32;
  bool mean = false;
  int64_t T = 0;  // rows of out
  int64_t P = 0;
  int64_t C = 0;  // rows of g

  const void* g = nullptr;  // [C, P]
  int64_t g_stride = 0;
  const int64_t* offsets = nullptr;  // [C + 1]
  const void* weights = nullptr;     // [T] contiguous, or nullptr
  void* out = nullptr;               // [T, P], must not overlap g
  int64_t out_stride = 0;
};

}  // namespace treepool
