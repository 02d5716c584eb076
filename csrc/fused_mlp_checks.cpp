#include "fused_mlp_checks.h"

namespace fastops {

using at::Tensor;

namespace {

constexpr const char* kActivationNames =
    "relu, leaky_relu, elu, gelu, gelu_tanh, hardtanh, hardshrink, sigmoid, tanh";

}  // namespace

std::vector<Tensor> fused_mlp_biases(const c10::List<c10::optional<Tensor>>& biases) {
  std::vector<Tensor> out;
  for (size_t l = 0; l < biases.size(); ++l) {
    const c10::optional<Tensor> b = biases.get(l);
    if (b.has_value() && b->defined()) out.push_back(*b);
  }
  return out;
}

FusedMlpDims check_fused_mlp(const char* op, const Tensor& input, at::TensorList weights,
                             const c10::List<c10::optional<Tensor>>& biases) {
  check_floating(input, op, "input");
  TORCH_CHECK(input.dim() == 2, op, ": expected input of shape (N, in_features), got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(L >= 1, op, ": expected at least one weight, got an empty list");
  for (int64_t l = 0; l < L; ++l) {
    const Tensor& w = weights[l];
    const std::string name = "weights[" + std::to_string(l) + "]";
    check_floating(w, op, name.c_str());
    check_same_dtype(input, w, op, "input", name.c_str());
    check_same_device(input, w, op, "input", name.c_str());
    TORCH_CHECK(w.dim() == 2, op, ": expected ", name,
                " of shape (out_features, in_features), got a ", w.dim(), "-D tensor of shape ",
                w.sizes());
    const int64_t want_in = l == 0 ? input.size(1) : weights[l - 1].size(0);
    TORCH_CHECK(w.size(1) == want_in, op, ": expected ", name, ".size(1) to be ",
                l == 0 ? "input.size(1) = " : "the previous layer's out_features = ", want_in,
                ", got shape ", w.sizes());
    TORCH_CHECK(l == 0 || l == L - 1 || w.size(0) == weights[0].size(0), op,
                ": every hidden layer must have the same width, but weights[0] has ",
                weights[0].size(0), " outputs and ", name, " has ", w.size(0));
  }
  const int64_t nb = static_cast<int64_t>(biases.size());
  TORCH_CHECK(nb == 0 || nb == L, op, ": expected ", L,
              " biases (one per weight, each a tensor or all None) or an empty list, got ", nb);
  int64_t given = 0;
  for (int64_t l = 0; l < nb; ++l) {
    const c10::optional<Tensor> b = biases.get(l);
    if (!b.has_value() || !b->defined()) continue;
    ++given;
    const std::string name = "biases[" + std::to_string(l) + "]";
    check_floating(*b, op, name.c_str());
    check_same_dtype(input, *b, op, "input", name.c_str());
    check_same_device(input, *b, op, "input", name.c_str());
    TORCH_CHECK(b->dim() == 1 && b->size(0) == weights[l].size(0), op, ": expected ", name,
                " of shape (", weights[l].size(0), ",), got ", b->sizes());
  }
  TORCH_CHECK(given == 0 || given == L, op,
              ": expected every bias to be a tensor or every bias None, got ", given, " of ", L,
              " biases given");
  return {input.size(0), input.size(1), weights[0].size(0), weights[L - 1].size(0), L,
          given == L};
}

void check_fused_mlp_activations(const char* op, const std::string& activation,
                                 const std::string& output_activation) {
  TORCH_CHECK(is_pointwise(activation), op, ": unknown activation '", activation,
              "'; expected one of ", kActivationNames);
  TORCH_CHECK(output_activation == "none" || is_pointwise(output_activation), op,
              ": unknown output_activation '", output_activation, "'; expected 'none' or one of ",
              kActivationNames);
}

void check_fused_mlp_backward(const char* op, const FusedMlpDims& d, const Tensor& input,
                              const Tensor& grad_output, at::TensorList hidden,
                              const Tensor& out_preact, const std::string& output_activation) {
  check_floating(grad_output, op, "grad_output");
  check_same_dtype(input, grad_output, op, "input", "grad_output");
  check_same_device(input, grad_output, op, "input", "grad_output");
  TORCH_CHECK(grad_output.dim() == 2 && grad_output.size(0) == d.N &&
                  grad_output.size(1) == d.out_features,
              op, ": expected grad_output of shape (", d.N, ", ", d.out_features, "), got ",
              grad_output.sizes());
  const char* hint = "; pass what fused_mlp returned with save_for_backward=True";
  const int64_t want = d.layers - 1;
  TORCH_CHECK(static_cast<int64_t>(hidden.size()) == want, op, ": expected hidden (the saved "
              "pre-activations) to hold ", want, " tensors, one per hidden layer, got ",
              hidden.size(), hint);
  const bool recomputed = fused_mlp_recomputes_z0(d, input);
  for (int64_t l = 0; l < want; ++l) {
    const std::string name = "hidden[" + std::to_string(l) + "]";
    check_floating(hidden[l], op, name.c_str());
    check_same_dtype(input, hidden[l], op, "input", name.c_str());
    check_same_device(input, hidden[l], op, "input", name.c_str());
    if (l == 0 && recomputed) {
      TORCH_CHECK(hidden[0].dim() == 1 && hidden[0].size(0) == 0, op, ": expected hidden[0] "
                  "empty (the backward recomputes the first layer's pre-activation on the CPU "
                  "when in_features <= ", kFusedMlpRecomputeIn, "), got ", hidden[0].sizes(),
                  hint);
      continue;
    }
    TORCH_CHECK(hidden[l].dim() == 2 && hidden[l].size(0) == d.N && hidden[l].size(1) == d.hidden,
                op, ": expected ", name, " (a saved pre-activation) of shape (", d.N, ", ",
                d.hidden, "), got ", hidden[l].sizes(), hint);
  }
  if (output_activation != "none") {
    check_floating(out_preact, op, "out_preact");
    check_same_dtype(input, out_preact, op, "input", "out_preact");
    check_same_device(input, out_preact, op, "input", "out_preact");
    TORCH_CHECK(out_preact.dim() == 2 && out_preact.size(0) == d.N &&
                    out_preact.size(1) == d.out_features,
                op, ": expected out_preact (the saved output pre-activation) of shape (", d.N,
                ", ", d.out_features, "), got ", out_preact.sizes(), hint);
  }
}

}  // namespace fastops
