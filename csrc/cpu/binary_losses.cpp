// CPU kernels of the binary cross entropies: binary_cross_entropy (on probabilities) and
// binary_cross_entropy_with_logits, the loops of elementwise_loss.h over BceTerm and
// BceLogitsTerm (loss_functors.h).
//
// weight and pos_weight are expanded to self's shape (a copy only when they are given and
// smaller); the forward of binary_cross_entropy raises for an input or target outside [0, 1],
// naming the first such element.
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../loss_checks.h"
#include "elementwise_loss.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;
using loss::expanded_or_undefined;

Tensor bce_fwd(const Tensor& self, const Tensor& target, const c10::optional<Tensor>& weight,
               int64_t reduction) {
  const char* op = "fastops.binary_cross_entropy";
  loss::check_binary_cross_entropy(self, target, weight, c10::nullopt, reduction, op);
  return elementwise_loss::forward(BceTerm{}, self, target, expanded_or_undefined(weight, self),
                                   Tensor(), reduction, op);
}

std::tuple<Tensor, Tensor> bce_bwd(const Tensor& grad_output, const Tensor& self,
                                   const Tensor& target, const c10::optional<Tensor>& weight,
                                   int64_t reduction, std::array<bool, 2> output_mask) {
  const char* op = "fastops.binary_cross_entropy_backward";
  loss::check_binary_cross_entropy_backward(grad_output, self, target, weight, c10::nullopt,
                                            reduction, op);
  return elementwise_loss::backward(BceTerm{}, grad_output, self, target,
                                    expanded_or_undefined(weight, self), Tensor(), reduction,
                                    output_mask);
}

Tensor bce_logits_fwd(const Tensor& self, const Tensor& target,
                      const c10::optional<Tensor>& weight,
                      const c10::optional<Tensor>& pos_weight, int64_t reduction) {
  const char* op = "fastops.binary_cross_entropy_with_logits";
  loss::check_binary_cross_entropy(self, target, weight, pos_weight, reduction, op);
  const Tensor w = expanded_or_undefined(weight, self);
  const Tensor p = expanded_or_undefined(pos_weight, self);
  if (p.defined())
    return elementwise_loss::forward(BceLogitsTerm<true>{}, self, target, w, p, reduction, op);
  return elementwise_loss::forward(BceLogitsTerm<false>{}, self, target, w, p, reduction, op);
}

std::tuple<Tensor, Tensor> bce_logits_bwd(const Tensor& grad_output, const Tensor& self,
                                          const Tensor& target,
                                          const c10::optional<Tensor>& weight,
                                          const c10::optional<Tensor>& pos_weight,
                                          int64_t reduction, std::array<bool, 2> output_mask) {
  const char* op = "fastops.binary_cross_entropy_with_logits_backward";
  loss::check_binary_cross_entropy_backward(grad_output, self, target, weight, pos_weight,
                                            reduction, op);
  const Tensor w = expanded_or_undefined(weight, self);
  const Tensor p = expanded_or_undefined(pos_weight, self);
  if (p.defined())
    return elementwise_loss::backward(BceLogitsTerm<true>{}, grad_output, self, target, w, p,
                                      reduction, output_mask);
  return elementwise_loss::backward(BceLogitsTerm<false>{}, grad_output, self, target, w, p,
                                    reduction, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("binary_cross_entropy", &bce_fwd);
  m.impl("binary_cross_entropy_backward", &bce_bwd);
  m.impl("binary_cross_entropy_with_logits", &bce_logits_fwd);
  m.impl("binary_cross_entropy_with_logits_backward", &bce_logits_bwd);
}

}  // namespace cpu
}  // namespace fastops
