// Argument checks and activation-name parsing of linear and the fused linear + activation,
// shared by the CPU and CUDA kernels so both raise the same errors.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "activations.h"
#include "checks.h"

namespace fastops {

struct LinearDims {
  int64_t M, K, N;  // rows, in_features, out_features
};

// input (*, K), weight (N, K), bias (N,) or None: same dtype and device. Returns (M, K, N).
LinearDims check_linear(const char* op, const at::Tensor& input, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias);

// The sizes of t with the last one replaced.
std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last);

// grad_output of the shape of input with `features` as its last dim.
void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                       int64_t features);

// preact (the saved pre-activation) of the shape of input with out_features N as its last dim.
void check_preact(const char* op, const at::Tensor& preact, const at::Tensor& input, int64_t N);

enum class ActKind { pointwise, prelu, maxout };

struct ActInfo {
  ActKind kind;
  int64_t pool = 1;     // maxout
  int64_t features;     // output features after the activation
};

// The pointwise activations of FASTOPS_POINTWISE_ACTIVATIONS, numbered in list order.
enum class PointwiseKind : int {
#define FO_POINTWISE_ENUM(n, schema_params, cpp_params, make) n,
  FASTOPS_POINTWISE_ACTIVATIONS(FO_POINTWISE_ENUM)
#undef FO_POINTWISE_ENUM
};

bool is_pointwise(const std::string& name);
// The number of the pointwise activation `name` (an error if there is none of that name).
PointwiseKind pointwise_kind(const std::string& name);

// Checks the activation name, its parameters and act_weight against out_features N.
ActInfo check_activation(const char* op, const std::string& activation, double a, int64_t N,
                         const at::Tensor& input, const c10::optional<at::Tensor>& act_weight);

// Calls fn(functor) with the functor of the pointwise activation `name` built from (a, b), its
// parameters as the kernels of storage type T compare them (params_in_dtype: hardshrink's lambd
// rounded to T, as torch does).
template <class T, class Fn>
void with_pointwise(const std::string& name, double a, double b, const Fn& fn) {
  (void)a;
  (void)b;
#define FO_CASE(n, schema_params, cpp_params, make) \
  if (name == #n) return fn(params_in_dtype<T>(FO_UNPAREN make));
  FASTOPS_POINTWISE_ACTIVATIONS(FO_CASE)
#undef FO_CASE
  TORCH_CHECK(false, "fastops: unknown activation '", name, "'");
}

}  // namespace fastops
