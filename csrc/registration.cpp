// Every fastops op schema, in one place. Kernels are registered per dispatch key in cpu/ and
// cuda/; the fake (meta) kernels and the autograd formulas live in the Python package.
//
// reduction follows at::Reduction: 0 none, 1 mean, 2 sum.
#include <torch/library.h>

#include "activations.h"
#include "cpu/cpu_common.h"

#ifdef FASTOPS_PYTHON_MODULE
#include <Python.h>

// Importing fastops._C loads this library, which runs the registrations below. (The CMake build
// makes a plain shared library for C++ users, without this.)
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                               nullptr,               nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif

TORCH_LIBRARY(fastops, m) {
  // linear: y = x W^T + b over the last dim of x. backward returns (grad_input, grad_weight,
  // grad_bias); an entry whose output_mask is false comes back as an empty tensor.
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "linear_backward(Tensor grad_output, Tensor input, Tensor weight, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");

  // Fused linear + activation: activation is a pointwise activation name below, "prelu" (slope
  // from act_weight) or "maxout" (pool size int(a), over the output features). a and b are the
  // activation's parameters in schema order. Returns (output, pre-activation); the
  // pre-activation is saved for backward and is empty when save_preact is false.
  m.def(
      "linear_act(Tensor input, Tensor weight, Tensor? bias, str activation, float a, float b, "
      "Tensor? act_weight, bool save_preact) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias, grad_act_weight), empty where output_mask is
  // false.
  m.def(
      "linear_act_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor preact, "
      "str activation, float a, float b, Tensor? act_weight, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // Pointwise activations: NAME(Tensor self, params) and NAME_backward(grad_output, self,
  // params), the backward taking the forward's input; NAME_double_backward(grad_grad,
  // grad_output, self, params) = grad_grad * grad_output * f''(self), the backward's derivative
  // by self (its derivative by grad_output is NAME_backward itself).
#define FO_DEF_ACTIVATION(name, schema_params, cpp_params, make)                           \
  m.def(#name "(Tensor self" schema_params ") -> Tensor");                                \
  m.def(#name "_backward(Tensor grad_output, Tensor self" schema_params ") -> Tensor");   \
  m.def(#name "_double_backward(Tensor grad_grad, Tensor grad_output, Tensor self"         \
        schema_params ") -> Tensor");
  FASTOPS_POINTWISE_ACTIVATIONS(FO_DEF_ACTIVATION)
#undef FO_DEF_ACTIVATION
  // The piecewise-linear ones also: NAME_with_mask(self, params) -> (output, mask), mask the
  // uint8 bit mask of activation_checks.h (one bit per element, which side of the threshold),
  // and NAME_mask_backward(grad_output, mask, params), the backward from those bits alone.
  // Their autograd saves the mask rather than the input.
#define FO_DEF_MASKED(name, schema_params, cpp_params, make)                                \
  m.def(#name "_with_mask(Tensor self" schema_params ") -> (Tensor, Tensor)");            \
  m.def(#name "_mask_backward(Tensor grad_output, Tensor mask" schema_params ") -> Tensor");
  FASTOPS_MASKED_ACTIVATIONS(FO_DEF_MASKED)
#undef FO_DEF_MASKED
  // Sigmoid, Tanh: the backward from the output, and its derivative by the output.
#define FO_DEF_OUTPUT(name, schema_params, cpp_params, make)                                    \
  m.def(#name "_output_backward(Tensor grad_output, Tensor output" schema_params ") -> Tensor"); \
  m.def(#name "_output_double_backward(Tensor grad_grad, Tensor grad_output, Tensor output"     \
        schema_params ") -> Tensor");
  FASTOPS_OUTPUT_ACTIVATIONS(FO_DEF_OUTPUT)
#undef FO_DEF_OUTPUT

  // RReLU (rrelu.h). rrelu is torch.rrelu: leaky_relu with slope (lower + upper) / 2 in
  // evaluation, and in training a slope per element drawn from [lower, upper]: it draws a seed
  // with rrelu_seed and calls rrelu_seeded, and is differentiated through them.
  m.def("rrelu(Tensor self, float lower, float upper, bool training) -> Tensor");
  // The seed rows from the default generator of self's device (the tensor is used for its device
  // only): (2,) when samples is 0, else (samples, 2), one row per sample. The only random op.
  m.def("rrelu_seed(Tensor self, int samples=0) -> Tensor", {at::Tag::nondeterministic_seeded});
  // Training mode from given seed rows (rrelu_seed_rows in activation_checks.h): pure functions
  // of their arguments. The mask forms are those of the masked activations (the bits of
  // x > 0, NaN included); autograd saves the seed and the mask.
  m.def("rrelu_seeded(Tensor self, Tensor seed, float lower, float upper) -> Tensor");
  m.def(
      "rrelu_seeded_backward(Tensor grad_output, Tensor self, Tensor seed, float lower, "
      "float upper) -> Tensor");
  m.def(
      "rrelu_seeded_with_mask(Tensor self, Tensor seed, float lower, float upper) "
      "-> (Tensor, Tensor)");
  m.def(
      "rrelu_seeded_mask_backward(Tensor grad_output, Tensor mask, Tensor seed, float lower, "
      "float upper) -> Tensor");

  // PReLU: weight of 1 or C (= self.size(1)) slopes. backward returns (grad_self, grad_weight).
  m.def("prelu(Tensor self, Tensor weight) -> Tensor");
  m.def(
      "prelu_backward(Tensor grad_output, Tensor self, Tensor weight) -> (Tensor, Tensor)");

  // Maxout over dim 1: output channel j is the max of input channels j*k .. j*k+k-1.
  m.def("maxout(Tensor self, int pool_size) -> Tensor");
  m.def("maxout_backward(Tensor grad_output, Tensor self, int pool_size) -> Tensor");
  // The same forward that also returns, per output, the member its gradient goes to (uint8,
  // pool_size <= 256), and the backward that scatters grad_output by it: autograd then keeps one
  // byte per output instead of the input.
  m.def("maxout_with_indices(Tensor self, int pool_size) -> (Tensor, Tensor)");
  m.def("maxout_indices_backward(Tensor grad_output, Tensor indices, int pool_size) -> Tensor");

  // log_softmax over dim; backward takes the forward's output.
  m.def("log_softmax(Tensor self, int dim) -> Tensor");
  m.def("log_softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");
  // softmax over dim; backward takes the forward's output: output * (g - sum(g * output)).
  m.def("softmax(Tensor self, int dim) -> Tensor");
  m.def("softmax_backward(Tensor grad_output, Tensor output, int dim) -> Tensor");

  // nll_loss on log-probabilities self of shape (N, C), (N, C, d1..dk) or (C,). Returns
  // (loss, total_weight); total_weight is the sum of the weights of the non-ignored targets.
  m.def(
      "nll_loss(Tensor self, Tensor target, Tensor? weight, int reduction, int ignore_index) "
      "-> (Tensor, Tensor)");
  m.def(
      "nll_loss_backward(Tensor grad_output, Tensor self, Tensor target, Tensor? weight, "
      "int reduction, int ignore_index, Tensor total_weight) -> Tensor");

  // Fused log_softmax + nll_loss on logits. Returns (loss, lse, total_weight): lse is the
  // float32 (float64 for float64 input) log-sum-exp of every row, the only value saved for
  // backward besides the inputs.
  m.def(
      "cross_entropy(Tensor self, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor grad_output, Tensor self, Tensor target, Tensor? weight, "
      "int reduction, int ignore_index, float label_smoothing, Tensor lse, Tensor total_weight) "
      "-> Tensor");

  // Fused linear + cross entropy (linear_cross_entropy_checks.h): the logits
  // z = input @ weight^T + bias (then softcap * tanh(z / softcap) when softcap > 0) are reduced
  // tile by tile and never stored for all rows. The loss is cross_entropy's plus
  // z_loss * lse^2 per non-ignored row; lse (float32, float64 for float64) is kept per row (0
  // for ignored rows). With with_grad (reductions mean and sum only) the forward also returns
  // the gradients for grad_loss = 1 (grad_bias only with a bias), else three empty tensors.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor? class_weight, int reduction, int ignore_index, float label_smoothing, "
      "float z_loss, float softcap, bool with_grad) "
      "-> (Tensor loss, Tensor lse, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Recomputes the logit tiles from the inputs and lse; (grad_input, grad_weight, grad_bias),
  // empty where output_mask is false.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor weight, "
      "Tensor? bias, Tensor target, Tensor? class_weight, Tensor lse, int reduction, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // Mean squared error. backward returns (grad_self, grad_target), empty where output_mask is
  // false.
  m.def("mse_loss(Tensor self, Tensor target, int reduction) -> Tensor");
  m.def(
      "mse_loss_backward(Tensor grad_output, Tensor self, Tensor target, int reduction, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  // Mean absolute error, as mse_loss.
  m.def("l1_loss(Tensor self, Tensor target, int reduction) -> Tensor");
  m.def(
      "l1_loss_backward(Tensor grad_output, Tensor self, Tensor target, int reduction, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
  // Binary cross entropy on probabilities (self in [0, 1]) and on logits. weight and pos_weight
  // broadcast to self's shape and get no gradient from the backward ops, which return
  // (grad_self, grad_target) as mse_loss_backward.
  m.def(
      "binary_cross_entropy(Tensor self, Tensor target, Tensor? weight, int reduction) "
      "-> Tensor");
  m.def(
      "binary_cross_entropy_backward(Tensor grad_output, Tensor self, Tensor target, "
      "Tensor? weight, int reduction, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "binary_cross_entropy_with_logits(Tensor self, Tensor target, Tensor? weight, "
      "Tensor? pos_weight, int reduction) -> Tensor");
  m.def(
      "binary_cross_entropy_with_logits_backward(Tensor grad_output, Tensor self, "
      "Tensor target, Tensor? weight, Tensor? pos_weight, int reduction, bool[2] output_mask) "
      "-> (Tensor, Tensor)");

  // Margin losses. hinge_embedding_loss: self and target of one shape (the functional form
  // broadcasts), target in self's dtype or int64, loss (target != 1) * max(0, margin - x) +
  // (target != -1) * x. multi_margin_loss: self (N, C), (C,) or 0-d, int64 class targets, p 1
  // or 2, loss_n = w[y] sum_{i != y} max(0, margin - x[y] + x[i])^p / C. The targets and the
  // weight get no gradient.
  m.def("hinge_embedding_loss(Tensor self, Tensor target, float margin, int reduction) -> Tensor");
  m.def(
      "hinge_embedding_loss_backward(Tensor grad_output, Tensor self, Tensor target, "
      "float margin, int reduction) -> Tensor");
  m.def(
      "multi_margin_loss(Tensor self, Tensor target, int p, float margin, Tensor? weight, "
      "int reduction) -> Tensor");
  m.def(
      "multi_margin_loss_backward(Tensor grad_output, Tensor self, Tensor target, int p, "
      "float margin, Tensor? weight, int reduction) -> Tensor");

  // The fully fused MLP (fused_mlp_checks.h): every layer of a small MLP in one kernel per pass.
  // hidden: the hidden layers' pre-activations, L-1 tensors (N, hidden_features), and
  // out_preact: the output layer's (N, out_features) when output_activation is not 'none', both
  // only when save_for_backward (else an empty list and an empty (0,) tensor). The backward
  // returns the gradients of input, of every weight and of every bias; an empty (0,) tensor
  // where output_mask (input, weights, biases) is false or the biases are None.
  m.def(
      "fused_mlp(Tensor input, Tensor[] weights, Tensor?[] biases, str activation, "
      "str output_activation, bool save_for_backward) "
      "-> (Tensor output, Tensor[] hidden, Tensor out_preact)");
  m.def(
      "fused_mlp_backward(Tensor grad_output, Tensor input, Tensor[] weights, Tensor?[] biases, "
      "Tensor[] hidden, Tensor out_preact, str activation, str output_activation, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor[] grad_weights, Tensor[] grad_biases)");

  // The CPU instruction set the kernels run with: "avx512", "avx2" or "baseline".
  m.def("cpu_isa() -> str", [] {
    return std::string(fastops::cpu::isa_name(fastops::cpu::cpu_isa()));
  });
}
