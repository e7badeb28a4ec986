// Fuzz of the kernels.h launchers, built with -fsanitize=address,undefined
// (host_build.sanitizer_fuzzer(), run by test_cuda_host_sanitizers.py).
//
// kernels.h promises that no access is out of bounds whatever the values of offsets
// and parents. Each case here draws shapes, a dtype, an epilogue, aligned or
// misaligned buffers and valid or invalid indices (decreasing, negative, past T, the
// int64 extremes), allocates every buffer at its exact size (so that AddressSanitizer
// sees one element past it) and runs segment_reduce and segment_broadcast with the
// blocks in shuffled order, on one tensor and on a list of 2 to 20 (the multi-tensor
// launch, more than one table of 16 tensors), narrower copies of it over the same
// buffers. Any sanitizer report aborts the process; the results
// themselves are not checked (they are unspecified for invalid indices).
//
// Usage: fuzz_kernels [cases] [seed]; prints "fuzz: N cases, M launcher calls" at the end.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../../../csrc/cuda/kernels.h"

namespace {

using treepool::cuda::DType;
using treepool::cuda::Epilogue;

std::mt19937_64 rng;

int64_t uniform(int64_t lo, int64_t hi) {  // in [lo, hi]
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

bool coin(int percent) { return uniform(1, 100) <= percent; }

// A heap block of exactly `bytes` bytes, so that AddressSanitizer sees an access one
// byte past it; the data start `shift` bytes into it (shift = one element: the scalar
// path). Filled with small values.
struct Exact {
  unsigned char* block = nullptr;
  unsigned char* data = nullptr;
  Exact(size_t bytes, size_t shift) {
    block = static_cast<unsigned char*>(std::malloc(bytes + shift > 0 ? bytes + shift : 1));
    data = block + shift;
    std::memset(block, 0x3c, bytes + shift);
  }
  ~Exact() { std::free(block); }
  Exact(const Exact&) = delete;
  Exact& operator=(const Exact&) = delete;
};

int elem_bytes(DType d) {
  return d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2;
}

// Bytes of a [rows, P] buffer with row stride `stride`.
size_t span_bytes(int64_t rows, int64_t P, int64_t stride, int eb) {
  return rows > 0 ? static_cast<size_t>((rows - 1) * stride + P) * eb : 0;
}

const int64_t kExtremes[] = {std::numeric_limits<int64_t>::min(),
                             std::numeric_limits<int64_t>::max(), -1, -1000000007};

// offsets [C + 1]: valid (0 = o_0 <= ... <= o_C = T) or not.
std::vector<int64_t> draw_offsets(int64_t C, int64_t T, bool valid) {
  std::vector<int64_t> o(static_cast<size_t>(C + 1));
  for (auto& v : o) v = uniform(0, T);
  std::sort(o.begin(), o.end());
  o.front() = 0;
  o.back() = T;
  if (valid) return o;
  const int kind = static_cast<int>(uniform(0, 3));
  for (auto& v : o) {
    if (kind == 0 && coin(30)) v = uniform(-3, T + 3);          // out of [0, T]
    if (kind == 1 && coin(20)) v = kExtremes[uniform(0, 3)];    // int64 extremes
  }
  if (kind == 2) std::reverse(o.begin(), o.end());              // decreasing
  if (kind == 3 && !o.empty()) o[static_cast<size_t>(uniform(0, C))] = T + uniform(1, 1000);
  return o;
}

std::vector<int64_t> draw_parents(int64_t C, int64_t rows, bool valid) {
  std::vector<int64_t> p(static_cast<size_t>(C));
  for (auto& v : p) {
    v = uniform(0, rows - 1);
    if (!valid && coin(40)) v = coin(50) ? kExtremes[uniform(0, 3)] : rows + uniform(0, 3);
  }
  return p;
}

// A list of n structs: `a` and narrower copies of it (P' <= P over the same buffers, so
// every access of a copy is one `a` could make).
template <typename Args>
std::vector<Args> narrower_copies(const Args& a, int64_t n) {
  std::vector<Args> list(static_cast<size_t>(n), a);
  for (size_t i = 1; i < list.size(); ++i) list[i].P = uniform(0, a.P);
  return list;
}

// Runs a launcher on `a` alone, then on a list of copies. Returns the calls made.
template <typename Args, typename Bytes, typename Launch>
int run_alone_and_listed(const Args& a, Bytes bytes_of, Launch launch) {
  int calls = 0;
  for (int64_t n : {int64_t(1), uniform(2, 20)}) {
    const std::vector<Args> list = narrower_copies(a, n);
    const size_t bytes = bytes_of(list.data(), n);
    void* ws = bytes > 0 ? std::aligned_alloc(256, (bytes + 255) / 256 * 256) : nullptr;
    launch(list.data(), n, ws, nullptr);
    std::free(ws);
    ++calls;
  }
  return calls;
}

// One case: both launchers on the same shapes. Returns the number of calls made.
int run_case() {
  const DType dtype = static_cast<DType>(uniform(0, 3));
  const int eb = elem_bytes(dtype);
  const int64_t T = coin(10) ? 0 : uniform(1, coin(20) ? 600 : 80);
  const int64_t P = coin(15) ? uniform(120, 140) : uniform(1, 24);
  const int64_t C = coin(5) ? 0 : uniform(1, 12);
  const bool valid = coin(30);
  const size_t shift = coin(50) ? 0 : static_cast<size_t>(eb);  // misaligned by one element
  const int64_t stride = P + (coin(50) ? 0 : uniform(1, 9));

  std::vector<int64_t> offsets = draw_offsets(C, T, valid);
  Exact x(span_bytes(T, P, stride, eb), shift);
  Exact weights(static_cast<size_t>(T) * eb, shift);
  const bool weighted = coin(50);
  int calls = 0;

  treepool::cuda::SegmentReduceArgs a;
  a.dtype = dtype;
  a.epilogue = static_cast<Epilogue>(uniform(0, 3));
  a.T = T;
  a.P = P;
  a.C = C;
  a.x = x.data;
  a.x_stride = stride;
  a.offsets = offsets.data();
  a.weights = weighted ? weights.data : nullptr;
  const int64_t base_rows = a.epilogue == Epilogue::kReptile ? C : uniform(1, C + 3);
  Exact base(span_bytes(base_rows, P, stride, eb), shift);
  const bool in_place = a.epilogue == Epilogue::kReptile && coin(50);
  Exact out(span_bytes(C, P, stride, eb), shift);
  std::vector<int64_t> parents = draw_parents(C, base_rows, valid);
  const int rate_kind = static_cast<int>(uniform(0, 2));  // double, 0-d, [P]
  Exact rate(static_cast<size_t>(rate_kind == 2 ? P : 1) * eb, shift);
  a.out = in_place ? base.data : out.data;
  a.out_stride = stride;
  a.base = base.data;
  a.base_stride = stride;
  a.base_rows = base_rows;
  a.parents = parents.data();
  a.rate = 0.5;
  a.rate_tensor = rate_kind == 0 ? nullptr : rate.data;
  a.rate_stride = rate_kind == 2 ? 1 : 0;
  calls += run_alone_and_listed(
      a,
      [](const treepool::cuda::SegmentReduceArgs* l, int64_t n) {
        return treepool::cuda::segment_reduce_workspace_bytes(l, n);
      },
      [](const treepool::cuda::SegmentReduceArgs* l, int64_t n, void* ws, cudaStream_t s) {
        return treepool::cuda::segment_reduce(l, n, ws, s);
      });

  treepool::cuda::SegmentBroadcastArgs b;
  b.dtype = dtype;
  b.mean = coin(50);
  b.T = T;
  b.P = P;
  b.C = C;
  Exact g(span_bytes(C, P, stride, eb), shift);
  Exact bout(span_bytes(T, P, stride, eb), shift);
  b.g = g.data;
  b.g_stride = stride;
  b.offsets = offsets.data();
  b.weights = weighted ? weights.data : nullptr;
  b.out = bout.data;
  b.out_stride = stride;
  calls += run_alone_and_listed(
      b,
      [](const treepool::cuda::SegmentBroadcastArgs* l, int64_t n) {
        return treepool::cuda::segment_broadcast_workspace_bytes(l, n);
      },
      [](const treepool::cuda::SegmentBroadcastArgs* l, int64_t n, void* ws, cudaStream_t s) {
        return treepool::cuda::segment_broadcast(l, n, ws, s);
      });
  return calls;
}

}  // namespace

int main(int argc, char** argv) {
  const long cases = argc > 1 ? std::atol(argv[1]) : 300;
  const unsigned long long seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
  rng.seed(seed);
  treepool_host::set_order(treepool_host::Order::kShuffled, seed);
  long calls = 0;
  for (long i = 0; i < cases; ++i) calls += run_case();
  std::printf("fuzz: %ld cases, %ld launcher calls\n", cases, calls);
  return 0;
}
