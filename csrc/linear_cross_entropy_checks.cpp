#include "linear_cross_entropy_checks.h"

#include "checks.h"

namespace fastops {

using at::Tensor;

LceDims check_linear_cross_entropy(const Tensor& input, const Tensor& weight,
                                   const c10::optional<Tensor>& bias, const Tensor& target,
                                   const c10::optional<Tensor>& class_weight, int64_t reduction,
                                   double label_smoothing, double z_loss, double softcap,
                                   const char* op) {
  check_reduction(reduction, op);
  check_floating(input, op, "input");
  check_same_dtype(input, weight, op, "input", "weight");
  check_same_device(input, weight, op, "input", "weight");
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape (N, in_features), got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": expected weight of shape (num_classes, in_features), "
              "got shape ", weight.sizes());
  const int64_t N = input.size(0), H = input.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == H, op, ": expected weight of shape (num_classes, ", H,
              ") to match input's in_features, got shape ", weight.sizes());
  TORCH_CHECK(V > 0, op, ": expected weight with at least one class, got shape ",
              weight.sizes());
  if (bias.has_value() && bias->defined()) {
    check_same_dtype(input, *bias, op, "input", "bias");
    check_same_device(input, *bias, op, "input", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, op, ": expected bias of shape (", V,
                ",), got shape ", bias->sizes());
  }
  if (class_weight.has_value() && class_weight->defined()) {
    check_same_dtype(input, *class_weight, op, "input", "class_weight");
    check_same_device(input, *class_weight, op, "input", "class_weight");
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == V, op,
                ": expected class_weight of shape (", V, ",), got shape ",
                class_weight->sizes());
  }
  TORCH_CHECK(target.defined(), op, ": target is an undefined tensor");
  check_same_device(input, target, op, "input", "target");
  const bool soft = at::isFloatingType(target.scalar_type());
  if (soft) {
    TORCH_CHECK_TYPE(target.scalar_type() == input.scalar_type(), op,
                     ": class-probability target must have the dtype of input (",
                     input.scalar_type(), "), got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == V, op,
                ": class-probability target must have shape (", N, ", ", V, "), got shape ",
                target.sizes());
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op,
                     ": class-index target must be int64, got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op,
                ": class-index target must have shape (", N, ",), got shape ", target.sizes());
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0, op, ": softcap must be >= 0 (0: no cap), got ", softcap);
  return {N, H, V, soft};
}

LceDims check_linear_cross_entropy_backward(
    const Tensor& grad_loss, const Tensor& input, const Tensor& weight,
    const c10::optional<Tensor>& bias, const Tensor& target,
    const c10::optional<Tensor>& class_weight, const Tensor& lse, int64_t reduction,
    double label_smoothing, double z_loss, double softcap, const char* op) {
  const LceDims d = check_linear_cross_entropy(input, weight, bias, target, class_weight,
                                               reduction, label_smoothing, z_loss, softcap, op);
  check_floating(grad_loss, op, "grad_loss");
  check_same_device(input, grad_loss, op, "input", "grad_loss");
  if (reduction == 0) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == d.N, op,
                ": expected grad_loss of shape (", d.N, ",) for reduction 'none', got shape ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op,
                ": expected a single-element grad_loss for a reduced loss, got shape ",
                grad_loss.sizes());
  }
  const auto adt = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_same_device(input, lse, op, "input", "lse");
  TORCH_CHECK(lse.scalar_type() == adt && lse.dim() == 1 && lse.size(0) == d.N, op,
              ": expected lse of shape (", d.N, ",) and dtype ", adt, ", got shape ",
              lse.sizes(), " and dtype ", lse.scalar_type());
  return d;
}

}  // namespace fastops
