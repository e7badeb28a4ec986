// Argument checks; see checks.h. Every message here has a twin in treepool/_checks.py.
#include "checks.h"

#include <cmath>
#include <cstdio>
#include <string>

namespace treepool {
namespace {

// Python's spelling of a dtype, so that messages match the reference backend.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

// "1 row", "2 rows".
std::string rows_str(int64_t n) { return std::to_string(n) + (n == 1 ? " row" : " rows"); }

// Python's "%g" of a double.
std::string g_format(double v) {
  if (std::isnan(v)) return "nan";  // printf may write "-nan"
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

#define TP_FAIL(op, ...) TORCH_CHECK_VALUE(false, "treepool.", op, ": ", __VA_ARGS__)
#define TP_FAIL_TYPE(op, ...) TORCH_CHECK_TYPE(false, "treepool.", op, ": ", __VA_ARGS__)

void check_rows(const char* op, const char* name, const Tensor& t) {
  if (t.dim() != 2) TP_FAIL(op, name, " must be a 2-D tensor [rows, P], got ", t.dim(), "-D");
  if (!is_floating(t.scalar_type()))
    TP_FAIL_TYPE(op, name, " must have a floating dtype (float32, float64, float16 or "
                 "bfloat16), got ", dtype_name(t.scalar_type()));
}

void check_index(const char* op, const char* name, const Tensor& t, const char* what) {
  if (t.dim() != 1) TP_FAIL(op, name, " must be a 1-D tensor ", what, ", got ", t.dim(), "-D");
  if (t.scalar_type() != at::kLong)
    TP_FAIL_TYPE(op, name, " must have dtype torch.int64, got ", dtype_name(t.scalar_type()));
}

void check_same(const char* op, const char* name, const Tensor& t, const char* ref_name,
                const Tensor& ref) {
  if (t.device() != ref.device())
    TP_FAIL(op, name, " is on ", t.device().str(), " but ", ref_name, " is on ",
            ref.device().str());
}

void check_same_dtype(const char* op, const char* name, const Tensor& t,
                      const char* ref_name, const Tensor& ref) {
  if (t.scalar_type() != ref.scalar_type())
    TP_FAIL_TYPE(op, name, " has dtype ", dtype_name(t.scalar_type()), " but ", ref_name,
                 " has dtype ", dtype_name(ref.scalar_type()));
}

// Byte range [lo, hi) a strided tensor touches; lo == hi for an empty tensor.
std::pair<uintptr_t, uintptr_t> span(const Tensor& t) {
  if (t.numel() == 0) return {0, 0};
  auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t extent = 0;
  for (int64_t i = 0; i < t.dim(); ++i) extent += (t.size(i) - 1) * t.stride(i);
  return {lo, lo + static_cast<uintptr_t>((extent + 1) * t.element_size())};
}

// Whether two [rows, P] tensors with the same row stride s and unit column stride
// interleave without a common element: a holds the columns [0, Pa) of every row of s
// elements, b the columns [d, d + Pb) (mod s) where d is b's start relative to a's
// (theta = buf[:, :P] and phi = buf[:, P:] are disjoint though their spans overlap).
bool interleaved_disjoint(const Tensor& a, const Tensor& b) {
  if (a.dim() != 2 || b.dim() != 2 || a.element_size() != b.element_size()) return false;
  const int64_t s = a.stride(0), pa = a.size(1), pb = b.size(1);
  if (s != b.stride(0) || s <= 0 || a.size(0) < 2 || b.size(0) < 2) return false;
  if ((pa > 1 && a.stride(1) != 1) || (pb > 1 && b.stride(1) != 1) || pa > s || pb > s)
    return false;
  const intptr_t diff = reinterpret_cast<intptr_t>(b.data_ptr()) -
                        reinterpret_cast<intptr_t>(a.data_ptr());
  const intptr_t es = static_cast<intptr_t>(a.element_size());
  if (diff % es != 0) return false;
  const int64_t d = ((static_cast<int64_t>(diff / es) % s) + s) % s;
  return d >= pa && d + pb <= s;
}

bool overlaps(const Tensor& a, const Tensor& b) {
  auto sa = span(a), sb = span(b);
  return sa.first != sa.second && sb.first != sb.second && sa.first < sb.second &&
         sb.first < sa.second && !interleaved_disjoint(a, b);
}

bool same_memory(const Tensor& a, const Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

void check_rows_apart(const char* op, const char* name, const Tensor& t) {
  if (t.numel() > 0 && t.size(1) > 1 && t.stride(1) != 1)
    TP_FAIL(op, name, " must have unit stride along its last dimension");
  if (t.size(0) > 1 && t.size(1) > 0 && t.stride(0) < t.size(1))
    TP_FAIL(op, name, " has rows that overlap each other");
}

}  // namespace

std::vector<int64_t> check_max_pool_args(const char* op, const Tensor& x,
                                         at::IntArrayRef kernel_size) {
  if (kernel_size.size() != 2)
    TP_FAIL(op, "kernel_size must have 2 elements (kh, kw), got ", kernel_size.size());
  if (kernel_size[0] < 1 || kernel_size[1] < 1)
    TP_FAIL(op, "kernel_size must be positive, got (", kernel_size[0], ", ", kernel_size[1], ")");
  if (x.dim() < 2) TP_FAIL(op, "x must have at least 2 dimensions [..., H, W], got ", x.dim(), "-D");
  if (!is_floating(x.scalar_type()))
    TP_FAIL_TYPE(op, "x must have a floating dtype (float32, float64, float16 or bfloat16), got ",
                 dtype_name(x.scalar_type()));
  if (x.size(-2) < kernel_size[0] || x.size(-1) < kernel_size[1])
    TP_FAIL(op, "x's planes [", x.size(-2), ", ", x.size(-1), "] are smaller than the kernel (",
            kernel_size[0], ", ", kernel_size[1], ")");
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes[sizes.size() - 2] /= kernel_size[0];
  sizes[sizes.size() - 1] /= kernel_size[1];
  return sizes;
}

int64_t check_segments(const char* op, const char* x_name, const Tensor& x,
                       const Tensor& offsets, const OptTensor& weights) {
  check_rows(op, x_name, x);
  check_index(op, "offsets", offsets, "[C + 1]");
  check_same(op, "offsets", offsets, x_name, x);
  if (offsets.numel() == 0) TP_FAIL(op, "offsets must have at least one element (offsets[0] = 0)");
  if (weights) {
    check_same(op, "weights", *weights, x_name, x);
    check_same_dtype(op, "weights", *weights, x_name, x);
    if (weights->dim() != 1 || weights->size(0) != x.size(0))
      TP_FAIL(op, "weights must have shape [T] = [", x.size(0), "] (one per row of ", x_name,
              "), got ", shape_str(*weights));
  }
  return offsets.numel() - 1;
}

void check_node_rows(const char* op, const char* name, const Tensor& t, const char* ref_name,
                     const Tensor& ref) {
  check_rows(op, name, t);
  check_same(op, name, t, ref_name, ref);
  check_same_dtype(op, name, t, ref_name, ref);
  if (t.size(1) != ref.size(1))
    TP_FAIL(op, name, " has ", t.size(1), " columns but ", ref_name, " has ", ref.size(1));
}

void check_rate(const char* op, const char* name, const OptTensor& rate, const char* ref_name,
                const Tensor& ref) {
  if (!rate) return;
  check_same(op, name, *rate, ref_name, ref);
  check_same_dtype(op, name, *rate, ref_name, ref);
  int64_t P = ref.size(1);
  if (!(rate->dim() == 0 || (rate->dim() == 1 && rate->size(0) == P)))
    TP_FAIL(op, name, " must be a float, a 0-d tensor or a tensor of shape [P] = [", P,
            "], got shape ", shape_str(*rate));
}

int64_t check_tree_update_args(const char* op, const Tensor& node_params, const Tensor& grads,
                               const Tensor& offsets, const Tensor& parents,
                               const OptTensor& lr_tensor, const OptTensor& weights) {
  int64_t C = check_segments(op, "grads", grads, offsets, weights);
  check_node_rows(op, "node_params", node_params, "grads", grads);
  check_index(op, "parents", parents, "[C]");
  check_same(op, "parents", parents, "grads", grads);
  if (parents.size(0) != C)
    TP_FAIL(op, "parents must have shape [C] = [", C, "] (one per cluster of offsets), got ",
            shape_str(parents));
  check_rate(op, "lr", lr_tensor, "grads", grads);
  return C;
}

int64_t check_reptile_update_args(const char* op, const Tensor& theta, const Tensor& phi,
                                  const Tensor& offsets, const OptTensor& eps_tensor,
                                  const OptTensor& weights) {
  int64_t C = check_segments(op, "phi", phi, offsets, weights);
  check_node_rows(op, "theta", theta, "phi", phi);
  if (theta.size(0) != C)
    TP_FAIL(op, "theta must have one row per cluster: ", rows_str(C), " (offsets has ", C + 1,
            " entries), got ", theta.size(0));
  check_rate(op, "eps", eps_tensor, "phi", phi);
  return C;
}

int64_t check_broadcast_args(const char* op, const Tensor& g, const Tensor& offsets,
                             const OptTensor& weights, int64_t num_rows) {
  check_rows(op, "g", g);
  check_index(op, "offsets", offsets, "[C + 1]");
  check_same(op, "offsets", offsets, "g", g);
  int64_t C = offsets.numel() - 1;
  if (C < 0) TP_FAIL(op, "offsets must have at least one element (offsets[0] = 0)");
  if (g.size(0) != C)
    TP_FAIL(op, "g must have one row per cluster: ", rows_str(C), " (offsets has ", C + 1,
            " entries), got ", g.size(0));
  if (weights) {
    check_same(op, "weights", *weights, "g", g);
    check_same_dtype(op, "weights", *weights, "g", g);
    if (weights->dim() != 1 || weights->size(0) != num_rows)
      TP_FAIL(op, "weights must have shape [T] = [", num_rows, "] (one per output row), got ",
              shape_str(*weights));
  }
  return C;
}

void check_out(const char* op, const Tensor& out, const char* out_name, const Tensor& ref,
               const char* ref_name, int64_t C) {
  check_same(op, out_name, out, ref_name, ref);
  check_same_dtype(op, out_name, out, ref_name, ref);
  if (out.dim() != 2 || out.size(0) != C || out.size(1) != ref.size(1))
    TP_FAIL(op, out_name, " must have shape [C, P] = [", C, ", ", ref.size(1), "], got ",
            shape_str(out));
  check_rows_apart(op, out_name, out);
}

void check_no_overlap(const char* op, const char* out_name, const Tensor& out, const char* name,
                      const OptTensor& t) {
  if (t && overlaps(out, *t)) TP_FAIL(op, out_name, " must not overlap ", name);
}

void check_list(const char* op, const char* name, at::TensorList ts) {
  if (ts.empty()) TP_FAIL(op, name, " must be a tensor or a non-empty list of tensors");
  const std::string first = std::string(name) + "[0]";
  for (size_t i = 1; i < ts.size(); ++i) {
    const std::string here = std::string(name) + "[" + std::to_string(i) + "]";
    check_same(op, here.c_str(), ts[i], first.c_str(), ts[0]);
    check_same_dtype(op, here.c_str(), ts[i], first.c_str(), ts[0]);
    if (ts[i].size(0) != ts[0].size(0))
      TP_FAIL(op, here, " has ", ts[i].size(0), " rows but ", first, " has ", ts[0].size(0));
  }
}

void check_same_length(const char* op, const char* name, size_t n, const char* ref_name,
                       size_t ref_n) {
  if (n != ref_n)
    TP_FAIL(op, name, " has ", n, " tensors but ", ref_name, " has ", ref_n);
}

void check_offsets_values(const char* op, const Tensor& offsets, int64_t num_rows,
                          const char* x_name) {
  auto o = offsets.contiguous();
  const int64_t* v = o.data_ptr<int64_t>();
  int64_t n = o.numel();
  if (v[0] != 0) TP_FAIL(op, "offsets[0] must be 0, got ", v[0]);
  for (int64_t i = 0; i + 1 < n; ++i)
    if (v[i] > v[i + 1])
      TP_FAIL(op, "offsets must be non-decreasing, but offsets[", i, "] = ", v[i], " > offsets[",
              i + 1, "] = ", v[i + 1]);
  if (v[n - 1] != num_rows)
    TP_FAIL(op, "offsets[-1] must equal the number of rows of ", x_name, " (", num_rows,
            "), got ", v[n - 1]);
}

void check_parents_values(const char* op, const Tensor& parents, int64_t num_nodes) {
  auto p = parents.contiguous();
  const int64_t* v = p.data_ptr<int64_t>();
  int64_t n = p.numel();
  for (int64_t i = 0; i < n; ++i) {
    if (v[i] < 0 || v[i] >= num_nodes)
      TP_FAIL(op, "parents[", i, "] = ", v[i], " is out of range for node_params with ",
              rows_str(num_nodes));
    if (i + 1 < n && v[i] > v[i + 1])
      TP_FAIL(op, "parents must be non-decreasing (clusters in DFS order), but parents[", i,
              "] = ", v[i], " > parents[", i + 1, "] = ", v[i + 1]);
  }
}

void check_weights_values(const char* op, const OptTensor& weights) {
  if (!weights) return;
  auto w = weights->to(at::kDouble).contiguous();
  const double* v = w.data_ptr<double>();
  for (int64_t i = 0; i < w.numel(); ++i)
    if (!(v[i] >= 0))  // NaN too
      TP_FAIL(op, "weights must be non-negative, got weights[", i, "] = ", g_format(v[i]));
  for (int64_t i = 0; i < w.numel(); ++i)
    if (std::isinf(v[i]))
      TP_FAIL(op, "weights must be finite, got weights[", i, "] = ", g_format(v[i]));
}

void check_tree_update_values(const char* op, const Tensor& node_params, const Tensor& grads,
                              const Tensor& offsets, const Tensor& parents,
                              const OptTensor& weights) {
  check_offsets_values(op, offsets, grads.size(0), "grads");
  check_parents_values(op, parents, node_params.size(0));
  check_weights_values(op, weights);
}

void check_tree_update_out(const char* op, const Tensor& out, const Tensor& node_params,
                           const Tensor& grads, const Tensor& parents_cpu,
                           const OptTensor& lr_tensor, const OptTensor& weights, int64_t C) {
  check_out(op, out, "out", grads, "grads", C);
  check_no_overlap(op, "out", out, "grads", grads);
  check_no_overlap(op, "out", out, "lr", lr_tensor);
  check_no_overlap(op, "out", out, "weights", weights);
  if (overlaps(out, node_params)) {
    bool identity = same_memory(out, node_params);
    auto p = parents_cpu.contiguous();
    const int64_t* v = p.data_ptr<int64_t>();
    for (int64_t c = 0; identity && c < C; ++c) identity = v[c] == c;
    if (!identity)
      TP_FAIL(op, "out may alias node_params only when it is the same tensor and parents[c] "
              "== c for every c; otherwise pass a separate buffer");
  }
}

void check_reptile_update_out(const char* op, const Tensor& theta, const Tensor& phi,
                              const OptTensor& eps_tensor, const OptTensor& weights) {
  check_rows_apart(op, "theta", theta);
  check_no_overlap(op, "theta", theta, "phi", phi);
  check_no_overlap(op, "theta", theta, "eps", eps_tensor);
  check_no_overlap(op, "theta", theta, "weights", weights);
}

}  // namespace treepool
