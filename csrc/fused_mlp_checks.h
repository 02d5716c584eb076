// Argument checks and activation lookup of the fully fused MLP (fused_mlp, fused_mlp_backward),
// shared by the CPU and CUDA kernels so both raise the same errors.
//
// The op (schemas in registration.cpp): L = weights.size() >= 1 layers like nn.Linear,
// weights[l] (out_l, in_l), biases[l] (out_l,) or None (all given or all None; an empty list
// means no biases). Every hidden layer has the width `hidden` = out_0 = ... = out_{L-2}:
//   z_l = a_{l-1} W_l^T + b_l (a_{-1} = input), a_l = act(z_l) for l < L-1,
//   output = out_act(z_{L-1}).
// Saved for backward: hidden, L-1 tensors (N, hidden), the pre-activations z_0 .. z_{L-2} (one
// tensor per layer: one allocation of them all would, past the C library's mmap threshold, be
// fresh pages every call), and out_preact (N, out_features) = z_{L-1} when out_act is not
// 'none'; an empty list and an empty (0,) tensor otherwise. One exception, on the CPU: a first
// layer of at most kFusedMlpRecomputeIn inputs is recomputed by the backward, so hidden[0] is
// an empty (0,) tensor there (fused_mlp_recomputes_z0).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "activations.h"
#include "linear_checks.h"

namespace fastops {

struct FusedMlpDims {
  int64_t N;             // rows
  int64_t in_features;   // weights[0].size(1)
  int64_t hidden;        // out_0 (= every hidden width); out_features when L == 1
  int64_t out_features;  // weights[L-1].size(0)
  int64_t layers;        // L
  bool has_bias;
};

// input (N, in_features) of any strides, the weights and biases as above; all floating, of one
// dtype and device. Returns the dims.
FusedMlpDims check_fused_mlp(const char* op, const at::Tensor& input, at::TensorList weights,
                             const c10::List<c10::optional<at::Tensor>>& biases);

// The activation names: `activation` one of the nine below, `output_activation` 'none' or one of
// them; otherwise an error that lists the valid names.
void check_fused_mlp_activations(const char* op, const std::string& activation,
                                 const std::string& output_activation);

// On the CPU the backward recomputes z_0 = input W_0^T + b_0 of a first layer this narrow
// rather than reading it back: in_features multiply-adds per value cost less than writing z_0
// in the forward and reading it again (the spiral net's 2 -> 100 layer: a 1.2 MB round trip
// at 3000 rows, for 2 multiply-adds per value).
constexpr int64_t kFusedMlpRecomputeIn = 16;
inline bool fused_mlp_recomputes_z0(const FusedMlpDims& d, const at::Tensor& input) {
  return input.is_cpu() && d.layers >= 2 && d.in_features <= kFusedMlpRecomputeIn;
}

// fused_mlp_backward's grad_output (N, out_features) and the saved hidden / out_preact against
// the dims (each must be what fused_mlp returned with save_for_backward=True).
void check_fused_mlp_backward(const char* op, const FusedMlpDims& d, const at::Tensor& input,
                              const at::Tensor& grad_output, at::TensorList hidden,
                              const at::Tensor& out_preact, const std::string& output_activation);

// The biases as a list of defined tensors (empty when there are none).
std::vector<at::Tensor> fused_mlp_biases(const c10::List<c10::optional<at::Tensor>>& biases);

// The identity, the "activation" of output_activation='none'.
struct IdentityAct {
  template <class T> FO_HD T forward(T x) const { return x; }
  template <class T> FO_HD T backward(T, T g) const { return g; }
};

// The parameters (a, b) of activation `name` in the op: torch's defaults (leaky_relu slope 0.01,
// elu alpha 1, hardtanh (-1, 1), hardshrink 0.5); (0, 0) for the others. The CUDA kernels take
// them as numbers, so they are kept here, once.
struct FusedMlpActParams {
  double a = 0, b = 0;
};
inline FusedMlpActParams fused_mlp_activation_params(const std::string& name) {
  if (name == "leaky_relu") return {0.01, 0.0};
  if (name == "elu") return {1.0, 0.0};
  if (name == "hardtanh") return {-1.0, 1.0};
  if (name == "hardshrink") return {0.5, 0.0};
  return {};
}

// Calls fn(functor) with the functor of activation `name` ('none': IdentityAct) at the
// parameters above, as the kernels of storage type T compare them (see params_in_dtype).
template <class T, class Fn>
void with_fused_mlp_activation(const std::string& name, const Fn& fn) {
  if (name == "none") return fn(IdentityAct{});
  const FusedMlpActParams p = fused_mlp_activation_params(name);
  with_pointwise<T>(name, p.a, p.b, fn);
}

}  // namespace fastops
