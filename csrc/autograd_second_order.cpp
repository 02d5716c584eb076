// The autograd of the backward ops that a recorded backward (create_graph=True) runs most: the
// pointwise NAME_backward, NAME_output_backward and NAME_mask_backward, rrelu's two backward ops,
// linear_backward and linear_act_backward. Their formulas are the ones of fastops.ops (Python),
// written here again so that a gradient penalty or a Hessian-vector product does not pay Python
// per op; the other backward ops keep their Python autograd, and torch.func transforms run the
// Python formulas of all of them.
//
// Each node computes its derivatives with fastops ops called through the dispatcher, so a
// derivative of a derivative records again; the second derivatives of the activations
// (NAME_double_backward) are the last order there is.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "activations.h"
#include "autograd_common.h"

namespace fastops {
namespace {

// ---- pointwise: backward_op(grad_output, saved, params) = grad_output * f'(...) -------------
// Its derivative by grad_output is backward_op itself; by saved (the forward's input, or output
// for NAME_output_backward) it is second(grad_grad, grad_output, saved, params), zeros for a
// piecewise-linear f (f'' = 0, as torch gives), and none for a bit mask.

struct PointwiseBackwardOps {
  c10::OperatorHandle self;
  c10::optional<c10::OperatorHandle> second;  // none: f'' = 0, or a mask
};

const PointwiseBackwardOps& pointwise_backward_ops(const c10::OperatorHandle& op) {
  return per_op<PointwiseBackwardOps>(op, [](const c10::OperatorHandle& op) {
    const std::string name = op.schema().name();
    const auto find = [](const std::string& n) {
      return c10::Dispatcher::singleton().findSchema({n, ""});
    };
    const auto strip = [&](const std::string& suffix) {
      return name.size() > suffix.size() &&
                     name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0
                 ? name.substr(0, name.size() - suffix.size())
                 : std::string();
    };
    c10::optional<c10::OperatorHandle> second;
    if (const std::string base = strip("_output_backward"); !base.empty()) {
      second = find(base + "_output_double_backward");
    } else if (strip("_mask_backward").empty()) {
      const std::string activation = strip("_backward");
      // the piecewise-linear ones (those with a mask form) have f'' = 0
      if (!find(activation + "_with_mask").has_value())
        second = find(activation + "_double_backward");
    }
    return PointwiseBackwardOps{op, second};
  });
}

struct PointwiseBackwardFn : torch::autograd::Function<PointwiseBackwardFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& grad_output, const Tensor& saved,
                        const PointwiseBackwardOps* ops, const std::vector<double>& params) {
    // grad_output is needed only by the second derivative
    ctx->save_for_backward({ops->second.has_value() ? grad_output : Tensor(), saved});
    ctx->saved_data["ops"] = reinterpret_cast<int64_t>(ops);
    ctx->saved_data["params"] = params;
    ctx->set_materialize_grads(false);
    torch::jit::Stack stack{grad_output, saved};
    push_params(stack, params);
    at::AutoDispatchBelowADInplaceOrView guard;
    ops->self.callBoxed(&stack);
    return stack[0].toTensor();
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    tensor_list result(4);
    const Tensor& grad_grad = grads[0];
    if (!grad_grad.defined()) return result;
    const auto& ops =
        *reinterpret_cast<const PointwiseBackwardOps*>(ctx->saved_data["ops"].toInt());
    const auto params = ctx->saved_data["params"].toDoubleVector();
    const auto saved = ctx->get_saved_variables();
    const auto call = [&](const c10::OperatorHandle& op, torch::jit::Stack stack) {
      push_params(stack, params);
      BackwardCalls calls;
      op.callBoxed(&stack);
      return stack[0].toTensor();
    };
    if (ctx->needs_input_grad(0)) result[0] = call(ops.self, {grad_grad, saved[1]});
    if (ctx->needs_input_grad(1)) {
      result[1] = ops.second.has_value() ? call(*ops.second, {grad_grad, saved[0], saved[1]})
                                         : at::zeros_like(saved[1]);
    }
    return result;
  }
};

void pointwise_backward_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                 torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  auto args = torch::jit::last(*stack, n);
  const Tensor grad_output = args[0].toTensor(), saved = args[1].toTensor();
  if (needs_forward_ad(grad_output, saved)) {
    check_python_autograd(op);
    op.redispatchBoxed(kPythonAutograd, stack);
    return;
  }
  if (!needs_graph(grad_output, saved)) {
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
    return;
  }
  std::vector<double> params;
  for (size_t i = 2; i < n; ++i) params.push_back(args[i].toDouble());
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, PointwiseBackwardFn::apply(grad_output, saved,
                                                      &pointwise_backward_ops(op), params));
}

// ---- linear_backward: (g W, g^T x, sum g), each bilinear --------------------------------------

using LinearBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                             const Tensor&, std::array<bool, 3>);
const auto& linear_backward_op() {
  static const auto handle = typed_op<LinearBackwardSig>("fastops::linear_backward");
  return handle;
}
const auto& linear_op() {
  static const auto handle = typed_op<Tensor(const Tensor&, const Tensor&,
                                             const c10::optional<Tensor>&)>("fastops::linear");
  return handle;
}

Tensor sum_defined(const Tensor& a, const Tensor& b) { return a.defined() ? a + b : b; }

struct LinearBackwardFn : torch::autograd::Function<LinearBackwardFn> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& grad_output, const Tensor& input,
                             const Tensor& weight, std::array<bool, 3> mask) {
    ctx->save_for_backward({grad_output, input, weight});
    ctx->saved_data["mask"] = std::vector<bool>(mask.begin(), mask.end());
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gi, gw, gb] = linear_backward_op().call(grad_output, input, weight, mask);
    return {gi, gw, gb};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &g = saved[0], &input = saved[1], &weight = saved[2];
    const auto mask = ctx->saved_data["mask"].toBoolList();
    const Tensor gg_input = mask[0] ? grads[0] : Tensor();
    const Tensor gg_weight = mask[1] ? grads[1] : Tensor();
    const Tensor gg_bias = mask[2] ? grads[2] : Tensor();
    BackwardCalls calls;
    Tensor d_g, d_input, d_weight;
    if (ctx->needs_input_grad(0)) {
      if (gg_input.defined()) d_g = linear_op().call(gg_input, weight, c10::nullopt);
      if (gg_weight.defined())
        d_g = sum_defined(d_g, linear_op().call(input, gg_weight, c10::nullopt));
      if (gg_bias.defined()) d_g = sum_defined(d_g, gg_bias.expand(g.sizes()));
    }
    if (ctx->needs_input_grad(1) && gg_weight.defined())
      d_input = std::get<0>(linear_backward_op().call(g, input, gg_weight, {true, false, false}));
    if (ctx->needs_input_grad(2) && gg_input.defined())
      d_weight = std::get<1>(linear_backward_op().call(g, gg_input, weight, {false, true, false}));
    return {d_g, d_input, d_weight, Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> linear_backward_autograd(c10::DispatchKeySet keys,
                                                            const Tensor& grad_output,
                                                            const Tensor& input,
                                                            const Tensor& weight,
                                                            std::array<bool, 3> mask) {
  if (needs_forward_ad(grad_output, input, weight))
    return python_autograd(linear_backward_op(), grad_output, input, weight, mask);
  if (!needs_graph(grad_output, input, weight))
    return linear_backward_op().redispatch(keys & c10::after_autograd_keyset, grad_output, input,
                                           weight, mask);
  const auto r = LinearBackwardFn::apply(grad_output, input, weight, mask);
  return {r[0], r[1], r[2]};
}

// ---- linear_act_backward: a composite of the differentiable ops above when a graph is wanted --

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_act_backward_autograd(
    c10::DispatchKeySet keys, const Tensor& grad_output, const Tensor& input, const Tensor& weight,
    const Tensor& preact, c10::string_view activation, double a, double b,
    const c10::optional<Tensor>& act_weight, std::array<bool, 4> mask) {
  static const auto op = typed_op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view, double,
      double, const c10::optional<Tensor>&, std::array<bool, 4>)>("fastops::linear_act_backward");
  static const auto prelu_backward = typed_op<std::tuple<Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&)>("fastops::prelu_backward");
  static const auto maxout_backward =
      typed_op<Tensor(const Tensor&, const Tensor&, int64_t)>("fastops::maxout_backward");
  if (needs_forward_ad(grad_output, input, weight, preact, act_weight))
    return python_autograd(op, grad_output, input, weight, preact, activation, a, b, act_weight,
                           mask);
  if (!needs_graph(grad_output, input, weight, preact, act_weight))
    return op.redispatch(keys & c10::after_autograd_keyset, grad_output, input, weight, preact,
                         activation, a, b, act_weight, mask);
  // The activation acts over the last dim (the output features): as (rows, features).
  const Tensor z = preact.reshape({-1, preact.size(-1)});
  const Tensor g = grad_output.reshape({-1, grad_output.size(-1)});
  Tensor grad_z;
  if (activation == "prelu") {
    grad_z = std::get<0>(prelu_backward.call(g, z, *act_weight));
  } else if (activation == "maxout") {
    grad_z = maxout_backward.call(g, z, static_cast<int64_t>(a));
  } else {
    const auto backward = c10::Dispatcher::singleton().findSchemaOrThrow(
        ("fastops::" + std::string(activation) + "_backward").c_str(), "");
    torch::jit::Stack stack{g, z};
    const size_t n_params = backward.schema().arguments().size() - 2;
    if (n_params > 0) stack.emplace_back(a);
    if (n_params > 1) stack.emplace_back(b);
    backward.callBoxed(&stack);
    grad_z = stack[0].toTensor();
  }
  auto [gi, gw, gb] = linear_backward_op().call(grad_z.reshape(preact.sizes()), input, weight,
                                                {mask[0], mask[1], mask[2]});
  Tensor gaw = mask[3] ? std::get<1>(prelu_backward.call(g, z, *act_weight))
                       : grad_output.new_empty({0});
  return {gi, gw, gb, gaw};
}

// ---- rrelu_seeded_backward(grad_output, self, seed, lower, upper) and
// rrelu_seeded_mask_backward(grad_output, mask, seed, lower, upper) = grad_output * slope ---------
// Linear in grad_output (the derivative is the op itself), piecewise constant in self (zeros, as
// torch's), none for the mask and the seed.

using SeededBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, double, double);
const c10::TypedOperatorHandle<SeededBackwardSig>& seeded_backward_op(bool from_mask) {
  static const auto from_input = typed_op<SeededBackwardSig>("fastops::rrelu_seeded_backward");
  static const auto from_bits = typed_op<SeededBackwardSig>("fastops::rrelu_seeded_mask_backward");
  return from_mask ? from_bits : from_input;
}

struct SeededBackwardFn : torch::autograd::Function<SeededBackwardFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& grad_output, const Tensor& saved,
                        const Tensor& seed, double lower, double upper, bool from_mask) {
    ctx->save_for_backward({saved, seed});
    ctx->saved_data["lower"] = lower;
    ctx->saved_data["upper"] = upper;
    ctx->saved_data["from_mask"] = from_mask;
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView guard;
    return seeded_backward_op(from_mask).call(grad_output, saved, seed, lower, upper);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    tensor_list result(6);
    const Tensor& grad_grad = grads[0];
    if (!grad_grad.defined()) return result;
    const auto saved = ctx->get_saved_variables();
    if (ctx->needs_input_grad(0)) {
      BackwardCalls calls;
      result[0] = seeded_backward_op(ctx->saved_data["from_mask"].toBool())
                      .call(grad_grad, saved[0], saved[1], ctx->saved_data["lower"].toDouble(),
                            ctx->saved_data["upper"].toDouble());
    }
    if (ctx->needs_input_grad(1)) result[1] = at::zeros_like(saved[0]);
    return result;
  }
};

template <bool kFromMask>
Tensor seeded_backward_autograd(c10::DispatchKeySet keys, const Tensor& grad_output,
                                const Tensor& saved, const Tensor& seed, double lower,
                                double upper) {
  const auto& op = seeded_backward_op(kFromMask);
  if (needs_forward_ad(grad_output, saved))
    return python_autograd(op, grad_output, saved, seed, lower, upper);
  if (!needs_graph(grad_output, saved))
    return op.redispatch(keys & c10::after_autograd_keyset, grad_output, saved, seed, lower,
                         upper);
  return SeededBackwardFn::apply(grad_output, saved, seed, lower, upper, kFromMask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastops, Autograd, m) {
  const auto pointwise = [] {
    return torch::CppFunction::makeFromBoxedFunction<&pointwise_backward_autograd>();
  };
#define FO_AUTOGRAD_BACKWARD(name, ...) m.impl(#name "_backward", pointwise());
  FASTOPS_POINTWISE_ACTIVATIONS(FO_AUTOGRAD_BACKWARD)
#undef FO_AUTOGRAD_BACKWARD
#define FO_AUTOGRAD_BACKWARD(name, ...) m.impl(#name "_mask_backward", pointwise());
  FASTOPS_MASKED_ACTIVATIONS(FO_AUTOGRAD_BACKWARD)
#undef FO_AUTOGRAD_BACKWARD
#define FO_AUTOGRAD_BACKWARD(name, ...) m.impl(#name "_output_backward", pointwise());
  FASTOPS_OUTPUT_ACTIVATIONS(FO_AUTOGRAD_BACKWARD)
#undef FO_AUTOGRAD_BACKWARD
  m.impl("linear_backward", &linear_backward_autograd);
  m.impl("linear_act_backward", &linear_act_backward_autograd);
  m.impl("rrelu_seeded_backward", &seeded_backward_autograd<false>);
  m.impl("rrelu_seeded_mask_backward", &seeded_backward_autograd<true>);
}

}  // namespace fastops
