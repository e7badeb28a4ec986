// The treepool op schemas (one place for all of them) and the Python module
// `treepool._C`, whose import registers the kernels of csrc/cpu and csrc/cuda.
//
// Semantics (docs/design.md, section 3), with rows of a [T, P] buffer grouped into clusters
// by offsets [C + 1] and an optional per-row weight w:
//   segment_sum(x)                 out[c] = sum_{t in c} w_t x[t]
//   segment_mean(x)                out[c] = segment_sum(x)[c] / sum_{t in c} w_t  (0 if empty)
//   segment_broadcast(g)           out[t] = w_t g[c(t)] (/ sum_{u in c} w_u when mean)
//   tree_update(node, grads)       out[c] = node[parents[c]] - lr * segment_mean(grads)[c]
//   reptile_update(theta, phi)     out[c] = theta[c] + eps * (segment_mean(phi)[c] - theta[c])
// A rate is `lr` (a float) unless `lr_tensor` (0-d or [P]) is given, which replaces it.
//
// One op serves the learners' models rather than the tree:
//   max_pool2d_indices(x, (kh, kw))  where each kh x kw window of x [..., H, W] (stride =
//                                    kernel, floor) has its maximum, as F.max_pool2d's
//                                    indices (csrc/cpu/max_pool_indices_cpu.cpp)
//   bmm_nn, bmm_nt, bmm_tn, outer,   the batched products of the plain-MLP path, whose
//   row_dot, weighted_row_sum,       gradients keep every operand's layout, and a
//   bmm_nt_relu, outer_relu          layer's product with its ReLU
//                                    (csrc/batched_products.h)
//
// Each op also has a multi-tensor form, `<op>_multi`, over a list of [N, P_i] buffers
// (one per model parameter, sharing rows, offsets, weights, dtype and device) in one
// dispatch; its rate tensors are a list too, one per buffer. The single-tensor form
// runs as the list of one.
//
// The in-place ops have Autograd and ADInplaceOrView kernels (inplace_autograd.cpp)
// so that autograd sees what they write.
#include <Python.h>
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(treepool, m) {
  m.def("segment_sum(Tensor x, Tensor offsets, Tensor? weights=None) -> Tensor");
  m.def("segment_mean(Tensor x, Tensor offsets, Tensor? weights=None) -> Tensor");
  m.def(
      "segment_broadcast(Tensor g, Tensor offsets, Tensor? weights, bool mean, "
      "SymInt num_rows) -> Tensor");
  m.def(
      "tree_update(Tensor node_params, Tensor grads, Tensor offsets, Tensor parents, "
      "Tensor? weights=None, float lr=1.0, Tensor? lr_tensor=None) -> Tensor");
  m.def(
      "tree_update_(Tensor(a!) out, Tensor node_params, Tensor grads, Tensor offsets, "
      "Tensor parents, Tensor? weights=None, float lr=1.0, Tensor? lr_tensor=None) -> ()");
  m.def(
      "reptile_update(Tensor theta, Tensor phi, Tensor offsets, Tensor? weights=None, "
      "float eps=1.0, Tensor? eps_tensor=None) -> Tensor");
  m.def(
      "reptile_update_(Tensor(a!) theta, Tensor phi, Tensor offsets, Tensor? weights=None, "
      "float eps=1.0, Tensor? eps_tensor=None) -> ()");

  m.def("segment_sum_multi(Tensor[] x, Tensor offsets, Tensor? weights=None) -> Tensor[]");
  m.def("segment_mean_multi(Tensor[] x, Tensor offsets, Tensor? weights=None) -> Tensor[]");
  m.def(
      "segment_broadcast_multi(Tensor[] g, Tensor offsets, Tensor? weights, bool mean, "
      "SymInt num_rows) -> Tensor[]");
  m.def(
      "tree_update_multi(Tensor[] node_params, Tensor[] grads, Tensor offsets, "
      "Tensor parents, Tensor? weights=None, float lr=1.0, Tensor[]? lr_tensor=None) "
      "-> Tensor[]");
  m.def(
      "tree_update_multi_(Tensor(a!)[] out, Tensor[] node_params, Tensor[] grads, "
      "Tensor offsets, Tensor parents, Tensor? weights=None, float lr=1.0, "
      "Tensor[]? lr_tensor=None) -> ()");
  m.def(
      "reptile_update_multi(Tensor[] theta, Tensor[] phi, Tensor offsets, "
      "Tensor? weights=None, float eps=1.0, Tensor[]? eps_tensor=None) -> Tensor[]");
  m.def(
      "reptile_update_multi_(Tensor(a!)[] theta, Tensor[] phi, Tensor offsets, "
      "Tensor? weights=None, float eps=1.0, Tensor[]? eps_tensor=None) -> ()");

  m.def("max_pool2d_indices(Tensor x, int[2] kernel_size) -> Tensor");

  m.def("bmm_nn(Tensor x, Tensor y, Tensor? acc=None) -> Tensor");
  m.def("bmm_nt(Tensor x, Tensor y, Tensor? bias=None) -> Tensor");
  m.def("bmm_tn(Tensor x, Tensor y) -> Tensor");
  m.def("outer(Tensor g, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("row_dot(Tensor h, Tensor w) -> Tensor");
  m.def("weighted_row_sum(Tensor g, Tensor h) -> Tensor");
  m.def("bmm_nt_relu(Tensor x, Tensor y, Tensor? bias=None) -> Tensor");
  m.def("outer_relu(Tensor g, Tensor w, Tensor? bias=None) -> Tensor");
}

namespace {

// What `python -m treepool info` reports about this build.
PyObject* build_info(PyObject*, PyObject*) {
#ifdef TREEPOOL_WITH_CUDA
  const bool cuda = true;
#ifdef TREEPOOL_CUDA_ARCHS
  const char* archs = TREEPOOL_CUDA_ARCHS;
#else
  const char* archs = "";
#endif
#else
  const bool cuda = false;
  const char* archs = "";
#endif
#ifdef _OPENMP
  const bool openmp = true;
#else
  const bool openmp = false;
#endif
#ifndef TREEPOOL_BUILT_WITH_TORCH
#define TREEPOOL_BUILT_WITH_TORCH "unknown"
#endif
#ifndef TREEPOOL_COMPILE_FLAGS
#define TREEPOOL_COMPILE_FLAGS "unknown"
#endif
  return Py_BuildValue("{s:O,s:O,s:s,s:O,s:s,s:s}", "cpu", Py_True, "cuda",
                       cuda ? Py_True : Py_False, "cuda_archs", archs, "openmp",
                       openmp ? Py_True : Py_False, "torch", TREEPOOL_BUILT_WITH_TORCH,
                       "compile_flags", TREEPOOL_COMPILE_FLAGS);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this build of treepool._C contains."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "treepool's compiled kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
