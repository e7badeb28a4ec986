// Argument checks of the treepool ops, shared by the CPU and CUDA bindings.
//
// They mirror treepool/_checks.py message for message, so that a bad argument raises
// the same Python exception on every backend: TypeError for a wrong dtype,
// ValueError for everything else. Metadata checks need no data; value checks read
// the small index tensors (offsets, parents, weights), which must be on the CPU.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace treepool {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// --- metadata ------------------------------------------------------------------

// x [T, P] floating, offsets [C + 1] int64 on x's device, weights [T] like x. Returns C.
int64_t check_segments(const char* op, const char* x_name, const Tensor& x,
                       const Tensor& offsets, const OptTensor& weights);

// t [rows, P] with the device, dtype and P of ref.
void check_node_rows(const char* op, const char* name, const Tensor& t,
                     const char* ref_name, const Tensor& ref);

// A rate given as a tensor (lr, eps): 0-d or [P], like ref.
void check_rate(const char* op, const char* name, const OptTensor& rate,
                const char* ref_name, const Tensor& ref);

int64_t check_tree_update_args(const char* op, const Tensor& node_params,
                               const Tensor& grads, const Tensor& offsets,
                               const Tensor& parents, const OptTensor& lr_tensor,
                               const OptTensor& weights);

int64_t check_reptile_update_args(const char* op, const Tensor& theta, const Tensor& phi,
                                  const Tensor& offsets, const OptTensor& eps_tensor,
                                  const OptTensor& weights);

int64_t check_broadcast_args(const char* op, const Tensor& g, const Tensor& offsets,
                             const OptTensor& weights, int64_t num_rows);

// An in-place destination [C, P] like ref, with unit column stride and rows apart.
void check_out(const char* op, const Tensor& out, const char* out_name, const Tensor& ref,
               const char* ref_name, int64_t C);

void check_no_overlap(const char* op, const char* out_name, const Tensor& out,
                      const char* name, const OptTensor& t);

// --- list forms ------------------------------------------------------------------

// A list form's tensors (already checked one by one) agree with ts[0]: device, dtype
// and number of rows; the list is not empty.
void check_list(const char* op, const char* name, at::TensorList ts);

// Two lists of one tensor per model parameter have the same length.
void check_same_length(const char* op, const char* name, size_t n, const char* ref_name,
                       size_t ref_n);

// max_pool2d_indices: x [..., H, W] floating, kernel_size (kh, kw) positive and no larger
// than a plane (the twin of _checks.max_pool_args); returns the indices' sizes
// [..., H / kh, W / kw].
std::vector<int64_t> check_max_pool_args(const char* op, const Tensor& x,
                                         at::IntArrayRef kernel_size);

// --- values (index tensors on the CPU) -------------------------------------------

void check_offsets_values(const char* op, const Tensor& offsets, int64_t num_rows,
                          const char* x_name);
void check_parents_values(const char* op, const Tensor& parents, int64_t num_nodes);
void check_weights_values(const char* op, const OptTensor& weights);
// All value checks of a tree update: offsets against grads' rows, parents against
// node_params' rows, weights (the twin of _checks.tree_update_args(values=True)).
void check_tree_update_values(const char* op, const Tensor& node_params, const Tensor& grads,
                              const Tensor& offsets, const Tensor& parents,
                              const OptTensor& weights);

// out overlapping node_params is allowed only for the same tensor and parents[c] == c.
void check_tree_update_out(const char* op, const Tensor& out, const Tensor& node_params,
                           const Tensor& grads, const Tensor& parents_cpu,
                           const OptTensor& lr_tensor, const OptTensor& weights,
                           int64_t C);
void check_reptile_update_out(const char* op, const Tensor& theta, const Tensor& phi,
                              const OptTensor& eps_tensor, const OptTensor& weights);

}  // namespace treepool
