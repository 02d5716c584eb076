// Shapes and argument checks of the losses, shared by the CPU and CUDA kernels so that both
// accept the same inputs and raise the same errors.
//
// Layout: the class dim is dim 1 ((C,) inputs have no batch), so an input is viewed as
// (N, C, S) with S the product of the spatial dims; a "row" is the C values of one (n, s).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "checks.h"

namespace fastops {
namespace loss {

// As at::Reduction.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

struct Rows {
  int64_t N, C, S;  // input viewed as (N, C, S)
  int64_t rows() const { return N * S; }
};

// The (N, C, S) view of a loss input; raises for a 0-d input.
Rows class_rows(const at::Tensor& self, const char* op);

// The input's shape without the class dim: the shape of the target, of the lse and of an
// unreduced loss.
std::vector<int64_t> row_shape(const at::Tensor& self);

// The dtype of the statistics kept in full precision: float64 for float64, else float32.
at::ScalarType acc_dtype(at::ScalarType t);

// Class-index targets: int64 or uint8.
bool is_index_dtype(at::ScalarType t);

// A class-index target of the input's shape without its class dim, or (allow_soft) a
// class-probability target of the input's shape and dtype.
void check_target(const at::Tensor& self, const at::Tensor& target, const char* op,
                  bool allow_soft);

// An optional 1-D weight of C elements, on self's device, in self's dtype.
void check_weight(const at::Tensor& self, const c10::optional<at::Tensor>& weight, int64_t C,
                  const char* op);

// The weight made contiguous, or an undefined tensor when absent.
at::Tensor weight_or_undefined(const c10::optional<at::Tensor>& weight);

// grad_output of the unreduced shape for reduction 'none', else one element.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& self, int64_t reduction,
                       at::IntArrayRef unreduced_shape, const char* op);

// The checks of each op, in the order the ops apply them.
Rows check_cross_entropy(const at::Tensor& self, const at::Tensor& target,
                         const c10::optional<at::Tensor>& weight, int64_t reduction,
                         double label_smoothing, const char* op);
Rows check_cross_entropy_backward(const at::Tensor& grad_output, const at::Tensor& self,
                                  const at::Tensor& target,
                                  const c10::optional<at::Tensor>& weight, int64_t reduction,
                                  const at::Tensor& lse, const at::Tensor& total_weight,
                                  const char* op);
Rows check_nll_loss(const at::Tensor& self, const at::Tensor& target,
                    const c10::optional<at::Tensor>& weight, int64_t reduction, const char* op);
Rows check_nll_loss_backward(const at::Tensor& grad_output, const at::Tensor& self,
                             const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                             int64_t reduction, const at::Tensor& total_weight, const char* op);

// log_softmax views its input as (outer, C, inner) around dim (wrapped in place).
struct DimLayout {
  int64_t outer, C, inner;
};
DimLayout dim_layout(const at::Tensor& t, int64_t& dim, const char* op);
DimLayout check_log_softmax(const at::Tensor& self, int64_t& dim, const char* op);
DimLayout check_log_softmax_backward(const at::Tensor& grad_output, const at::Tensor& output,
                                     int64_t& dim, const char* op);

// mse_loss, l1_loss: a target of self's shape, dtype and device.
void check_regression(const at::Tensor& self, const at::Tensor& target, int64_t reduction,
                      const char* op);
void check_regression_backward(const at::Tensor& grad_output, const at::Tensor& self,
                               const at::Tensor& target, int64_t reduction, const char* op);

// binary_cross_entropy (pos_weight absent) and binary_cross_entropy_with_logits: a target of
// self's shape, dtype and device; weight and pos_weight in self's dtype, on its device, and
// broadcastable to its shape.
void check_binary_cross_entropy(const at::Tensor& self, const at::Tensor& target,
                                const c10::optional<at::Tensor>& weight,
                                const c10::optional<at::Tensor>& pos_weight, int64_t reduction,
                                const char* op);
void check_binary_cross_entropy_backward(const at::Tensor& grad_output, const at::Tensor& self,
                                         const at::Tensor& target,
                                         const c10::optional<at::Tensor>& weight,
                                         const c10::optional<at::Tensor>& pos_weight,
                                         int64_t reduction, const char* op);
// A weight expanded to self's shape and contiguous (a copy only when it is smaller), or an
// undefined tensor when absent.
at::Tensor expanded_or_undefined(const c10::optional<at::Tensor>& weight, const at::Tensor& self);

// hinge_embedding_loss: target of self's shape, in self's dtype or int64 (only target == 1 and
// target == -1 matter; the functional form broadcasts and converts the others).
void check_hinge_embedding(const at::Tensor& self, const at::Tensor& target, int64_t reduction,
                           const char* op);
void check_hinge_embedding_backward(const at::Tensor& grad_output, const at::Tensor& self,
                                    const at::Tensor& target, int64_t reduction, const char* op);

// multi_margin_loss: self (N, C) with C > 0, (C,) with C > 0 or 0-d (one row of one class);
// int64 targets of N elements (0-d or 1-D); p 1 or 2. The checks run in torch's order, with
// torch's messages. Returns the rows (S = 1).
Rows check_multi_margin(const at::Tensor& self, const at::Tensor& target, int64_t p,
                        const c10::optional<at::Tensor>& weight, int64_t reduction,
                        const char* op);
Rows check_multi_margin_backward(const at::Tensor& grad_output, const at::Tensor& self,
                                 const at::Tensor& target, int64_t p,
                                 const c10::optional<at::Tensor>& weight, int64_t reduction,
                                 const char* op);
// The unreduced loss's shape, torch's: (N,) for a 1-D target, () for a 0-d one.
std::vector<int64_t> multi_margin_rows_shape(const at::Tensor& target, int64_t rows);

}  // namespace loss
}  // namespace fastops
