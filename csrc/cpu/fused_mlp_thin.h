// The CPU fused MLP's path for thin nets (fused_mlp_thin.cpp): one hidden layer between narrow
// ends, 1 to 4 inputs and 1 to 4 outputs (the spiral net's 2-100-3, a 2-D or 3-D coordinate
// net, a small policy), relu or leaky_relu and no output activation, in float or double, on a
// CPU with AVX2 or AVX-512. fused_mlp.cpp hands such nets to it; every other net takes the layer
// loops there.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "../fused_mlp_checks.h"

namespace fastops {
namespace cpu {

bool fused_mlp_thin_applies(const FusedMlpDims& d, const at::Tensor& input,
                            const std::string& activation, const std::string& output_activation);

// y (N, out_features), contiguous.
void fused_mlp_thin_forward(const FusedMlpDims& d, const at::Tensor& input,
                            at::TensorList weights, const std::vector<at::Tensor>& biases,
                            const std::string& activation, at::Tensor& y);

// The gradients wanted: grad_input (N, in_features) when defined, the weights' and the biases'
// (each contiguous) when their lists are not empty.
void fused_mlp_thin_backward(const FusedMlpDims& d, const at::Tensor& grad_output,
                             const at::Tensor& input, at::TensorList weights,
                             const std::vector<at::Tensor>& biases,
                             const std::string& activation, at::Tensor& grad_input,
                             std::vector<at::Tensor>& grad_weights,
                             std::vector<at::Tensor>& grad_biases);

}  // namespace cpu
}  // namespace fastops
