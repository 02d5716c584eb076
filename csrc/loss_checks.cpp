#include "loss_checks.h"

#include <ATen/ExpandUtils.h>

namespace fastops {
namespace loss {

using at::Tensor;

Rows class_rows(const Tensor& self, const char* op) {
  TORCH_CHECK(self.dim() >= 1, op, ": expected self to have 1 or more dimensions ((C,), (N, C) "
              "or (N, C, d1, ..., dk)), got a 0-d tensor");
  if (self.dim() == 1) return {1, self.size(0), 1};
  int64_t S = 1;
  for (int64_t d = 2; d < self.dim(); ++d) S *= self.size(d);
  return {self.size(0), self.size(1), S};
}

std::vector<int64_t> row_shape(const Tensor& self) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d < self.dim(); ++d)
    if (d != (self.dim() == 1 ? 0 : 1)) s.push_back(self.size(d));
  return s;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_index_dtype(at::ScalarType t) { return t == at::kLong || t == at::kByte; }

void check_target(const Tensor& self, const Tensor& target, const char* op, bool allow_soft) {
  TORCH_CHECK(target.defined(), op, ": target is an undefined tensor");
  check_same_device(self, target, op, "self", "target");
  const auto tt = target.scalar_type();
  if (allow_soft && at::isFloatingType(tt)) {
    TORCH_CHECK_TYPE(tt == self.scalar_type(), op, ": class-probability target must have the "
                     "dtype of self (", self.scalar_type(), "), got ", tt);
    TORCH_CHECK(target.sizes() == self.sizes(), op, ": class-probability target must have the "
                "shape of self ", self.sizes(), ", got ", target.sizes());
    return;
  }
  TORCH_CHECK_TYPE(is_index_dtype(tt), op, ": expected target to hold class indices as int64 "
                   "(Long) or uint8 (Byte)",
                   allow_soft ? ", or class probabilities in the dtype of self" : "", ", got ", tt);
  const auto expected = row_shape(self);
  TORCH_CHECK(target.sizes() == at::IntArrayRef(expected), op, ": expected target of shape ",
              at::IntArrayRef(expected), " (self ", self.sizes(),
              " without its class dim), got ", target.sizes());
}

void check_weight(const Tensor& self, const c10::optional<Tensor>& weight, int64_t C,
                  const char* op) {
  if (!weight.has_value() || !weight->defined()) return;
  const Tensor& w = *weight;
  check_same_device(self, w, op, "self", "weight");
  check_floating(w, op, "weight");
  check_same_dtype(self, w, op, "self", "weight");
  TORCH_CHECK(w.dim() == 1 && w.numel() == C, op, ": expected weight to be a 1-D tensor of ", C,
              " elements (one per class), got shape ", w.sizes());
}

Tensor weight_or_undefined(const c10::optional<Tensor>& weight) {
  if (!weight.has_value() || !weight->defined()) return Tensor();
  return weight->contiguous();
}

void check_grad_output(const Tensor& grad_output, const Tensor& self, int64_t reduction,
                       at::IntArrayRef unreduced_shape, const char* op) {
  TORCH_CHECK(grad_output.defined(), op, ": grad_output is an undefined tensor");
  check_same_device(self, grad_output, op, "self", "grad_output");
  check_floating(grad_output, op, "grad_output");
  if (reduction == kNone) {
    TORCH_CHECK(grad_output.sizes() == unreduced_shape, op, ": expected grad_output of shape ",
                unreduced_shape, " (reduction='none'), got ", grad_output.sizes());
  } else {
    TORCH_CHECK(grad_output.numel() == 1, op,
                ": expected a one-element grad_output for a reduced loss, got shape ",
                grad_output.sizes());
  }
}

static void check_total_weight(const Tensor& total_weight, const char* op) {
  TORCH_CHECK(total_weight.defined() && total_weight.numel() == 1, op,
              ": expected a one-element total_weight, got shape ", total_weight.sizes());
}

Rows check_cross_entropy(const Tensor& self, const Tensor& target,
                         const c10::optional<Tensor>& weight, int64_t reduction,
                         double label_smoothing, const char* op) {
  check_floating(self, op, "self");
  check_reduction(reduction, op);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  const Rows r = class_rows(self, op);
  check_target(self, target, op, /*allow_soft=*/true);
  check_weight(self, weight, r.C, op);
  return r;
}

Rows check_cross_entropy_backward(const Tensor& grad_output, const Tensor& self,
                                  const Tensor& target, const c10::optional<Tensor>& weight,
                                  int64_t reduction, const Tensor& lse,
                                  const Tensor& total_weight, const char* op) {
  check_floating(self, op, "self");
  check_reduction(reduction, op);
  const Rows r = class_rows(self, op);
  check_target(self, target, op, /*allow_soft=*/true);
  check_weight(self, weight, r.C, op);
  const auto rshape = row_shape(self);
  check_grad_output(grad_output, self, reduction, rshape, op);
  const auto adt = acc_dtype(self.scalar_type());
  TORCH_CHECK(lse.defined() && lse.scalar_type() == adt && lse.sizes() == at::IntArrayRef(rshape),
              op, ": expected lse of dtype ", adt, " and shape ", at::IntArrayRef(rshape),
              " (the second output of fastops.cross_entropy), got ", lse.scalar_type(), " ",
              lse.sizes());
  check_total_weight(total_weight, op);
  return r;
}

Rows check_nll_loss(const Tensor& self, const Tensor& target,
                    const c10::optional<Tensor>& weight, int64_t reduction, const char* op) {
  check_floating(self, op, "self");
  check_reduction(reduction, op);
  const Rows r = class_rows(self, op);
  check_target(self, target, op, /*allow_soft=*/false);
  check_weight(self, weight, r.C, op);
  return r;
}

Rows check_nll_loss_backward(const Tensor& grad_output, const Tensor& self, const Tensor& target,
                             const c10::optional<Tensor>& weight, int64_t reduction,
                             const Tensor& total_weight, const char* op) {
  const Rows r = check_nll_loss(self, target, weight, reduction, op);
  const auto rshape = row_shape(self);
  check_grad_output(grad_output, self, reduction, rshape, op);
  check_total_weight(total_weight, op);
  return r;
}

DimLayout dim_layout(const Tensor& t, int64_t& dim, const char* op) {
  const int64_t nd = std::max<int64_t>(1, t.dim());
  TORCH_CHECK(dim >= -nd && dim < nd, op, ": dim ", dim, " is out of range for a tensor of ",
              t.dim(), " dimensions (expected a dim in [", -nd, ", ", nd - 1, "])");
  if (dim < 0) dim += nd;
  if (t.dim() == 0) return {1, 1, 1};
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= t.size(d);
  for (int64_t d = dim + 1; d < t.dim(); ++d) inner *= t.size(d);
  return {outer, t.size(dim), inner};
}

DimLayout check_log_softmax(const Tensor& self, int64_t& dim, const char* op) {
  check_floating(self, op, "self");
  return dim_layout(self, dim, op);
}

DimLayout check_log_softmax_backward(const Tensor& grad_output, const Tensor& output,
                                     int64_t& dim, const char* op) {
  check_floating(output, op, "output");
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(output, grad_output, op, "output", "grad_output");
  check_same_device(output, grad_output, op, "output", "grad_output");
  check_same_shape(output, grad_output, op, "output", "grad_output");
  return dim_layout(output, dim, op);
}

void check_regression(const Tensor& self, const Tensor& target, int64_t reduction,
                      const char* op) {
  check_floating(self, op, "self");
  TORCH_CHECK(target.defined(), op, ": target is an undefined tensor");
  check_floating(target, op, "target");
  check_same_dtype(self, target, op, "self", "target");
  check_same_device(self, target, op, "self", "target");
  check_same_shape(self, target, op, "self", "target");
  check_reduction(reduction, op);
}

void check_regression_backward(const Tensor& grad_output, const Tensor& self,
                               const Tensor& target, int64_t reduction, const char* op) {
  check_regression(self, target, reduction, op);
  check_grad_output(grad_output, self, reduction, self.sizes(), op);
}

void check_hinge_embedding(const Tensor& self, const Tensor& target, int64_t reduction,
                           const char* op) {
  check_floating(self, op, "self");
  TORCH_CHECK(target.defined(), op, ": target is an undefined tensor");
  TORCH_CHECK_TYPE(target.scalar_type() == self.scalar_type() || target.scalar_type() == at::kLong,
                   op, ": expected target in the dtype of self (", self.scalar_type(),
                   ") or int64, got ", target.scalar_type());
  check_same_device(self, target, op, "self", "target");
  check_same_shape(self, target, op, "self", "target");
  check_reduction(reduction, op);
}

void check_hinge_embedding_backward(const Tensor& grad_output, const Tensor& self,
                                    const Tensor& target, int64_t reduction, const char* op) {
  check_hinge_embedding(self, target, reduction, op);
  check_grad_output(grad_output, self, reduction, self.sizes(), op);
}

std::vector<int64_t> multi_margin_rows_shape(const Tensor& target, int64_t rows) {
  return target.dim() > 0 ? std::vector<int64_t>{rows} : std::vector<int64_t>{};
}

Rows check_multi_margin(const Tensor& self, const Tensor& target, int64_t p,
                        const c10::optional<Tensor>& weight, int64_t reduction, const char* op) {
  check_floating(self, op, "self");
  TORCH_CHECK(p == 1 || p == 2, op, ": only p == 1 and p == 2 supported, got p = ", p);
  const int64_t nd = self.dim();
  TORCH_CHECK((nd == 2 && self.size(1) != 0) || (nd == 1 && self.size(0) != 0) || nd == 0, op,
              ": Expected non-empty vector or matrix with optional 0-dim batch size, but got: ",
              self.sizes());
  const Rows r{nd == 2 ? self.size(0) : 1, nd == 0 ? 1 : self.size(nd - 1), 1};
  TORCH_CHECK(target.defined(), op, ": target is an undefined tensor");
  TORCH_CHECK(target.dim() <= 1 && target.numel() == r.N, op,
              ": target tensor should be 1-D with size equal to the number of input samples "
              "(batch size). Expected target size [", r.N, "], but got ", target.sizes(),
              ". Input has shape ", self.sizes(), ".");
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == r.C, op,
                ": inconsistent weight size, expected ", r.C, " but got ", weight->sizes(),
                " (a 1-D weight of one value per class)");
    check_weight(self, weight, r.C, op);
  }
  check_same_device(self, target, op, "self", "target");
  TORCH_CHECK(target.scalar_type() == at::kLong, op,
              ": expected target to hold class indices: expected scalar type Long but found ",
              target.scalar_type());
  check_reduction(reduction, op);
  return r;
}

Rows check_multi_margin_backward(const Tensor& grad_output, const Tensor& self,
                                 const Tensor& target, int64_t p,
                                 const c10::optional<Tensor>& weight, int64_t reduction,
                                 const char* op) {
  const Rows r = check_multi_margin(self, target, p, weight, reduction, op);
  check_grad_output(grad_output, self, reduction, multi_margin_rows_shape(target, r.N), op);
  return r;
}

static void check_broadcast_weight(const Tensor& self, const c10::optional<Tensor>& weight,
                                   const char* op, const char* arg) {
  if (!weight.has_value() || !weight->defined()) return;
  const Tensor& w = *weight;
  check_same_device(self, w, op, "self", arg);
  check_floating(w, op, arg);
  check_same_dtype(self, w, op, "self", arg);
  TORCH_CHECK(at::is_expandable_to(w.sizes(), self.sizes()), op, ": expected ", arg,
              " to be broadcastable to the shape of self ", self.sizes(), ", got shape ",
              w.sizes());
}

void check_binary_cross_entropy(const Tensor& self, const Tensor& target,
                                const c10::optional<Tensor>& weight,
                                const c10::optional<Tensor>& pos_weight, int64_t reduction,
                                const char* op) {
  check_regression(self, target, reduction, op);
  check_broadcast_weight(self, weight, op, "weight");
  check_broadcast_weight(self, pos_weight, op, "pos_weight");
}

void check_binary_cross_entropy_backward(const Tensor& grad_output, const Tensor& self,
                                         const Tensor& target,
                                         const c10::optional<Tensor>& weight,
                                         const c10::optional<Tensor>& pos_weight,
                                         int64_t reduction, const char* op) {
  check_binary_cross_entropy(self, target, weight, pos_weight, reduction, op);
  check_grad_output(grad_output, self, reduction, self.sizes(), op);
}

Tensor expanded_or_undefined(const c10::optional<Tensor>& weight, const Tensor& self) {
  if (!weight.has_value() || !weight->defined()) return Tensor();
  return weight->expand(self.sizes()).contiguous();
}

}  // namespace loss
}  // namespace fastops
