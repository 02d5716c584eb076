// What the autograd kernels of autograd.cpp (the ops) and autograd_second_order.cpp (their
// backward ops) share: finding ops, deciding whether a call records a node, and where calls
// with dual tensors go.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastops {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

template <class Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline c10::optional<Tensor> optional_of(const Tensor& t) {
  return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt;
}

inline Tensor value_or_undefined(const c10::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

inline Tensor if_needed(bool needed, Tensor t) { return needed ? std::move(t) : Tensor(); }

// Whether a call must record a graph node: grad mode is on and a tensor argument requires grad.
// Otherwise the op runs straight below autograd, without the cost of a node.
inline bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const c10::optional<Tensor>& t) {
  return t.has_value() && requires_grad(*t);
}
template <class... Tensors>
inline bool needs_graph(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

// Runs a node's calls of backward ops: below autograd in an ordinary backward (grad mode off);
// through their autograd, to be differentiated again, when the backward is recorded.
class BackwardCalls {
  c10::optional<at::AutoDispatchBelowADInplaceOrView> below_;

 public:
  BackwardCalls() {
    if (!at::GradMode::is_enabled()) below_.emplace();
  }
};

// Forward-mode AD: a dual tensor (torch.autograd.forward_ad) among the inputs. Such a call goes
// to the Python autograd.Function of the op (its jvp formula), registered as the op's kernel for
// kPythonAutograd by fastops.ops.
inline bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(0).defined(); }
inline bool has_tangent(const c10::optional<Tensor>& t) {
  return t.has_value() && has_tangent(*t);
}
template <class... Tensors>
inline bool needs_forward_ad(const Tensors&... tensors) {
  return (has_tangent(tensors) || ...);
}
inline const c10::DispatchKeySet kPythonAutograd(
    c10::DispatchKey::FuncTorchDynamicLayerFrontMode);

inline void check_python_autograd(const c10::OperatorHandle& op) {
  TORCH_CHECK(op.hasKernelForDispatchKey(c10::DispatchKey::FuncTorchDynamicLayerFrontMode),
              op.schema().name(),
              ": forward-mode AD needs the jvp formulas of the fastops Python package; import "
              "fastops, or use reverse mode");
}

// What make(op) derives from an op (e.g. its variants, found by name), computed at the op's
// first call and kept: no lookup by name on every call. One cache per caller (per Make type).
template <class T, class Make>
const T& per_op(const c10::OperatorHandle& op, Make make) {
  static std::mutex mutex;
  // node-based: the references handed out stay valid as entries are added
  static std::unordered_map<c10::OperatorHandle, T> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(op);
  if (it == cache.end()) it = cache.emplace(op, make(op)).first;
  return it->second;
}

inline void push_params(torch::jit::Stack& stack, const std::vector<double>& params) {
  for (double p : params) stack.emplace_back(p);
}

// A call with dual tensors, sent to the op's Python autograd.Function (see needs_forward_ad).
template <class Sig, class... Args>
inline auto python_autograd(const c10::TypedOperatorHandle<Sig>& op, const Args&... args) {
  check_python_autograd(op);
  return op.redispatch(kPythonAutograd, args...);
}

}  // namespace fastops
