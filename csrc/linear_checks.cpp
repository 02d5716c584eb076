#include "linear_checks.h"

namespace fastops {

using at::Tensor;

LinearDims check_linear(const char* op, const Tensor& input, const Tensor& weight,
                        const c10::optional<Tensor>& bias) {
  check_floating(input, op, "input");
  check_floating(weight, op, "weight");
  check_same_dtype(input, weight, op, "input", "weight");
  check_same_device(input, weight, op, "input", "weight");
  TORCH_CHECK(input.dim() >= 1, op, ": expected input of shape (*, in_features), got a 0-d tensor");
  TORCH_CHECK(weight.dim() == 2, op,
              ": expected weight of shape (out_features, in_features), got a ", weight.dim(),
              "-D tensor of shape ", weight.sizes());
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(input.size(-1) == K, op, ": expected input.size(-1) to equal in_features = ",
              "weight.size(1) = ", K, ", got ", input.size(-1), " (input shape ", input.sizes(),
              ", weight shape ", weight.sizes(), ")");
  if (bias.has_value() && bias->defined()) {
    check_floating(*bias, op, "bias");
    check_same_dtype(input, *bias, op, "input", "bias");
    check_same_device(input, *bias, op, "input", "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op,
                ": expected bias of shape (out_features,) = (", N, ",), got ", bias->sizes());
  }
  const int64_t M = K == 0 ? c10::multiply_integers(input.sizes().slice(0, input.dim() - 1))
                           : input.numel() / K;
  return {M, K, N};
}

std::vector<int64_t> with_last_dim(const Tensor& t, int64_t last) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s.back() = last;
  return s;
}

void check_grad_output(const char* op, const Tensor& grad_output, const Tensor& input,
                       int64_t features) {
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(input, grad_output, op, "input", "grad_output");
  check_same_device(input, grad_output, op, "input", "grad_output");
  const auto want = with_last_dim(input, features);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(want), op, ": expected grad_output of shape ",
              at::IntArrayRef(want), ", got ", grad_output.sizes());
}

void check_preact(const char* op, const Tensor& preact, const Tensor& input, int64_t N) {
  check_floating(preact, op, "preact");
  check_same_dtype(input, preact, op, "input", "preact");
  check_same_device(input, preact, op, "input", "preact");
  const auto want_z = with_last_dim(input, N);
  TORCH_CHECK(preact.sizes() == at::IntArrayRef(want_z), op,
              ": expected preact (the saved pre-activation) of shape ", at::IntArrayRef(want_z),
              ", got ", preact.sizes(), "; call linear_act with save_preact=True");
}

bool is_pointwise(const std::string& name) {
#define FO_IS_NAME(n, schema_params, cpp_params, make) if (name == #n) return true;
  FASTOPS_POINTWISE_ACTIVATIONS(FO_IS_NAME)
#undef FO_IS_NAME
  return false;
}

PointwiseKind pointwise_kind(const std::string& name) {
#define FO_KIND(n, schema_params, cpp_params, make) \
  if (name == #n) return PointwiseKind::n;
  FASTOPS_POINTWISE_ACTIVATIONS(FO_KIND)
#undef FO_KIND
  TORCH_CHECK(false, "fastops: unknown activation '", name, "'");
}

ActInfo check_activation(const char* op, const std::string& activation, double a, int64_t N,
                         const Tensor& input, const c10::optional<Tensor>& act_weight) {
  const bool has_aw = act_weight.has_value() && act_weight->defined();
  if (activation == "prelu") {
    TORCH_CHECK(has_aw, op, ": activation 'prelu' needs act_weight (the slopes), got None");
    const Tensor& w = *act_weight;
    check_floating(w, op, "act_weight");
    check_same_dtype(input, w, op, "input", "act_weight");
    check_same_device(input, w, op, "input", "act_weight");
    TORCH_CHECK(w.dim() <= 1 && (w.numel() == 1 || w.numel() == N), op,
                ": expected act_weight (PReLU slopes) of 1 or out_features = ", N,
                " elements in a 1-D tensor, got shape ", w.sizes());
    return {ActKind::prelu, 1, N};
  }
  TORCH_CHECK(!has_aw, op, ": act_weight is only used by activation 'prelu', got activation '",
              activation, "' with an act_weight");
  if (activation == "maxout") {
    TORCH_CHECK(a >= 1 && a == static_cast<double>(static_cast<int64_t>(a)), op,
                ": maxout pool_size must be a positive integer, got ", a);
    const int64_t k = static_cast<int64_t>(a);
    TORCH_CHECK(N % k == 0, op, ": maxout needs out_features divisible by pool_size, got ",
                "out_features ", N, " and pool_size ", k);
    return {ActKind::maxout, k, N / k};
  }
  TORCH_CHECK(is_pointwise(activation), op, ": unknown activation '", activation,
              "'; expected one of relu, elu, gelu, gelu_tanh, hardtanh, leaky_relu, sigmoid, "
              "tanh, hardshrink, prelu, maxout");
  return {ActKind::pointwise, 1, N};
}

}  // namespace fastops
