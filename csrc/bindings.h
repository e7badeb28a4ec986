// The one binding layer of the treepool ops, shared by the CPU and CUDA backends.
//
// Every op runs in its list form (`<op>_multi`, Tensor[]); the single-tensor form is
// the list of one. For an op, a `prepare_*` function (bindings.cpp)
//   1. checks the metadata of every argument (csrc/checks.h, the messages of
//      treepool/_checks.py), the list as a whole, then
//   2. calls the engine's `enter(device)`, which makes the device current and says
//      whether the index tensors' values can be read on the host now (not during CUDA
//      graph capture), and if so checks the values (offsets, parents, weights),
//   3. allocates the outputs (or takes the in-place ones) and fills one torch-free
//      argument struct (csrc/segment_args.h) per tensor of the list.
// The engine then runs the structs: the CPU engine all tensors in one parallel region
// (csrc/cpu), the CUDA engine one launch per 16 tensors (csrc/cuda/bindings_cuda.cpp).
// `register_ops<Engine>` registers all fourteen segment ops of a backend over its engine
// (max_pool2d_indices, the models' op, registers itself: csrc/cpu, csrc/cuda).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <functional>
#include <optional>
#include <vector>

#include "checks.h"
#include "segment_args.h"

namespace treepool {

using Tensors = std::vector<Tensor>;
using OptTensorList = std::optional<at::TensorList>;

// Called once the metadata checks have passed, with the device of the data: makes it
// current and returns whether the index tensors' values may be read on the host.
using Enter = std::function<bool(const at::Device&)>;

// A checked call: the argument structs, one per tensor of the list, and the tensors
// they point into (outputs, row views, contiguous index and rate tensors), which live
// as long as the call.
template <typename Args>
struct Call {
  std::vector<Args> args;
  Tensors outs;
  Tensors keep;
};
using ReduceCall = Call<SegmentReduceArgs>;
using BroadcastCall = Call<SegmentBroadcastArgs>;

ReduceCall prepare_segment_reduce(const char* op, at::TensorList x, const Tensor& offsets,
                                  const OptTensor& weights, bool mean, const Enter& enter);

BroadcastCall prepare_segment_broadcast(const char* op, at::TensorList g, const Tensor& offsets,
                                        const OptTensor& weights, bool mean, int64_t num_rows,
                                        const Enter& enter);

// out == nullopt: new outputs; else the in-place tree_update_ into `out`.
ReduceCall prepare_tree_update(const char* op, const OptTensorList& out,
                               at::TensorList node_params, at::TensorList grads,
                               const Tensor& offsets, const Tensor& parents,
                               const OptTensor& weights, double lr, const OptTensorList& lr_tensor,
                               const Enter& enter);

// in_place: reptile_update_, written into theta.
ReduceCall prepare_reptile_update(const char* op, bool in_place, at::TensorList theta,
                                  at::TensorList phi, const Tensor& offsets,
                                  const OptTensor& weights, double eps,
                                  const OptTensorList& eps_tensor, const Enter& enter);

// The ops of a backend over its engine: a default-constructible class with
//   bool enter(const at::Device&);      (see Enter)
//   void reduce(const ReduceCall&);
//   void broadcast(const BroadcastCall&);
// one object per call (it may hold a device guard).
template <typename Engine>
struct Ops {
  static Tensors reduce(const char* op, at::TensorList x, const Tensor& offsets,
                        const OptTensor& weights, bool mean) {
    Engine e;
    ReduceCall call = prepare_segment_reduce(op, x, offsets, weights, mean, enter(e));
    e.reduce(call);
    return call.outs;
  }
  static Tensors segment_sum_multi(at::TensorList x, const Tensor& offsets,
                                   const OptTensor& weights) {
    return reduce("segment_sum", x, offsets, weights, /*mean=*/false);
  }
  static Tensors segment_mean_multi(at::TensorList x, const Tensor& offsets,
                                    const OptTensor& weights) {
    return reduce("segment_mean", x, offsets, weights, /*mean=*/true);
  }
  static Tensors segment_broadcast_multi(at::TensorList g, const Tensor& offsets,
                                         const OptTensor& weights, bool mean, int64_t num_rows) {
    Engine e;
    BroadcastCall call =
        prepare_segment_broadcast("segment_broadcast", g, offsets, weights, mean, num_rows, enter(e));
    e.broadcast(call);
    return call.outs;
  }
  static Tensors tree_update_multi(at::TensorList node_params, at::TensorList grads,
                                   const Tensor& offsets, const Tensor& parents,
                                   const OptTensor& weights, double lr, OptTensorList lr_tensor) {
    Engine e;
    ReduceCall call = prepare_tree_update("tree_update", std::nullopt, node_params, grads, offsets,
                                          parents, weights, lr, lr_tensor, enter(e));
    e.reduce(call);
    return call.outs;
  }
  static void tree_update_multi_(at::TensorList out, at::TensorList node_params,
                                 at::TensorList grads, const Tensor& offsets,
                                 const Tensor& parents, const OptTensor& weights, double lr,
                                 OptTensorList lr_tensor) {
    Engine e;
    e.reduce(prepare_tree_update("tree_update_", out, node_params, grads, offsets, parents,
                                 weights, lr, lr_tensor, enter(e)));
  }
  static Tensors reptile_update_multi(at::TensorList theta, at::TensorList phi,
                                      const Tensor& offsets, const OptTensor& weights, double eps,
                                      OptTensorList eps_tensor) {
    Engine e;
    ReduceCall call = prepare_reptile_update("reptile_update", /*in_place=*/false, theta, phi,
                                             offsets, weights, eps, eps_tensor, enter(e));
    e.reduce(call);
    return call.outs;
  }
  static void reptile_update_multi_(at::TensorList theta, at::TensorList phi,
                                    const Tensor& offsets, const OptTensor& weights, double eps,
                                    OptTensorList eps_tensor) {
    Engine e;
    e.reduce(prepare_reptile_update("reptile_update_", /*in_place=*/true, theta, phi, offsets,
                                    weights, eps, eps_tensor, enter(e)));
  }

  // --- single-tensor forms: the list of one ----------------------------------------
  static Tensor segment_sum(const Tensor& x, const Tensor& offsets, const OptTensor& weights) {
    return segment_sum_multi(x, offsets, weights)[0];
  }
  static Tensor segment_mean(const Tensor& x, const Tensor& offsets, const OptTensor& weights) {
    return segment_mean_multi(x, offsets, weights)[0];
  }
  static Tensor segment_broadcast(const Tensor& g, const Tensor& offsets,
                                  const OptTensor& weights, bool mean, int64_t num_rows) {
    return segment_broadcast_multi(g, offsets, weights, mean, num_rows)[0];
  }
  static Tensor tree_update(const Tensor& node_params, const Tensor& grads, const Tensor& offsets,
                            const Tensor& parents, const OptTensor& weights, double lr,
                            const OptTensor& lr_tensor) {
    return tree_update_multi(node_params, grads, offsets, parents, weights, lr, one(lr_tensor))[0];
  }
  static void tree_update_(Tensor& out, const Tensor& node_params, const Tensor& grads,
                           const Tensor& offsets, const Tensor& parents, const OptTensor& weights,
                           double lr, const OptTensor& lr_tensor) {
    tree_update_multi_(out, node_params, grads, offsets, parents, weights, lr, one(lr_tensor));
  }
  static Tensor reptile_update(const Tensor& theta, const Tensor& phi, const Tensor& offsets,
                               const OptTensor& weights, double eps, const OptTensor& eps_tensor) {
    return reptile_update_multi(theta, phi, offsets, weights, eps, one(eps_tensor))[0];
  }
  static void reptile_update_(Tensor& theta, const Tensor& phi, const Tensor& offsets,
                              const OptTensor& weights, double eps, const OptTensor& eps_tensor) {
    reptile_update_multi_(theta, phi, offsets, weights, eps, one(eps_tensor));
  }

 private:
  static Enter enter(Engine& e) {
    return [&e](const at::Device& d) { return e.enter(d); };
  }
  static OptTensorList one(const OptTensor& t) {
    return t ? OptTensorList(at::TensorList(*t)) : std::nullopt;
  }
};

template <typename Engine>
void register_ops(torch::Library& m) {
  using O = Ops<Engine>;
  m.impl("segment_sum", &O::segment_sum);
  m.impl("segment_mean", &O::segment_mean);
  m.impl("segment_broadcast", &O::segment_broadcast);
  m.impl("tree_update", &O::tree_update);
  m.impl("tree_update_", &O::tree_update_);
  m.impl("reptile_update", &O::reptile_update);
  m.impl("reptile_update_", &O::reptile_update_);
  m.impl("segment_sum_multi", &O::segment_sum_multi);
  m.impl("segment_mean_multi", &O::segment_mean_multi);
  m.impl("segment_broadcast_multi", &O::segment_broadcast_multi);
  m.impl("tree_update_multi", &O::tree_update_multi);
  m.impl("tree_update_multi_", &O::tree_update_multi_);
  m.impl("reptile_update_multi", &O::reptile_update_multi);
  m.impl("reptile_update_multi_", &O::reptile_update_multi_);
}

}  // namespace treepool
