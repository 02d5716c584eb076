// The autograd of the fully fused MLP (fused_mlp_checks.h): one graph node per call, whose
// backward is one call of fused_mlp_backward. As for the other ops (autograd.cpp), torch.func
// transforms and dual tensors go to the Python autograd.Function of fastops.ops.fused_mlp.
//
// A second derivative is not supported: the backward raises when it is itself recorded
// (create_graph=True), rather than returning gradients that would silently lack their graph.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "autograd_common.h"

namespace fastops {
namespace {

using BiasList = c10::List<c10::optional<Tensor>>;

BiasList bias_list(at::TensorList biases) {
  BiasList out;
  for (const Tensor& b : biases) out.push_back(b);
  return out;
}

struct FusedMlpFn : torch::autograd::Function<FusedMlpFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<std::tuple<Tensor, std::vector<Tensor>, Tensor>(
        const Tensor&, at::TensorList, const BiasList&, c10::string_view, c10::string_view,
        bool)>("fastops::fused_mlp");
    return handle;
  }
  // Variables: input, the L weights, the biases (none or L). Returns (output, out_preact,
  // hidden...), the saved tensors being non-differentiable outputs.
  static tensor_list forward(AutogradContext* ctx, const Tensor& input, at::TensorList weights,
                             at::TensorList biases, c10::string_view activation,
                             c10::string_view output_activation, bool save_for_backward) {
    Tensor out, out_preact;
    std::vector<Tensor> hidden;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, hidden, out_preact) = op().call(input, weights, bias_list(biases), activation,
                                                    output_activation, save_for_backward);
    }
    ctx->set_materialize_grads(false);
    tensor_list result{out, out_preact};
    result.insert(result.end(), hidden.begin(), hidden.end());
    ctx->mark_non_differentiable(tensor_list(result.begin() + 1, result.end()));
    std::vector<Tensor> saved{input};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases.begin(), biases.end());
    saved.push_back(out_preact);
    saved.insert(saved.end(), hidden.begin(), hidden.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["layers"] = static_cast<int64_t>(weights.size());
    ctx->saved_data["has_bias"] = !biases.empty();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["output_activation"] = std::string(output_activation);
    ctx->saved_data["saved"] = save_for_backward;
    return result;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op = typed_op<std::tuple<Tensor, std::vector<Tensor>,
                                                        std::vector<Tensor>>(
        const Tensor&, const Tensor&, at::TensorList, const BiasList&, at::TensorList,
        const Tensor&, c10::string_view, c10::string_view, std::array<bool, 3>)>(
        "fastops::fused_mlp_backward");
    const int64_t L = ctx->saved_data["layers"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t nb = has_bias ? L : 0;
    // one entry per argument of forward: input, weights, biases, then the three non-tensors
    tensor_list result(1 + L + nb + 3);
    bool any_w = false, any_b = false;
    for (int64_t l = 0; l < L; ++l) any_w = any_w || ctx->needs_input_grad(1 + l);
    for (int64_t l = 0; l < nb; ++l) any_b = any_b || ctx->needs_input_grad(1 + L + l);
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), any_w, any_b};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return result;
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fastops.fused_mlp does not support a second derivative (a backward with "
                "create_graph=True, torch.autograd.grad of a gradient); use the layer-by-layer "
                "modules for it: FusedMLP.to_sequential() or fastops.nn.convert(model)");
    TORCH_CHECK(ctx->saved_data["saved"].toBool(),
                "fastops.fused_mlp: backward needs the saved pre-activations, but forward ran "
                "with save_for_backward=False; pass save_for_backward=True when a gradient is "
                "needed");
    const auto saved = ctx->get_saved_variables();
    const std::vector<Tensor> weights(saved.begin() + 1, saved.begin() + 1 + L);
    const std::vector<Tensor> biases(saved.begin() + 1 + L, saved.begin() + 1 + L + nb);
    const Tensor& out_preact = saved[1 + L + nb];
    const std::vector<Tensor> hidden(saved.begin() + 2 + L + nb, saved.end());
    auto [gi, gw, gb] = backward_op.call(
        grads[0], saved[0], weights, bias_list(biases), hidden, out_preact,
        ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["output_activation"].toStringRef(), mask);
    result[0] = if_needed(mask[0], gi);
    for (int64_t l = 0; l < L; ++l) {
      result[1 + l] = if_needed(ctx->needs_input_grad(1 + l), gw[l]);
      if (has_bias) result[1 + L + l] = if_needed(ctx->needs_input_grad(1 + L + l), gb[l]);
    }
    return result;
  }
};

std::tuple<Tensor, std::vector<Tensor>, Tensor> fused_mlp_autograd(
    const Tensor& input, at::TensorList weights, const BiasList& biases,
    c10::string_view activation, c10::string_view output_activation, bool save_for_backward) {
  bool wants_graph = at::GradMode::is_enabled() && input.requires_grad();
  bool tangent = has_tangent(input);
  std::vector<Tensor> bias_tensors;
  for (const Tensor& w : weights) {
    wants_graph = wants_graph || (at::GradMode::is_enabled() && w.requires_grad());
    tangent = tangent || has_tangent(w);
  }
  for (size_t l = 0; l < biases.size(); ++l) {
    const c10::optional<Tensor> b = biases.get(l);
    if (!b.has_value() || !b->defined()) continue;
    bias_tensors.push_back(*b);
    wants_graph = wants_graph || (at::GradMode::is_enabled() && b->requires_grad());
    tangent = tangent || has_tangent(*b);
  }
  if (tangent)
    return python_autograd(FusedMlpFn::op(), input, weights, biases, activation,
                           output_activation, save_for_backward);
  // a mix of given and None biases goes to the kernel, whose check names the problem
  if (wants_graph && (bias_tensors.empty() || bias_tensors.size() == biases.size())) {
    const tensor_list out = FusedMlpFn::apply(input, weights, at::TensorList(bias_tensors),
                                              activation, output_activation, save_for_backward);
    return {out[0], std::vector<Tensor>(out.begin() + 2, out.end()), out[1]};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return FusedMlpFn::op().call(input, weights, biases, activation, output_activation,
                               save_for_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, Autograd, m) {
  m.impl("fused_mlp", &fused_mlp_autograd);
  m.impl("fused_mlp_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastops
