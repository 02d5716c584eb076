// The autograd of the fused linear + cross entropy (CPU and CUDA alike).
//
// Reductions mean and sum: the forward runs with with_grad and so returns the gradients for
// grad_loss = 1, computed from the same logit tiles as the loss (no GEMM is repeated); the node
// saves those three tensors (N x H, V x H, V: never N x V) and its backward only scales them by
// grad_loss. Reduction none: the node saves the inputs and lse, and its backward calls
// linear_cross_entropy_backward, which recomputes the logit tiles.
//
// A class-probability target gets its gradient (from recomputed logits: it has the target's
// size). Not supported: gradients of class-index targets and class_weight (an error if they
// require grad), second derivatives (an error when the backward is recorded), forward-mode AD.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "autograd_common.h"

namespace fastops {
namespace {

using Result = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

const auto& lce_op() {
  static const auto handle = typed_op<Result(
      const Tensor&, const Tensor&, const c10::optional<Tensor>&, const Tensor&,
      const c10::optional<Tensor>&, int64_t, int64_t, double, double, double, bool)>(
      "fastops::linear_cross_entropy");
  return handle;
}

void check_no_second_order() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "fastops.linear_cross_entropy: a second derivative of linear_cross_entropy is not "
              "supported (backward with create_graph=True, hessian); use torch's "
              "F.linear_cross_entropy with options=None for higher order");
}

// grad (computed for grad_loss = 1) times grad_loss, skipped for a plain CPU grad_loss of 1.
Tensor scaled(const Tensor& grad, const Tensor& grad_loss) {
  if (!grad.defined()) return grad;
  // (fake and functional tensors, those of tracing, have no value to look at)
  const bool plain_cpu = grad_loss.is_cpu() &&
                         !grad_loss.key_set().has(c10::DispatchKey::Python) &&
                         !grad_loss.key_set().has(c10::DispatchKey::Functionalize) &&
                         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python);
  if (plain_cpu && grad_loss.numel() == 1 && grad_loss.item<double>() == 1.0) return grad;
  return grad * grad_loss.to(grad.scalar_type());
}

// The gradient of a class-probability target: -(1 - label_smoothing) w_c log p_c per element,
// scaled by grad_loss (/ N for mean). It has the target's N x V size, so the logits are
// recomputed here with at::linear.
Tensor soft_target_grad(const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
                        const Tensor& bias, const Tensor& class_weight, const Tensor& lse,
                        int64_t reduction, double label_smoothing, double softcap) {
  const auto adt = lse.scalar_type();
  Tensor z = at::linear(input.to(adt), weight.to(adt),
                        bias.defined() ? c10::optional<Tensor>(bias.to(adt)) : c10::nullopt);
  if (softcap > 0) z = at::tanh(z / softcap) * softcap;
  Tensor g = (z - lse.unsqueeze(1)) * (label_smoothing - 1.0);
  if (class_weight.defined()) g = g * class_weight.to(adt);
  const Tensor gl = grad_loss.to(adt);
  if (reduction == 0) g = g * gl.unsqueeze(1);
  else g = g * (reduction == 1 ? gl / static_cast<double>(input.size(0)) : gl);
  return g.to(input.scalar_type());
}

struct LinearCrossEntropyFn : torch::autograd::Function<LinearCrossEntropyFn> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                             const c10::optional<Tensor>& bias, const Tensor& target,
                             const c10::optional<Tensor>& class_weight, int64_t reduction,
                             int64_t ignore_index, double label_smoothing, double z_loss,
                             double softcap) {
    const bool precomputed = reduction != 0;
    Tensor loss, lse, gi, gw, gb;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, lse, gi, gw, gb) =
          lce_op().call(input, weight, bias, target, class_weight, reduction, ignore_index,
                        label_smoothing, z_loss, softcap, precomputed);
    }
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({lse});
    ctx->saved_data["precomputed"] = precomputed;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    // the inputs are needed to recompute the tiles (reduction none) or the log-probabilities
    // (gradient of a probability target)
    const bool keep_inputs = !precomputed || requires_grad(target);
    const Tensor none;
    ctx->save_for_backward({keep_inputs ? input : none, keep_inputs ? weight : none,
                            keep_inputs ? value_or_undefined(bias) : none,
                            keep_inputs ? target : none,
                            keep_inputs ? value_or_undefined(class_weight) : none, lse, gi, gw,
                            gb});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["softcap"] = softcap;
    return {loss, lse};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    tensor_list result(10);
    if (!grads[0].defined()) return result;
    check_no_second_order();
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    const double softcap = ctx->saved_data["softcap"].toDouble();
    // needs_input_grad counts the tensor arguments present: target follows bias when given
    if (ctx->needs_input_grad(has_bias ? 3 : 2))
      result[3] = soft_target_grad(grads[0], saved[0], saved[1], saved[2], saved[4], saved[5],
                                   reduction, label_smoothing, softcap);
    if (ctx->saved_data["precomputed"].toBool()) {
      for (int i = 0; i < 3; ++i)
        if (mask[i]) result[i] = scaled(saved[6 + i], grads[0]);
      return result;
    }
    if (!mask[0] && !mask[1] && !mask[2]) return result;
    static const auto backward_op = typed_op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
        const Tensor&, const c10::optional<Tensor>&, const Tensor&, int64_t, int64_t, double,
        double, double, std::array<bool, 3>)>("fastops::linear_cross_entropy_backward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gi, gw, gb] = backward_op.call(
        grads[0], saved[0], saved[1], optional_of(saved[2]), saved[3], optional_of(saved[4]),
        saved[5], reduction, ctx->saved_data["ignore_index"].toInt(), label_smoothing,
        ctx->saved_data["z_loss"].toDouble(), softcap, mask);
    result[0] = if_needed(mask[0], gi);
    result[1] = if_needed(mask[1], gw);
    result[2] = if_needed(mask[2], gb);
    return result;
  }
};

void check_not_differentiable(const c10::optional<Tensor>& t, const char* arg) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && requires_grad(t)),
              "fastops.linear_cross_entropy is not differentiable with respect to argument '",
              arg, "'. This input cannot have requires_grad True.");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, Autograd, m) {
  m.impl("linear_cross_entropy",
         [](const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
            const Tensor& target, const c10::optional<Tensor>& class_weight, int64_t reduction,
            int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
            bool with_grad) -> Result {
           if (needs_forward_ad(input, weight, bias, target, class_weight))
             return python_autograd(lce_op(), input, weight, bias, target, class_weight,
                                    reduction, ignore_index, label_smoothing, z_loss, softcap,
                                    with_grad);
           const bool soft = target.is_floating_point();
           if (!soft) check_not_differentiable(target, "target");
           check_not_differentiable(class_weight, "class_weight");
           if (needs_graph(input, weight, bias) || (soft && needs_graph(target))) {
             const auto out = LinearCrossEntropyFn::apply(input, weight, bias, target,
                                                          class_weight, reduction, ignore_index,
                                                          label_smoothing, z_loss, softcap);
             const Tensor none = at::empty({0}, input.options());
             return {out[0], out[1], none, none, none};
           }
           at::AutoDispatchBelowADInplaceOrView guard;
           return lce_op().call(input, weight, bias, target, class_weight, reduction,
                                ignore_index, label_smoothing, z_loss, softcap, with_grad);
         });
  m.impl("linear_cross_entropy_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace fastops
