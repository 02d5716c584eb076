"""Autograd formulas and fake kernels of the activations.

Every pointwise activation is one row of POINTWISE: its op name in torch.ops.fastops and its
parameters. The autograd.Function classes are made from the rows; PReLU (a weight with its own
gradient) and Maxout (changes the shape) are written out below.

The ops themselves carry the same formulas in C++ (csrc/autograd.cpp), so torch.ops.fastops.*
and the functional forms are differentiable without going through these classes. There the
MASKED activations save a bit mask instead of the input and the OUTPUT ones their output;
these classes save the input.
"""

import torch

__all__ = [
    "POINTWISE", "MASKED", "OUTPUT", "ReLUFunction", "ELUFunction", "GELUFunction",
    "GELUTanhFunction", "HardtanhFunction", "LeakyReLUFunction", "SigmoidFunction", "TanhFunction",
    "HardshrinkFunction", "PReLUFunction", "MaxoutFunction",
]

# op name -> (autograd.Function class name, parameter names in schema order)
# The piecewise-linear ones (MASKED) also have NAME_with_mask -> (output, mask) and
# NAME_mask_backward(grad_output, mask, params): mask is a uint8 tensor with one bit per element
# (element i at bit i % 8 of byte i // 8), which the ops' autograd saves in place of the input.
POINTWISE = {
    "relu": ("ReLUFunction", ()),
    "elu": ("ELUFunction", ("alpha",)),
    "gelu": ("GELUFunction", ()),
    "gelu_tanh": ("GELUTanhFunction", ()),
    "hardtanh": ("HardtanhFunction", ("min_val", "max_val")),
    "leaky_relu": ("LeakyReLUFunction", ("negative_slope",)),
    "sigmoid": ("SigmoidFunction", ()),
    "tanh": ("TanhFunction", ()),
    "hardshrink": ("HardshrinkFunction", ("lambd",)),
}
# Sigmoid and Tanh (OUTPUT) also have NAME_output_backward(grad_output, output, params), the
# gradient from the forward's output, which the ops' autograd saves in place of the input.
# Both lists are derived from the registered ops, so they live only in csrc/activations.h.
MASKED = tuple(op for op in POINTWISE if hasattr(torch.ops.fastops, op + "_with_mask"))
OUTPUT = tuple(op for op in POINTWISE if hasattr(torch.ops.fastops, op + "_output_backward"))


def _contiguous_like(t):
    """The kernels return contiguous tensors whatever the input's strides."""
    return t.new_empty(t.shape)


def _mask_like(t):
    """The bit mask of the masked activations: a byte per 8 elements of t."""
    return t.new_empty(((t.numel() + 7) // 8,), dtype=torch.uint8)


def _make_pointwise(op_name, class_name, params):
    forward_op = getattr(torch.ops.fastops, op_name)
    backward_op = getattr(torch.ops.fastops, op_name + "_backward")

    torch.library.register_fake(f"fastops::{op_name}")(
        lambda self, *args: _contiguous_like(self))
    torch.library.register_fake(f"fastops::{op_name}_backward")(
        lambda grad_output, self, *args: _contiguous_like(self))

    if op_name in MASKED:
        torch.library.register_fake(f"fastops::{op_name}_with_mask")(
            lambda self, *args: (_contiguous_like(self), _mask_like(self)))
        torch.library.register_fake(f"fastops::{op_name}_mask_backward")(
            lambda grad_output, mask, *args: _contiguous_like(grad_output))
    if op_name in OUTPUT:
        torch.library.register_fake(f"fastops::{op_name}_output_backward")(
            lambda grad_output, output, *args: _contiguous_like(output))

    def forward(input, *args):
        return forward_op(input, *args)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.args = inputs[1:]

    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0] and grad_output is not None:
            grad_input = backward_op(grad_output, input, *ctx.args)
        return (grad_input,) + (None,) * len(ctx.args)

    doc = (f"fastops.{op_name} with its own backward. apply(input"
           + "".join(f", {p}" for p in params) + ")")
    cls = type(class_name, (torch.autograd.Function,), {
        "__doc__": doc,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
    })
    return cls



for _op, (_cls, _params) in POINTWISE.items():
    globals()[_cls] = _make_pointwise(_op, _cls, _params)


@torch.library.register_fake("fastops::prelu")
def _prelu_fake(self, weight):
    return _contiguous_like(self)


@torch.library.register_fake("fastops::prelu_backward")
def _prelu_backward_fake(grad_output, self, weight):
    return _contiguous_like(self), _contiguous_like(weight)


class PReLUFunction(torch.autograd.Function):
    """fastops.prelu with its own backward. apply(input, weight); weight has 1 or C elements,
    C = input.size(1)."""

    @staticmethod
    def forward(input, weight):
        return torch.ops.fastops.prelu(input, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not any(ctx.needs_input_grad):
            return None, None
        input, weight = ctx.saved_tensors
        grad_input, grad_weight = torch.ops.fastops.prelu_backward(grad_output, input, weight)
        return (grad_input if ctx.needs_input_grad[0] else None,
                grad_weight if ctx.needs_input_grad[1] else None)


def _maxout_shape(self, pool_size):
    shape = list(self.shape)
    torch._check(self.dim() >= 2, lambda: "fastops.maxout: expected at least 2 dims (N, C, ...)")
    torch._check(pool_size >= 1, lambda: f"fastops.maxout: pool_size must be positive, got {pool_size}")
    torch._check(shape[1] % pool_size == 0, lambda: (
        f"fastops.maxout: the number of channels (dim 1) must be divisible by pool_size, "
        f"got {shape[1]} channels and pool_size {pool_size}"))
    shape[1] = shape[1] // pool_size
    return shape


@torch.library.register_fake("fastops::maxout")
def _maxout_fake(self, pool_size):
    return self.new_empty(_maxout_shape(self, pool_size))


@torch.library.register_fake("fastops::maxout_backward")
def _maxout_backward_fake(grad_output, self, pool_size):
    return _contiguous_like(self)


@torch.library.register_fake("fastops::maxout_with_indices")
def _maxout_with_indices_fake(self, pool_size):
    shape = _maxout_shape(self, pool_size)
    torch._check(pool_size <= 256, lambda: (
        f"fastops.maxout_with_indices: pool_size must be in [1, 256], got {pool_size}"))
    return self.new_empty(shape), self.new_empty(shape, dtype=torch.uint8)


@torch.library.register_fake("fastops::maxout_indices_backward")
def _maxout_indices_backward_fake(grad_output, indices, pool_size):
    torch._check(grad_output.dim() >= 2, lambda: (
        "fastops.maxout_indices_backward: expected grad_output of at least 2 dims"))
    shape = list(grad_output.shape)
    shape[1] = shape[1] * pool_size
    return grad_output.new_empty(shape)


class MaxoutFunction(torch.autograd.Function):
    """fastops.maxout with its own backward. apply(input, pool_size): output channel j is the
    max of input channels j*k .. j*k+k-1 (dim 1); the gradient goes to the max."""

    @staticmethod
    def forward(input, pool_size):
        return torch.ops.fastops.maxout(input, pool_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.pool_size = inputs[1]

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not ctx.needs_input_grad[0]:
            return None, None
        (input,) = ctx.saved_tensors
        return torch.ops.fastops.maxout_backward(grad_output, input, ctx.pool_size), None
