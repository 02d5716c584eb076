// CPU kernels of the regression losses: mse_loss and l1_loss, the loops of elementwise_loss.h
// over MseTerm and L1Term (loss_functors.h).
//
// Determinism: reduced losses are summed over fixed blocks of elements, then the blocks in
// order, whatever the number of threads; there are no atomics.
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../loss_checks.h"
#include "elementwise_loss.h"

namespace fastops {
namespace cpu {
namespace {

using at::Tensor;

template <class Term>
Tensor regression_loss(const Tensor& self, const Tensor& target, int64_t reduction,
                       const char* op) {
  loss::check_regression(self, target, reduction, op);
  return elementwise_loss::forward(Term{}, self, target, Tensor(), Tensor(), reduction, op);
}

template <class Term>
std::tuple<Tensor, Tensor> regression_loss_backward(const Tensor& grad_output,
                                                    const Tensor& self, const Tensor& target,
                                                    int64_t reduction,
                                                    std::array<bool, 2> output_mask,
                                                    const char* op) {
  loss::check_regression_backward(grad_output, self, target, reduction, op);
  return elementwise_loss::backward(Term{}, grad_output, self, target, Tensor(), Tensor(),
                                    reduction, output_mask);
}

Tensor mse_loss_fwd(const Tensor& self, const Tensor& target, int64_t reduction) {
  return regression_loss<MseTerm>(self, target, reduction, "fastops.mse_loss");
}

std::tuple<Tensor, Tensor> mse_loss_bwd(const Tensor& grad_output, const Tensor& self,
                                        const Tensor& target, int64_t reduction,
                                        std::array<bool, 2> output_mask) {
  return regression_loss_backward<MseTerm>(grad_output, self, target, reduction, output_mask,
                                           "fastops.mse_loss_backward");
}

Tensor l1_loss_fwd(const Tensor& self, const Tensor& target, int64_t reduction) {
  return regression_loss<L1Term>(self, target, reduction, "fastops.l1_loss");
}

std::tuple<Tensor, Tensor> l1_loss_bwd(const Tensor& grad_output, const Tensor& self,
                                       const Tensor& target, int64_t reduction,
                                       std::array<bool, 2> output_mask) {
  return regression_loss_backward<L1Term>(grad_output, self, target, reduction, output_mask,
                                          "fastops.l1_loss_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, CPU, m) {
  m.impl("mse_loss", &mse_loss_fwd);
  m.impl("mse_loss_backward", &mse_loss_bwd);
  m.impl("l1_loss", &l1_loss_fwd);
  m.impl("l1_loss_backward", &l1_loss_bwd);
}

}  // namespace cpu
}  // namespace fastops
