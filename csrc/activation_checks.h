// Argument checks and index layouts of the activations, shared by the CPU and CUDA kernels so
// both raise the same errors and see the same (outer, channels, inner) views.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "checks.h"

namespace fastops {

// A pointwise backward: grad_output and self floating, of one dtype, shape and device.
void check_unary_backward(const at::Tensor& grad_output, const at::Tensor& self, const char* op);

// The bit mask of the masked activations (NAME_with_mask): one bit per element of the input,
// element i at bit i % 8 of byte i / 8, in a uint8 tensor of mask_bytes(numel) elements.
inline int64_t mask_bytes(int64_t numel) { return (numel + 7) / 8; }
// A masked backward (NAME_mask_backward): grad_output floating, mask the bit mask of a tensor of
// grad_output's numel, on its device.
void check_mask_backward(const at::Tensor& grad_output, const at::Tensor& mask, const char* op);

// RReLU: lower <= upper (torch's message), for every mode.
void check_rrelu_bounds(double lower, double upper, const char* op);
// The seed rows of RReLU in training mode (rrelu.h): an int64 tensor on the device of `shaped`
// (the input, or grad_output), of shape (2,) (one row for the whole tensor) or (S, 2) with
// shaped.size(0) == S (a row per slice along dim 0, as vmap's per-sample draws give). Returns
// the number of rows.
int64_t rrelu_seed_rows(const at::Tensor& shaped, const at::Tensor& seed, const char* op,
                        const char* shaped_name = "self");

// PReLU: self viewed as (outer, channels, inner) with the weight indexed by the channel
// (channels = 1 for a single shared weight, then inner = self.numel()).
struct ChannelLayout {
  int64_t outer, channels, inner;
};
ChannelLayout prelu_layout(const at::Tensor& self, const at::Tensor& weight, const char* op);
// prelu_backward's grad_output against self.
void check_prelu_grad(const at::Tensor& grad_output, const at::Tensor& self, const char* op);

// Maxout: self viewed as (outer, groups, k, inner); output (outer, groups, inner). NaN wins the
// max, and among equal values the first channel does, as torch.max does.
struct MaxoutLayout {
  int64_t outer, groups, k, inner;
};
MaxoutLayout maxout_layout(const at::Tensor& self, int64_t pool_size, const char* op);
// The output shape: self's with dim 1 divided by pool_size.
std::vector<int64_t> maxout_output_shape(const at::Tensor& self, const MaxoutLayout& l);
// maxout_backward's grad_output: floating, self's dtype and device, the output's shape.
void check_maxout_grad(const at::Tensor& grad_output, const at::Tensor& self,
                       const MaxoutLayout& l, const char* op);

// What maxout_with_indices saves for backward: per output, the member (0 .. k-1) its gradient
// goes to, as uint8 in the output's shape. A byte holds it for pool sizes up to 256.
constexpr int64_t kMaxoutIndexedPoolLimit = 256;
void check_maxout_indexed_pool(int64_t pool_size, const char* op);
// maxout_indices_backward: grad_output floating with at least 2 dims, indices uint8 of its shape
// and device. Returns the layout of the forward's input, whose shape is grad_output's with
// dim 1 times pool_size.
MaxoutLayout maxout_indices_layout(const at::Tensor& grad_output, const at::Tensor& indices,
                                   int64_t pool_size, const char* op);
// The forward's input shape: grad_output's with dim 1 times the pool size.
std::vector<int64_t> maxout_input_shape(const at::Tensor& grad_output, const MaxoutLayout& l);

}  // namespace fastops
