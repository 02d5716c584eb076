// The autograd formulas of every differentiable fastops op, registered for the Autograd
// dispatch key (CPU and CUDA alike): calling torch.ops.fastops.X (and so every functional form
// and module) records a C++ graph node whose backward calls the fastops backward op. Doing this
// in C++ rather than with a Python autograd.Function keeps the per-call cost near torch's own.
//
// Each forward runs the op below autograd (AutoDispatchBelowADInplaceOrView); each backward
// computes only the gradients that are needed. Non-differentiable outputs (the saved
// pre-activation, lse, total_weight) are marked so, and undefined incoming gradients are not
// materialised as zeros.
//
// Higher order: a node's backward calls the backward ops below autograd in an ordinary backward,
// and through their own autograd when the backward is itself recorded (create_graph=True); the
// backward ops' derivative formulas live in fastops.ops (Python), registered for their Autograd
// key. torch.func transforms and forward-mode AD (dual tensors) run the op's Python
// autograd.Function instead of these nodes, which have no jvp or vmap rule: fastops.ops registers
// it for the FuncTorchDynamicLayerFrontMode key, where the transforms find it first, and the
// kernels below redispatch dual tensors to it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "activation_checks.h"
#include "activations.h"
#include "autograd_common.h"

namespace fastops {
namespace {

// The piecewise-linear activations and the indexed maxout save nothing that leads back to their
// input (a bit mask, byte indices), yet the derivative of their backward by the input must come
// out as zeros, as torch's does, not as "does not require grad". Their node therefore has a
// second output, the tie (a zero broadcast to the input's shape, no memory), saved for backward:
// a recorded backward adds it to its result, which so depends on the input through this node.
Tensor new_tie(const Tensor& self) {
  // On the CPU, where the allocation shows at small sizes: one zero per thread, kept while the
  // dtype repeats; nothing writes to a tie. Not for devices (a thread's tensors would outlive
  // it), nor for the tensors of tracing (fake and functional ones, Python modes).
  const bool plain_cpu = self.is_cpu() && !self.key_set().has(c10::DispatchKey::Python) &&
                         !self.key_set().has(c10::DispatchKey::Functionalize) &&
                         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python);
  if (!plain_cpu) return at::zeros({}, self.options()).expand(self.sizes());
  thread_local Tensor zero;
  if (!zero.defined() || zero.scalar_type() != self.scalar_type())
    zero = at::zeros({}, self.options());
  return zero.expand(self.sizes());
}

// grad_input of a node with a tie. grad_tie is the gradient that came back through the tie: it
// is there only in a double backward, and its derivative by the input is zero.
Tensor tied(Tensor grad_input, const Tensor& tie, const Tensor& grad_tie) {
  if (!grad_input.defined())
    return grad_tie.defined() ? at::zeros(tie.sizes(), tie.options()) : Tensor();
  return at::GradMode::is_enabled() ? grad_input + tie : grad_input;
}

// ---- pointwise activations: NAME(self, float params...) and NAME_backward(grad, self, params)

// Boxed kernels serve every pointwise activation: they take the op's float parameters from the
// stack, whatever their number, and run the op's variants (NAME_backward, NAME_with_mask, ...).
// The variants of a pointwise op, looked up by name once per activation, not on every call.
struct PointwiseOps {
  c10::optional<c10::OperatorHandle> backward, with_mask, mask_backward, output_backward;
};

const PointwiseOps& pointwise_ops(const c10::OperatorHandle& op) {
  return per_op<PointwiseOps>(op, [](const c10::OperatorHandle& op) {
    const std::string name = op.schema().name();
    const auto find = [&](const char* suffix) {
      return c10::Dispatcher::singleton().findSchema({name + suffix, ""});
    };
    return PointwiseOps{find("_backward"), find("_with_mask"), find("_mask_backward"),
                        find("_output_backward")};
  });
}

// Runs op(self, params) below autograd and returns the stack holding its outputs.
torch::jit::Stack call_below_autograd(const c10::OperatorHandle& op, const Tensor& self,
                                      const std::vector<double>& params) {
  torch::jit::Stack stack{self};
  push_params(stack, params);
  at::AutoDispatchBelowADInplaceOrView guard;
  op.callBoxed(&stack);
  return stack;
}

// What pointwise_backward needs besides the saved tensor: the op it calls (its handle in the
// cache of pointwise_ops, which lives as long as the library, kept as an address) and the params.
void remember_backward(AutogradContext* ctx, const c10::OperatorHandle& backward_op,
                       const std::vector<double>& params) {
  ctx->saved_data["backward_op"] = reinterpret_cast<int64_t>(&backward_op);
  if (!params.empty()) ctx->saved_data["params"] = params;
}

// Saves the input; backward calls NAME_backward(grad, self, params).
struct PointwiseFn : torch::autograd::Function<PointwiseFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const c10::OperatorHandle& op,
                        const std::vector<double>& params) {
    ctx->save_for_backward({self});
    remember_backward(ctx, *pointwise_ops(op).backward, params);
    return call_below_autograd(op, self, params)[0].toTensor();
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    return pointwise_backward(ctx, grads);
  }
  // Shared with the other pointwise nodes: backward_op(grad, first saved tensor, params).
  static tensor_list pointwise_backward(AutogradContext* ctx, const tensor_list& grads) {
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor()};
    const auto& backward_op = *reinterpret_cast<const c10::OperatorHandle*>(
        ctx->saved_data["backward_op"].toInt());
    torch::jit::Stack stack{grads[0], ctx->get_saved_variables()[0]};
    const auto params = ctx->saved_data.find("params");
    if (params != ctx->saved_data.end()) push_params(stack, params->second.toDoubleVector());
    BackwardCalls calls;
    backward_op.callBoxed(&stack);
    return {stack[0].toTensor(), Tensor(), Tensor()};
  }
};

// The piecewise-linear activations: the forward runs NAME_with_mask and saves its bit mask (1
// bit per element) instead of the input, and the tie (see new_tie); backward calls
// NAME_mask_backward(grad, mask).
struct MaskedPointwiseFn : torch::autograd::Function<MaskedPointwiseFn> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& self,
                             const c10::OperatorHandle& op, const std::vector<double>& params) {
    const PointwiseOps& ops = pointwise_ops(op);
    const torch::jit::Stack out = call_below_autograd(*ops.with_mask, self, params);
    Tensor tie = new_tie(self);
    ctx->save_for_backward({out[1].toTensor(), tie});
    remember_backward(ctx, *ops.mask_backward, params);
    ctx->set_materialize_grads(false);
    return {out[0].toTensor(), tie};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    if (!ctx->needs_input_grad(0)) return {Tensor(), Tensor(), Tensor()};
    Tensor grad_input;
    if (grads[0].defined()) grad_input = PointwiseFn::pointwise_backward(ctx, grads)[0];
    return {tied(grad_input, ctx->get_saved_variables()[1], grads[1]), Tensor(), Tensor()};
  }
};

// Sigmoid and Tanh: in float32 and float64 the output is saved (their derivative is a
// polynomial of it, as torch computes it) and backward calls NAME_output_backward(grad, output).
// A float16/bfloat16 output is too coarse for that (near saturation 1 - y * y rounds to 0 where
// the true derivative does not), so there the input is saved, as PointwiseFn does.
struct OutputPointwiseFn : torch::autograd::Function<OutputPointwiseFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const c10::OperatorHandle& op,
                        const std::vector<double>& params) {
    Tensor output = call_below_autograd(op, self, params)[0].toTensor();
    const bool from_output =
        self.scalar_type() == at::kFloat || self.scalar_type() == at::kDouble;
    const PointwiseOps& ops = pointwise_ops(op);
    ctx->save_for_backward({from_output ? output : self});
    remember_backward(ctx, from_output ? *ops.output_backward : *ops.backward, params);
    return output;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    return PointwiseFn::pointwise_backward(ctx, grads);
  }
};

Tensor first_output(Tensor t) { return t; }
Tensor first_output(const tensor_list& t) { return t[0]; }

template <class Fn>
void pointwise_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  auto args = torch::jit::last(*stack, n);
  const Tensor self = args[0].toTensor();
  if (needs_forward_ad(self)) {
    check_python_autograd(op);
    op.redispatchBoxed(kPythonAutograd, stack);
    return;
  }
  if (!needs_graph(self)) {
    op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
    return;
  }
  std::vector<double> params;
  for (size_t i = 1; i < n; ++i) params.push_back(args[i].toDouble());
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, first_output(Fn::apply(self, op, params)));
}

// ---- rrelu (rrelu.h) ---------------------------------------------------------------------------

const auto& rrelu_seeded_op() {
  static const auto handle = typed_op<Tensor(const Tensor&, const Tensor&, double, double)>(
      "fastops::rrelu_seeded");
  return handle;
}

// Training mode: the forward runs rrelu_seeded_with_mask and saves the seed rows and its bit mask
// (16 bytes and 1 bit per element, where torch keeps a noise tensor of the input's size and
// dtype), and the tie (see new_tie); backward calls rrelu_seeded_mask_backward, which draws the
// same slopes again from the seed rows.
struct RReLUSeededFn : torch::autograd::Function<RReLUSeededFn> {
  static tensor_list forward(AutogradContext* ctx, const Tensor& self, const Tensor& seed,
                             double lower, double upper) {
    static const auto with_mask = typed_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, double, double)>("fastops::rrelu_seeded_with_mask");
    Tensor out, mask;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, mask) = with_mask.call(self, seed, lower, upper);
    }
    Tensor tie = new_tie(self);
    ctx->save_for_backward({mask, seed, tie});
    ctx->saved_data["lower"] = lower;
    ctx->saved_data["upper"] = upper;
    ctx->set_materialize_grads(false);
    return {out, tie};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto mask_backward = typed_op<Tensor(const Tensor&, const Tensor&,
                                                      const Tensor&, double, double)>(
        "fastops::rrelu_seeded_mask_backward");
    tensor_list result(4);
    if (!ctx->needs_input_grad(0)) return result;
    const auto saved = ctx->get_saved_variables();
    Tensor grad_input;
    if (grads[0].defined()) {
      BackwardCalls calls;
      grad_input = mask_backward.call(grads[0], saved[0], saved[1],
                                      ctx->saved_data["lower"].toDouble(),
                                      ctx->saved_data["upper"].toDouble());
    }
    result[0] = tied(grad_input, saved[2], grads[1]);
    return result;
  }
};

// rrelu itself is a composite of the ops (registered for CompositeImplicitAutograd): its autograd,
// fake kernel and torch.func rules are those of leaky_relu, rrelu_seed and rrelu_seeded.
Tensor rrelu_composite(const Tensor& self, double lower, double upper, bool training) {
  static const auto leaky_relu = typed_op<Tensor(const Tensor&, double)>("fastops::leaky_relu");
  static const auto rrelu_seed = typed_op<Tensor(const Tensor&, int64_t)>("fastops::rrelu_seed");
  check_rrelu_bounds(lower, upper, "fastops.rrelu");
  if (!training) return leaky_relu.call(self, (lower + upper) / 2);
  return rrelu_seeded_op().call(self, rrelu_seed.call(self, 0), lower, upper);
}

// ---- prelu, maxout ---------------------------------------------------------------------------

struct PreluFn : torch::autograd::Function<PreluFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<Tensor(const Tensor&, const Tensor&)>("fastops::prelu");
    return handle;
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const Tensor& weight) {
    ctx->save_for_backward({self, weight});
    at::AutoDispatchBelowADInplaceOrView guard;
    return op().call(self, weight);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&)>("fastops::prelu_backward");
    const bool need_self = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    if (!grads[0].defined() || !(need_self || need_weight)) return {Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    BackwardCalls calls;
    auto [grad_self, grad_weight] = backward_op.call(grads[0], saved[0], saved[1]);
    return {if_needed(need_self, grad_self), if_needed(need_weight, grad_weight)};
  }
};

// Pool sizes up to 256 save the argmax of each output (one byte, from maxout_with_indices)
// instead of the input, and the backward only scatters the gradient; larger pool sizes save the
// input and maxout_backward recomputes the argmax.
struct MaxoutFn : torch::autograd::Function<MaxoutFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<Tensor(const Tensor&, int64_t)>("fastops::maxout");
    return handle;
  }
  // Returns (output, tie); see new_tie.
  static tensor_list forward(AutogradContext* ctx, const Tensor& self, int64_t pool_size) {
    static const auto with_indices = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, int64_t)>(
        "fastops::maxout_with_indices");
    ctx->saved_data["pool_size"] = pool_size;
    const bool indexed = pool_size <= kMaxoutIndexedPoolLimit;
    ctx->saved_data["indexed"] = indexed;
    ctx->set_materialize_grads(false);
    Tensor output, saved;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (indexed) {
        std::tie(output, saved) = with_indices.call(self, pool_size);
      } else {
        output = op().call(self, pool_size);
        saved = self;
      }
    }
    Tensor tie = new_tie(self);
    ctx->save_for_backward({saved, tie});
    return {output, tie};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op =
        typed_op<Tensor(const Tensor&, const Tensor&, int64_t)>("fastops::maxout_backward");
    static const auto indices_backward_op = typed_op<Tensor(const Tensor&, const Tensor&, int64_t)>(
        "fastops::maxout_indices_backward");
    if (!ctx->needs_input_grad(0)) return {Tensor(), Tensor()};
    const auto& from = ctx->saved_data["indexed"].toBool() ? indices_backward_op : backward_op;
    const auto saved = ctx->get_saved_variables();
    Tensor grad_input;
    if (grads[0].defined()) {
      BackwardCalls calls;
      grad_input = from.call(grads[0], saved[0], ctx->saved_data["pool_size"].toInt());
    }
    return {tied(grad_input, saved[1], grads[1]), Tensor()};
  }
};

// ---- linear, linear_act ----------------------------------------------------------------------
// Gradient slots of the variables: input 0, weight 1, then bias and act_weight when given.

struct LinearFn : torch::autograd::Function<LinearFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<Tensor(const Tensor&, const Tensor&, const c10::optional<Tensor>&)>(
        "fastops::linear");
    return handle;
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const c10::optional<Tensor>& bias) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op().call(input, weight, bias);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    return linear_grads(ctx, grads[0], 0);
  }
  // The gradients of input, weight and bias (saved: input, weight), those that are needed, for
  // a node whose variables from first_input on are linear's.
  static tensor_list linear_grads(AutogradContext* ctx, const Tensor& grad, int first_input) {
    static const auto backward_op = typed_op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, std::array<bool, 3>)>(
        "fastops::linear_backward");
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask{ctx->needs_input_grad(first_input),
                                   ctx->needs_input_grad(first_input + 1),
                                   has_bias && ctx->needs_input_grad(first_input + 2)};
    if (!grad.defined() || !(mask[0] || mask[1] || mask[2]))
      return {Tensor(), Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    BackwardCalls calls;
    auto [gi, gw, gb] = backward_op.call(grad, saved[0], saved[1], mask);
    return {if_needed(mask[0], gi), if_needed(mask[1], gw), if_needed(mask[2], gb)};
  }
};

// linear_act's saved pre-activation given back its graph (input W^T + bias), without computing
// it again: a recorded backward of linear_act differentiates through it (the saved tensor is a
// non-differentiable output).
struct PreactFn : torch::autograd::Function<PreactFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& preact, const Tensor& input,
                        const Tensor& weight, const c10::optional<Tensor>& bias) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return preact;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    tensor_list result{Tensor()};
    for (Tensor& g : LinearFn::linear_grads(ctx, grads[0], 1)) result.push_back(std::move(g));
    return result;
  }
};

struct LinearActFn : torch::autograd::Function<LinearActFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const c10::optional<Tensor>&, c10::string_view, double,
        double, const c10::optional<Tensor>&, bool)>("fastops::linear_act");
    return handle;
  }
  static tensor_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                             const c10::optional<Tensor>& bias, c10::string_view activation,
                             double a, double b, const c10::optional<Tensor>& act_weight,
                             bool save_preact) {
    Tensor out, preact;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, preact) = op().call(input, weight, bias, activation, a, b, act_weight,
                                      save_preact);
    }
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({preact});
    ctx->save_for_backward({input, weight, save_preact ? preact : Tensor(),
                            value_or_undefined(act_weight), value_or_undefined(bias)});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["a"] = a;
    ctx->saved_data["b"] = b;
    ctx->saved_data["save_preact"] = save_preact;
    return {out, preact};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op = typed_op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view, double,
        double, const c10::optional<Tensor>&, std::array<bool, 4>)>(
        "fastops::linear_act_backward");
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &preact = saved[2],
                 &act_weight = saved[3];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 4> mask{
        ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        has_bias && ctx->needs_input_grad(2),
        act_weight.defined() && ctx->needs_input_grad(2 + (has_bias ? 1 : 0))};
    tensor_list result(8);
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return result;
    TORCH_CHECK(ctx->saved_data["save_preact"].toBool(),
                "fastops.linear_act: backward needs the pre-activation, but forward ran with "
                "save_preact=False; pass save_preact=True when a gradient is needed");
    // A recorded backward differentiates through the pre-activation too (see PreactFn).
    const Tensor z = at::GradMode::is_enabled()
                         ? PreactFn::apply(preact, input, weight, optional_of(saved[4]))
                         : preact;
    BackwardCalls calls;
    auto [gi, gw, gb, gaw] =
        backward_op.call(grads[0], input, weight, z, ctx->saved_data["activation"].toStringRef(),
                ctx->saved_data["a"].toDouble(), ctx->saved_data["b"].toDouble(),
                optional_of(act_weight), mask);
    result[0] = if_needed(mask[0], gi);
    result[1] = if_needed(mask[1], gw);
    result[2] = if_needed(mask[2], gb);
    result[6] = if_needed(mask[3], gaw);
    return result;
  }
};

// ---- losses ----------------------------------------------------------------------------------

// log_softmax and softmax: the backward op takes the forward's output, the only value saved.
template <class Names>
struct SoftmaxLikeFn : torch::autograd::Function<SoftmaxLikeFn<Names>> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<Tensor(const Tensor&, int64_t)>(Names::forward);
    return handle;
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& self, int64_t dim) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op().call(self, dim);
    }
    ctx->save_for_backward({out});
    ctx->saved_data["dim"] = dim;
    return out;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op =
        typed_op<Tensor(const Tensor&, const Tensor&, int64_t)>(Names::backward);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return {Tensor(), Tensor()};
    BackwardCalls calls;
    return {backward_op.call(grads[0], ctx->get_saved_variables()[0],
                             ctx->saved_data["dim"].toInt()),
            Tensor()};
  }
};
struct LogSoftmaxNames {
  static constexpr const char* forward = "fastops::log_softmax";
  static constexpr const char* backward = "fastops::log_softmax_backward";
};
struct SoftmaxNames {
  static constexpr const char* forward = "fastops::softmax";
  static constexpr const char* backward = "fastops::softmax_backward";
};
using LogSoftmaxFn = SoftmaxLikeFn<LogSoftmaxNames>;
using SoftmaxFn = SoftmaxLikeFn<SoftmaxNames>;

// Class-index targets and the class weights get no gradient.
struct NllLossFn : torch::autograd::Function<NllLossFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const c10::optional<Tensor>&, int64_t, int64_t)>(
        "fastops::nll_loss");
    return handle;
  }
  static tensor_list forward(AutogradContext* ctx, const Tensor& self, const Tensor& target,
                             const c10::optional<Tensor>& weight, int64_t reduction,
                             int64_t ignore_index) {
    Tensor loss, total_weight;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, total_weight) = op().call(self, target, weight, reduction, ignore_index);
    }
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({total_weight});
    ctx->save_for_backward({self, target, value_or_undefined(weight), total_weight});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    return {loss, total_weight};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op = typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                     const c10::optional<Tensor>&, int64_t, int64_t,
                                     const Tensor&)>("fastops::nll_loss_backward");
    tensor_list result(5);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return result;
    const auto saved = ctx->get_saved_variables();
    BackwardCalls calls;
    result[0] = backward_op.call(grads[0], saved[0], saved[1], optional_of(saved[2]),
                        ctx->saved_data["reduction"].toInt(),
                        ctx->saved_data["ignore_index"].toInt(), saved[3]);
    return result;
  }
};

// d loss / d target for probability targets: -(1 - eps) w_c log_softmax(self)_c times the row's
// incoming gradient (mean: divided by the number of rows). A rare path, composed of ATen ops.
Tensor soft_target_grad(const Tensor& grad_loss, const Tensor& self,
                        const c10::optional<Tensor>& weight, int64_t reduction,
                        double label_smoothing, const Tensor& lse) {
  static const auto log_softmax = typed_op<Tensor(const Tensor&, int64_t)>("fastops::log_softmax");
  const int64_t class_dim = self.dim() == 1 ? 0 : 1;
  // A recorded backward needs log_softmax(self) with its graph; lse is not differentiable.
  const Tensor logp = at::GradMode::is_enabled()
                          ? log_softmax.call(self, class_dim).to(lse.scalar_type())
                          : self.to(lse.scalar_type()) - lse.unsqueeze(class_dim);
  Tensor g = logp * -(1.0 - label_smoothing);
  if (weight.has_value() && weight->defined()) {
    std::vector<int64_t> shape(self.dim(), 1);
    shape[class_dim] = -1;
    g = g * weight->to(lse.scalar_type()).view(shape);
  }
  Tensor scale = grad_loss.to(lse.scalar_type());
  if (reduction == 0) {
    g = g * scale.unsqueeze(class_dim);
  } else {
    if (reduction == 1) scale = scale / static_cast<double>(std::max<int64_t>(lse.numel(), 1));
    g = g * scale;
  }
  return g.to(self.scalar_type());
}

struct CrossEntropyFn : torch::autograd::Function<CrossEntropyFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const c10::optional<Tensor>&, int64_t, int64_t, double)>(
        "fastops::cross_entropy");
    return handle;
  }
  static tensor_list forward(AutogradContext* ctx, const Tensor& self, const Tensor& target,
                             const c10::optional<Tensor>& weight, int64_t reduction,
                             int64_t ignore_index, double label_smoothing) {
    Tensor loss, lse, total_weight;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, lse, total_weight) =
          op().call(self, target, weight, reduction, ignore_index, label_smoothing);
    }
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({lse, total_weight});
    ctx->save_for_backward({self, target, value_or_undefined(weight), lse, total_weight});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    return {loss, lse, total_weight};
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op = typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                     const c10::optional<Tensor>&, int64_t, int64_t, double,
                                     const Tensor&, const Tensor&)>(
        "fastops::cross_entropy_backward");
    tensor_list result(6);
    if (!grads[0].defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const Tensor &self = saved[0], &target = saved[1], &lse = saved[3];
    const auto weight = optional_of(saved[2]);
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    BackwardCalls calls;
    if (ctx->needs_input_grad(0))
      result[0] = backward_op.call(grads[0], self, target, weight, reduction,
                          ctx->saved_data["ignore_index"].toInt(), label_smoothing, lse,
                          saved[4]);
    if (ctx->needs_input_grad(1) && target.is_floating_point())
      result[1] = soft_target_grad(grads[0], self, weight, reduction, label_smoothing, lse);
    return result;
  }
};

// mse_loss and l1_loss, whose signatures are the same: one node over the op named by Names.
template <class Names>
struct RegressionLossFn : torch::autograd::Function<RegressionLossFn<Names>> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle =
        typed_op<Tensor(const Tensor&, const Tensor&, int64_t)>(Names::kForward);
    return handle;
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const Tensor& target,
                        int64_t reduction) {
    ctx->save_for_backward({self, target});
    ctx->saved_data["reduction"] = reduction;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op().call(self, target, reduction);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op = typed_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, int64_t, std::array<bool, 2>)>(
        Names::kBackward);
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if (!grads[0].defined() || !(mask[0] || mask[1])) return {Tensor(), Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    BackwardCalls calls;
    auto [grad_self, grad_target] =
        backward_op.call(grads[0], saved[0], saved[1], ctx->saved_data["reduction"].toInt(), mask);
    return {if_needed(mask[0], grad_self), if_needed(mask[1], grad_target), Tensor()};
  }
};
struct MseNames {
  static constexpr const char* kForward = "fastops::mse_loss";
  static constexpr const char* kBackward = "fastops::mse_loss_backward";
};
struct L1Names {
  static constexpr const char* kForward = "fastops::l1_loss";
  static constexpr const char* kBackward = "fastops::l1_loss_backward";
};
using MseLossFn = RegressionLossFn<MseNames>;
using L1LossFn = RegressionLossFn<L1Names>;

template <class Fn>
Tensor regression_loss_autograd(const Tensor& self, const Tensor& target, int64_t reduction) {
  if (needs_forward_ad(self, target)) return python_autograd(Fn::op(), self, target, reduction);
  if (needs_graph(self, target)) return Fn::apply(self, target, reduction);
  at::AutoDispatchBelowADInplaceOrView guard;
  return Fn::op().call(self, target, reduction);
}

// The binary cross entropies differentiate self and target. weight and pos_weight get no
// gradient and, as in torch, may not require one: an error, never a silent zero.
void check_not_differentiable(const c10::optional<Tensor>& t, const char* arg, const char* op) {
  TORCH_CHECK(!requires_grad(t), "fastops.", op,
              " is not differentiable with respect to argument '", arg,
              "' (as torch's). This input cannot have requires_grad True.");
}

struct BinaryCrossEntropyFn : torch::autograd::Function<BinaryCrossEntropyFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<Tensor(const Tensor&, const Tensor&,
                                               const c10::optional<Tensor>&, int64_t)>(
        "fastops::binary_cross_entropy");
    return handle;
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const Tensor& target,
                        const c10::optional<Tensor>& weight, int64_t reduction) {
    ctx->save_for_backward({self, target, value_or_undefined(weight)});
    ctx->saved_data["reduction"] = reduction;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op().call(self, target, weight, reduction);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op = typed_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&, int64_t,
        std::array<bool, 2>)>("fastops::binary_cross_entropy_backward");
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    tensor_list result(4);
    if (!grads[0].defined() || !(mask[0] || mask[1])) return result;
    const auto saved = ctx->get_saved_variables();
    BackwardCalls calls;
    auto [grad_self, grad_target] =
        backward_op.call(grads[0], saved[0], saved[1], optional_of(saved[2]),
                         ctx->saved_data["reduction"].toInt(), mask);
    result[0] = if_needed(mask[0], grad_self);
    result[1] = if_needed(mask[1], grad_target);
    return result;
  }
};

struct BceWithLogitsFn : torch::autograd::Function<BceWithLogitsFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<Tensor(
        const Tensor&, const Tensor&, const c10::optional<Tensor>&, const c10::optional<Tensor>&,
        int64_t)>("fastops::binary_cross_entropy_with_logits");
    return handle;
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const Tensor& target,
                        const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& pos_weight, int64_t reduction) {
    ctx->save_for_backward(
        {self, target, value_or_undefined(weight), value_or_undefined(pos_weight)});
    ctx->saved_data["reduction"] = reduction;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op().call(self, target, weight, pos_weight, reduction);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op = typed_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
        const c10::optional<Tensor>&, int64_t, std::array<bool, 2>)>(
        "fastops::binary_cross_entropy_with_logits_backward");
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    tensor_list result(5);
    if (!grads[0].defined() || !(mask[0] || mask[1])) return result;
    const auto saved = ctx->get_saved_variables();
    BackwardCalls calls;
    auto [grad_self, grad_target] =
        backward_op.call(grads[0], saved[0], saved[1], optional_of(saved[2]),
                         optional_of(saved[3]), ctx->saved_data["reduction"].toInt(), mask);
    result[0] = if_needed(mask[0], grad_self);
    result[1] = if_needed(mask[1], grad_target);
    return result;
  }
};

// The margin losses: their targets enter through comparisons only and get no gradient, nor
// does multi_margin_loss's weight (the kernel below refuses one that requires grad, as torch).
struct HingeEmbeddingLossFn : torch::autograd::Function<HingeEmbeddingLossFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<Tensor(const Tensor&, const Tensor&, double, int64_t)>(
        "fastops::hinge_embedding_loss");
    return handle;
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const Tensor& target,
                        double margin, int64_t reduction) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({self, target});
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["reduction"] = reduction;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op().call(self, target, margin, reduction);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op =
        typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&, double, int64_t)>(
            "fastops::hinge_embedding_loss_backward");
    tensor_list result(4);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return result;
    const auto saved = ctx->get_saved_variables();
    BackwardCalls calls;
    result[0] = backward_op.call(grads[0], saved[0], saved[1],
                                 ctx->saved_data["margin"].toDouble(),
                                 ctx->saved_data["reduction"].toInt());
    return result;
  }
};

struct MultiMarginLossFn : torch::autograd::Function<MultiMarginLossFn> {
  // the op this node differentiates, called below autograd
  static const auto& op() {
    static const auto handle = typed_op<Tensor(const Tensor&, const Tensor&, int64_t, double,
                                               const c10::optional<Tensor>&, int64_t)>(
        "fastops::multi_margin_loss");
    return handle;
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& self, const Tensor& target, int64_t p,
                        double margin, const c10::optional<Tensor>& weight, int64_t reduction) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({self, target, value_or_undefined(weight)});
    ctx->saved_data["p"] = p;
    ctx->saved_data["margin"] = margin;
    ctx->saved_data["reduction"] = reduction;
    at::AutoDispatchBelowADInplaceOrView guard;
    return op().call(self, target, p, margin, weight, reduction);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static const auto backward_op =
        typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double,
                        const c10::optional<Tensor>&, int64_t)>(
            "fastops::multi_margin_loss_backward");
    tensor_list result(6);
    if (!grads[0].defined() || !ctx->needs_input_grad(0)) return result;
    const auto saved = ctx->get_saved_variables();
    BackwardCalls calls;
    result[0] = backward_op.call(grads[0], saved[0], saved[1], ctx->saved_data["p"].toInt(),
                                 ctx->saved_data["margin"].toDouble(), optional_of(saved[2]),
                                 ctx->saved_data["reduction"].toInt());
    return result;
  }
};

std::tuple<Tensor, Tensor> tuple2(const tensor_list& t) { return {t[0], t[1]}; }
std::tuple<Tensor, Tensor, Tensor> tuple3(const tensor_list& t) { return {t[0], t[1], t[2]}; }

}  // namespace

TORCH_LIBRARY_IMPL(fastops, Autograd, m) {
  // Ops with no derivative formula (the second derivatives, the forms that also return a mask or
  // indices, called below autograd by the nodes here): differentiating through them raises
  // "derivative ... not implemented" instead of the silent zeros of the default fallback.
#define FO_NO_DERIVATIVE(name, ...)                                                   \
  m.impl(#name "_double_backward", torch::autograd::autogradNotImplementedFallback());
  FASTOPS_POINTWISE_ACTIVATIONS(FO_NO_DERIVATIVE)
#undef FO_NO_DERIVATIVE
#define FO_NO_DERIVATIVE(name, ...) \
  m.impl(#name "_with_mask", torch::autograd::autogradNotImplementedFallback());
  FASTOPS_MASKED_ACTIVATIONS(FO_NO_DERIVATIVE)
#undef FO_NO_DERIVATIVE
#define FO_NO_DERIVATIVE(name, ...) \
  m.impl(#name "_output_double_backward", torch::autograd::autogradNotImplementedFallback());
  FASTOPS_OUTPUT_ACTIVATIONS(FO_NO_DERIVATIVE)
#undef FO_NO_DERIVATIVE
  m.impl("maxout_with_indices", torch::autograd::autogradNotImplementedFallback());
  m.impl("rrelu_seeded_with_mask", torch::autograd::autogradNotImplementedFallback());
  // An integer output: nothing to differentiate, whether self requires grad or carries a
  // tangent (the not-implemented fallback would reject the tangent).
  m.impl("rrelu_seed", [](c10::DispatchKeySet keys, const Tensor& self, int64_t samples) {
    static const auto op = typed_op<Tensor(const Tensor&, int64_t)>("fastops::rrelu_seed");
    return op.redispatch(keys & c10::after_autograd_keyset, self, samples);
  });
#define FO_AUTOGRAD_MASKED(name, ...) \
  m.impl(#name,                       \
         torch::CppFunction::makeFromBoxedFunction<&pointwise_autograd<MaskedPointwiseFn>>());
  FASTOPS_MASKED_ACTIVATIONS(FO_AUTOGRAD_MASKED)
#undef FO_AUTOGRAD_MASKED
#define FO_AUTOGRAD_INPUT(name, ...) \
  m.impl(#name, torch::CppFunction::makeFromBoxedFunction<&pointwise_autograd<PointwiseFn>>());
  FASTOPS_INPUT_ACTIVATIONS(FO_AUTOGRAD_INPUT)
#undef FO_AUTOGRAD_INPUT
#define FO_AUTOGRAD_OUTPUT(name, ...) \
  m.impl(#name,                       \
         torch::CppFunction::makeFromBoxedFunction<&pointwise_autograd<OutputPointwiseFn>>());
  FASTOPS_OUTPUT_ACTIVATIONS(FO_AUTOGRAD_OUTPUT)
#undef FO_AUTOGRAD_OUTPUT
  m.impl("prelu", [](const Tensor& self, const Tensor& weight) {
    if (needs_forward_ad(self, weight))
      return python_autograd(PreluFn::op(), self, weight);
    if (needs_graph(self, weight)) return PreluFn::apply(self, weight);
    at::AutoDispatchBelowADInplaceOrView guard;
    return PreluFn::op().call(self, weight);
  });
  m.impl("maxout", [](const Tensor& self, int64_t pool_size) {
    if (needs_forward_ad(self))
      return python_autograd(MaxoutFn::op(), self, pool_size);
    if (needs_graph(self)) return MaxoutFn::apply(self, pool_size)[0];
    at::AutoDispatchBelowADInplaceOrView guard;
    return MaxoutFn::op().call(self, pool_size);
  });
  m.impl("rrelu_seeded", [](const Tensor& self, const Tensor& seed, double lower, double upper) {
    if (needs_forward_ad(self)) return python_autograd(rrelu_seeded_op(), self, seed, lower, upper);
    if (needs_graph(self)) return RReLUSeededFn::apply(self, seed, lower, upper)[0];
    at::AutoDispatchBelowADInplaceOrView guard;
    return rrelu_seeded_op().call(self, seed, lower, upper);
  });
  m.impl("linear", [](const Tensor& input, const Tensor& weight,
                      const c10::optional<Tensor>& bias) {
    if (needs_forward_ad(input, weight, bias))
      return python_autograd(LinearFn::op(), input, weight, bias);
    if (needs_graph(input, weight, bias)) return LinearFn::apply(input, weight, bias);
    at::AutoDispatchBelowADInplaceOrView guard;
    return LinearFn::op().call(input, weight, bias);
  });
  m.impl("linear_act", [](const Tensor& input, const Tensor& weight,
                          const c10::optional<Tensor>& bias, c10::string_view activation,
                          double a, double b, const c10::optional<Tensor>& act_weight,
                          bool save_preact) {
    if (needs_forward_ad(input, weight, bias, act_weight))
      return python_autograd(LinearActFn::op(), input, weight, bias, activation, a, b,
                             act_weight, save_preact);
    if (needs_graph(input, weight, bias, act_weight))
      return tuple2(
          LinearActFn::apply(input, weight, bias, activation, a, b, act_weight, save_preact));
    at::AutoDispatchBelowADInplaceOrView guard;
    return LinearActFn::op().call(input, weight, bias, activation, a, b, act_weight,
                                  save_preact);
  });
  m.impl("log_softmax", [](const Tensor& self, int64_t dim) {
    if (needs_forward_ad(self))
      return python_autograd(LogSoftmaxFn::op(), self, dim);
    if (needs_graph(self)) return LogSoftmaxFn::apply(self, dim);
    at::AutoDispatchBelowADInplaceOrView guard;
    return LogSoftmaxFn::op().call(self, dim);
  });
  m.impl("softmax", [](const Tensor& self, int64_t dim) {
    if (needs_forward_ad(self)) return python_autograd(SoftmaxFn::op(), self, dim);
    if (needs_graph(self)) return SoftmaxFn::apply(self, dim);
    at::AutoDispatchBelowADInplaceOrView guard;
    return SoftmaxFn::op().call(self, dim);
  });
  m.impl("nll_loss", [](const Tensor& self, const Tensor& target,
                        const c10::optional<Tensor>& weight, int64_t reduction,
                        int64_t ignore_index) {
    if (needs_forward_ad(self, target, weight))
      return python_autograd(NllLossFn::op(), self, target, weight, reduction, ignore_index);
    if (needs_graph(self, target, weight))
      return tuple2(NllLossFn::apply(self, target, weight, reduction, ignore_index));
    at::AutoDispatchBelowADInplaceOrView guard;
    return NllLossFn::op().call(self, target, weight, reduction, ignore_index);
  });
  m.impl("cross_entropy", [](const Tensor& self, const Tensor& target,
                             const c10::optional<Tensor>& weight, int64_t reduction,
                             int64_t ignore_index, double label_smoothing) {
    if (needs_forward_ad(self, target, weight))
      return python_autograd(CrossEntropyFn::op(), self, target, weight, reduction, ignore_index,
                                     label_smoothing);
    if (needs_graph(self, target, weight))
      return tuple3(CrossEntropyFn::apply(self, target, weight, reduction, ignore_index,
                                          label_smoothing));
    at::AutoDispatchBelowADInplaceOrView guard;
    return CrossEntropyFn::op().call(self, target, weight, reduction, ignore_index,
                                     label_smoothing);
  });
  m.impl("mse_loss", &regression_loss_autograd<MseLossFn>);
  m.impl("l1_loss", &regression_loss_autograd<L1LossFn>);
  m.impl("binary_cross_entropy", [](const Tensor& self, const Tensor& target,
                                    const c10::optional<Tensor>& weight, int64_t reduction) {
    using Fn = BinaryCrossEntropyFn;
    if (needs_forward_ad(self, target, weight))
      return python_autograd(Fn::op(), self, target, weight, reduction);
    if (needs_graph(self, target, weight)) {
      check_not_differentiable(weight, "weight", "binary_cross_entropy");
      return Fn::apply(self, target, weight, reduction);
    }
    at::AutoDispatchBelowADInplaceOrView guard;
    return Fn::op().call(self, target, weight, reduction);
  });
  m.impl("hinge_embedding_loss", [](const Tensor& self, const Tensor& target, double margin,
                                    int64_t reduction) {
    if (needs_forward_ad(self))
      return python_autograd(HingeEmbeddingLossFn::op(), self, target, margin, reduction);
    if (needs_graph(self)) return HingeEmbeddingLossFn::apply(self, target, margin, reduction);
    at::AutoDispatchBelowADInplaceOrView guard;
    return HingeEmbeddingLossFn::op().call(self, target, margin, reduction);
  });
  m.impl("multi_margin_loss", [](const Tensor& self, const Tensor& target, int64_t p,
                                 double margin, const c10::optional<Tensor>& weight,
                                 int64_t reduction) {
    TORCH_CHECK(!needs_graph(weight), "fastops.multi_margin_loss: the loss is not "
                "differentiable with respect to weight (as torch's); pass a weight that does "
                "not require grad (e.g. weight.detach())");
    if (needs_forward_ad(self))
      return python_autograd(MultiMarginLossFn::op(), self, target, p, margin, weight,
                             reduction);
    if (needs_graph(self))
      return MultiMarginLossFn::apply(self, target, p, margin, weight, reduction);
    at::AutoDispatchBelowADInplaceOrView guard;
    return MultiMarginLossFn::op().call(self, target, p, margin, weight, reduction);
  });
  m.impl("binary_cross_entropy_with_logits",
         [](const Tensor& self, const Tensor& target, const c10::optional<Tensor>& weight,
            const c10::optional<Tensor>& pos_weight, int64_t reduction) {
           using Fn = BceWithLogitsFn;
           if (needs_forward_ad(self, target, weight, pos_weight))
             return python_autograd(Fn::op(), self, target, weight, pos_weight, reduction);
           if (needs_graph(self, target, weight, pos_weight)) {
             const char* op = "binary_cross_entropy_with_logits";
             check_not_differentiable(weight, "weight", op);
             check_not_differentiable(pos_weight, "pos_weight", op);
             return Fn::apply(self, target, weight, pos_weight, reduction);
           }
           at::AutoDispatchBelowADInplaceOrView guard;
           return Fn::op().call(self, target, weight, pos_weight, reduction);
         });
}

TORCH_LIBRARY_IMPL(fastops, CompositeImplicitAutograd, m) {
  m.impl("rrelu", &rrelu_composite);
}

}  // namespace fastops
