// Autograd and ADInplaceOrView kernels of the in-place ops (tree_update_, reptile_update_
// and their list forms), so that autograd sees what they write, as with torch's own
// in-place ops:
// - Autograd: the ops record no gradient, so with grad mode on they refuse a written
//   leaf that requires grad (torch's message) and any input that requires grad (the
//   message of the public wrappers, treepool/ops.py);
// - ADInplaceOrView: after the kernel has run, the version counter of every written
//   tensor is bumped, so that a tensor saved for backward and then overwritten makes
//   backward raise instead of returning a wrong gradient.
// The written arguments are those the schema marks `(a!)`. torch's generic fallbacks
// do not serve here: they bump only the outputs that alias an input, and these ops
// return nothing.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace treepool {
namespace {

using Stack = std::vector<c10::IValue>;

// Every tensor among the arguments on the stack, with whether the schema writes it.
template <typename Visit>
void for_each_tensor_argument(const c10::OperatorHandle& op, Stack* stack, const Visit& visit) {
  const auto& args = op.schema().arguments();
  const size_t n = args.size();
  for (size_t i = 0; i < n; ++i) {
    const bool written = args[i].alias_info() && args[i].alias_info()->isWrite();
    const c10::IValue& v = (*stack)[stack->size() - n + i];
    if (v.isTensor()) {
      visit(v.toTensor(), written);
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorVector()) visit(t, written);
    }
  }
}

// "treepool::tree_update_multi_" -> "tree_update_", the op's public name.
std::string public_name(const c10::OperatorHandle& op) {
  std::string name = op.schema().name();
  const std::string ns = "treepool::", multi = "_multi";
  if (name.rfind(ns, 0) == 0) name = name.substr(ns.size());
  const size_t at = name.find(multi);
  if (at != std::string::npos) name.erase(at, multi.size());
  return name;
}

void inplace_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    bool leaf = false, any = false;
    for_each_tensor_argument(op, stack, [&](const at::Tensor& t, bool written) {
      if (!t.defined() || !t.requires_grad()) return;
      any = true;
      leaf = leaf || (written && t.is_leaf());
    });
    TORCH_CHECK(!leaf, "a leaf Variable that requires grad is being used in an in-place "
                "operation.");
    TORCH_CHECK(!any, "treepool.", public_name(op), ": in-place ops do not record gradients; "
                "call it under torch.no_grad() or use the out-of-place form");
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void inplace_bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           Stack* stack) {
  std::vector<at::Tensor> written;
  for_each_tensor_argument(op, stack, [&](const at::Tensor& t, bool w) {
    if (w && t.defined()) written.push_back(t);
  });
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
}

constexpr const char* kInplaceOps[] = {"tree_update_", "reptile_update_", "tree_update_multi_",
                                       "reptile_update_multi_"};

}  // namespace

TORCH_LIBRARY_IMPL(treepool, Autograd, m) {
  for (const char* op : kInplaceOps)
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&inplace_autograd>());
}

TORCH_LIBRARY_IMPL(treepool, ADInplaceOrView, m) {
  for (const char* op : kInplaceOps)
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&inplace_bump_versions>());
}

}  // namespace treepool
