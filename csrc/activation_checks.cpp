#include "activation_checks.h"

namespace fastops {

using at::Tensor;

void check_unary_backward(const Tensor& grad_output, const Tensor& self, const char* op) {
  check_floating(self, op, "self");
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(self, grad_output, op, "self", "grad_output");
  check_same_shape(self, grad_output, op, "self", "grad_output");
  check_same_device(self, grad_output, op, "self", "grad_output");
}

void check_mask_backward(const Tensor& grad_output, const Tensor& mask, const char* op) {
  check_floating(grad_output, op, "grad_output");
  TORCH_CHECK(mask.defined(), op, ": mask is an undefined tensor");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, op,
                   ": expected mask to be a uint8 tensor (the bit mask of the forward), got ",
                   mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && mask.numel() == mask_bytes(grad_output.numel()), op,
              ": expected a 1-D mask of ", mask_bytes(grad_output.numel()),
              " bytes (one bit per element of grad_output), got shape ", mask.sizes());
  check_same_device(grad_output, mask, op, "grad_output", "mask");
}

void check_rrelu_bounds(double lower, double upper, const char* op) {
  TORCH_CHECK(lower <= upper, op,
              ": Lower bound should be less than or equal to the upper bound, got lower=", lower,
              " and upper=", upper);
}

int64_t rrelu_seed_rows(const Tensor& shaped, const Tensor& seed, const char* op,
                        const char* shaped_name) {
  TORCH_CHECK(seed.defined(), op, ": seed is an undefined tensor");
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op,
                   ": expected seed to be an int64 tensor (from rrelu_seed), got ",
                   seed.scalar_type());
  check_same_device(shaped, seed, op, shaped_name, "seed");
  const bool one_row = seed.dim() == 1 && seed.size(0) == 2;
  const bool per_slice = seed.dim() == 2 && seed.size(1) == 2 && shaped.dim() >= 1 &&
                         seed.size(0) == shaped.size(0);
  TORCH_CHECK(one_row || per_slice, op,
              ": expected seed of shape (2,), or (S, 2) with S the size of dim 0 of the input, "
              "got seed of shape ", seed.sizes(), " for ", shaped_name, " of shape ",
              shaped.sizes());
  return one_row ? 1 : seed.size(0);
}

ChannelLayout prelu_layout(const Tensor& self, const Tensor& weight, const char* op) {
  check_floating(self, op, "self");
  check_floating(weight, op, "weight");
  check_same_dtype(self, weight, op, "self", "weight");
  check_same_device(self, weight, op, "self", "weight");
  TORCH_CHECK(weight.dim() <= 1, op, ": expected weight to be a scalar or 1-D tensor, got a ",
              weight.dim(), "-D tensor");
  const int64_t wn = weight.numel();
  if (wn == 1) return {1, 1, self.numel()};
  TORCH_CHECK(self.dim() > 0, op, ": a 0-d input takes a weight of 1 element, got ", wn);
  const int64_t channels = self.dim() >= 2 ? self.size(1) : 1;
  TORCH_CHECK(wn == channels, op, ": weight has ", wn,
              " elements but the input has ", channels,
              " channels (dim 1); num_parameters must be 1 or the number of channels");
  const int64_t outer = self.dim() >= 1 ? self.size(0) : 1;
  const int64_t inner = channels == 0 || outer == 0 ? 0 : self.numel() / (outer * channels);
  return {outer, channels, inner};
}

void check_prelu_grad(const Tensor& grad_output, const Tensor& self, const char* op) {
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(self, grad_output, op, "self", "grad_output");
  check_same_shape(self, grad_output, op, "self", "grad_output");
  check_same_device(self, grad_output, op, "self", "grad_output");
}

MaxoutLayout maxout_layout(const Tensor& self, int64_t pool_size, const char* op) {
  check_floating(self, op, "self");
  TORCH_CHECK(self.dim() >= 2, op, ": expected an input of at least 2 dims (N, C, ...), got ",
              self.dim(), " dims");
  TORCH_CHECK(pool_size >= 1, op, ": pool_size must be positive, got ", pool_size);
  const int64_t channels = self.size(1);
  TORCH_CHECK(channels % pool_size == 0, op, ": the number of channels (dim 1) must be divisible "
              "by pool_size, got ", channels, " channels and pool_size ", pool_size);
  const int64_t outer = self.size(0);
  const int64_t inner = outer * channels == 0 ? 0 : self.numel() / (outer * channels);
  return {outer, channels / pool_size, pool_size, inner};
}

std::vector<int64_t> maxout_output_shape(const Tensor& self, const MaxoutLayout& l) {
  std::vector<int64_t> shape(self.sizes().begin(), self.sizes().end());
  shape[1] = l.groups;
  return shape;
}

void check_maxout_grad(const Tensor& grad_output, const Tensor& self, const MaxoutLayout& l,
                       const char* op) {
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(self, grad_output, op, "self", "grad_output");
  const std::vector<int64_t> out_shape = maxout_output_shape(self, l);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_shape), op,
              ": expected grad_output of shape ", at::IntArrayRef(out_shape), ", got ",
              grad_output.sizes());
  check_same_device(self, grad_output, op, "self", "grad_output");
}

void check_maxout_indexed_pool(int64_t pool_size, const char* op) {
  TORCH_CHECK(pool_size >= 1 && pool_size <= kMaxoutIndexedPoolLimit, op,
              ": pool_size must be in [1, ", kMaxoutIndexedPoolLimit,
              "] for the saved indices to fit a byte, got ", pool_size,
              " (maxout and maxout_backward take any pool size)");
}

MaxoutLayout maxout_indices_layout(const Tensor& grad_output, const Tensor& indices,
                                   int64_t pool_size, const char* op) {
  check_maxout_indexed_pool(pool_size, op);
  check_floating(grad_output, op, "grad_output");
  TORCH_CHECK(indices.defined(), op, ": indices is an undefined tensor");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kByte, op,
                   ": expected indices to be a uint8 tensor (from maxout_with_indices), got ",
                   indices.scalar_type());
  TORCH_CHECK(grad_output.dim() >= 2, op,
              ": expected grad_output of at least 2 dims (N, C / pool_size, ...), got ",
              grad_output.dim(), " dims");
  check_same_shape(grad_output, indices, op, "grad_output", "indices");
  check_same_device(grad_output, indices, op, "grad_output", "indices");
  const int64_t outer = grad_output.size(0), groups = grad_output.size(1);
  const int64_t inner = outer * groups == 0 ? 0 : grad_output.numel() / (outer * groups);
  return {outer, groups, pool_size, inner};
}

std::vector<int64_t> maxout_input_shape(const Tensor& grad_output, const MaxoutLayout& l) {
  std::vector<int64_t> shape(grad_output.sizes().begin(), grad_output.sizes().end());
  shape[1] *= l.k;
  return shape;
}

}  // namespace fastops
