// Argument checks of the fused linear + cross entropy, shared by the CPU and CUDA kernels so
// that both accept the same inputs and raise the same errors.
//
// The op contract: input (N, H) of any strides, weight (V, H), bias (V,) or None, one floating
// dtype; target int64 (N,) class indices (ignore_index rows contribute nothing) or (N, V)
// class probabilities in the input's dtype; class_weight (V,) or None in the input's dtype.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace fastops {

struct LceDims {
  int64_t N, H, V;  // rows, in_features, classes
  bool soft;        // class-probability target
};

// The checks of linear_cross_entropy (label_smoothing in [0, 1], z_loss >= 0, softcap >= 0;
// softcap 0 means no cap). Raises naming the argument, the expected and the given value.
LceDims check_linear_cross_entropy(const at::Tensor& input, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias,
                                   const at::Tensor& target,
                                   const c10::optional<at::Tensor>& class_weight,
                                   int64_t reduction, double label_smoothing, double z_loss,
                                   double softcap, const char* op);

// The same, and grad_loss ((N,) for reduction 'none', one element otherwise) and lse ((N,),
// float32, float64 for float64 input) of linear_cross_entropy_backward.
LceDims check_linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const c10::optional<at::Tensor>& class_weight, const at::Tensor& lse, int64_t reduction,
    double label_smoothing, double z_loss, double softcap, const char* op);

}  // namespace fastops
