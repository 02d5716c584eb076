"""Autograd formulas and fake kernels of the activations.

Every pointwise activation is one row of POINTWISE: its op name in torch.ops.fastops and its
parameters. The autograd.Function classes are made from the rows; PReLU (a weight with its own
gradient), Maxout (changes the shape) and RReLU (random slopes, from seed rows) are written out
below.

The ops themselves carry the same formulas in C++ (csrc/autograd.cpp), so torch.ops.fastops.*
and the functional forms are differentiable without going through these classes. There the
MASKED activations save a bit mask instead of the input and the OUTPUT ones their output;
these classes save the input.

Second order: every backward op (NAME_backward, NAME_mask_backward, NAME_output_backward,
prelu_backward, maxout_backward, ...) has its autograd.Function here too, and each class has
jvp and vmap rules; fastops.ops._dispatch says where the dispatcher uses them.
"""

import torch

from fastops.ops import _dispatch

__all__ = [
    "POINTWISE", "MASKED", "OUTPUT", "ReLUFunction", "ELUFunction", "GELUFunction",
    "GELUTanhFunction", "HardtanhFunction", "LeakyReLUFunction", "SigmoidFunction", "TanhFunction",
    "HardshrinkFunction", "PReLUFunction", "MaxoutFunction", "RReLUFunction",
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

    torch.library.register_fake(f"fastops::{op_name}_double_backward")(
        lambda grad_grad, grad_output, self, *args: _contiguous_like(self))

    def forward(input, *args):
        return forward_op(input, *args)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.args = inputs[1:]

    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0] and grad_output is not None:
            grad_input = backward_op(grad_output, input, *ctx.args)
        return (grad_input,) + (None,) * len(ctx.args)

    def jvp(ctx, tangent, *_):
        (input,) = ctx.saved_tensors
        return backward_op(tangent, input, *ctx.args)

    def vmap(info, in_dims, input, *args):
        return cls.apply(input, *args), in_dims[0]

    doc = (f"fastops.{op_name} with its own backward. apply(input"
           + "".join(f", {p}" for p in params) + ")")
    cls = type(class_name, (torch.autograd.Function,), {
        "__doc__": doc,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
        "vmap": staticmethod(vmap),
    })
    _dispatch.transforms_use(op_name, cls.apply)
    double_op = getattr(torch.ops.fastops, op_name + "_double_backward")
    _dispatch.differentiable(op_name + "_backward", _make_pointwise_backward(
        op_name + "_backward", backward_op, double_op, linear_pieces=op_name in MASKED))
    if op_name in OUTPUT:
        backward_from_output = getattr(torch.ops.fastops, op_name + "_output_backward")
        torch.library.register_fake(f"fastops::{op_name}_output_double_backward")(
            lambda grad_grad, grad_output, output, *args: _contiguous_like(output))
        _dispatch.differentiable(op_name + "_output_backward", _make_pointwise_backward(
            op_name + "_output_backward", backward_from_output,
            getattr(torch.ops.fastops, op_name + "_output_double_backward")))
    if op_name in MASKED:
        _dispatch.differentiable(op_name + "_mask_backward", _make_mask_backward(
            getattr(torch.ops.fastops, op_name + "_mask_backward")))
    return cls


def _make_pointwise_backward(name, backward_op, double_op, linear_pieces=False):
    """The autograd of backward_op(grad_output, saved, *params) = grad_output * f'(...), saved the
    forward's input (or output): by grad_output it is backward_op itself, by saved it is
    double_op(grad_grad, grad_output, saved, *params). double_op is the last order there is.
    A piecewise-linear f (linear_pieces) has f'' = 0: its derivative by saved is zeros, as in
    torch, and grad_output need not be kept for it."""

    class PointwiseBackward(torch.autograd.Function):
        @staticmethod
        def forward(grad_output, saved, *args):
            return backward_op(grad_output, saved, *args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            kept = inputs[1:2] if linear_pieces else inputs[:2]
            ctx.save_for_backward(*kept)
            ctx.save_for_forward(*kept)
            ctx.args = inputs[2:]

        @staticmethod
        def backward(ctx, grad_grad):
            *grad_output, saved = ctx.saved_tensors
            need = ctx.needs_input_grad
            d_grad = backward_op(grad_grad, saved, *ctx.args) if need[0] else None
            d_saved = None
            if need[1]:
                d_saved = (torch.zeros_like(saved) if linear_pieces else
                           _Leaf.apply(double_op, grad_grad, grad_output[0], saved, *ctx.args))
            return (d_grad, d_saved) + (None,) * len(ctx.args)

        @staticmethod
        def jvp(ctx, t_grad, t_saved, *_):
            *grad_output, saved = ctx.saved_tensors
            out = backward_op(t_grad, saved, *ctx.args) if t_grad is not None else None
            if t_saved is not None and not linear_pieces:
                d = _Leaf.apply(double_op, t_saved, grad_output[0], saved, *ctx.args)
                out = d if out is None else out + d
            return torch.zeros_like(saved) if out is None else out

        @staticmethod
        def vmap(info, in_dims, *args):
            return _dispatch.vmap_elementwise(PointwiseBackward.apply, info, in_dims, *args)

    PointwiseBackward.__name__ = PointwiseBackward.__qualname__ = name
    return PointwiseBackward.apply


class _Leaf(torch.autograd.Function):
    """A second-derivative op (NAME_double_backward): usable in any transform, but it has no
    derivative of its own, and asking for one raises."""

    @staticmethod
    def forward(op, *args):
        return op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_name = inputs[0]._qualified_op_name.split("::")[-1]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads):
        raise _dispatch.third_order_error(ctx.op_name)

    @staticmethod
    def jvp(ctx, *tangents):
        raise _dispatch.third_order_error(ctx.op_name)

    @staticmethod
    def vmap(info, in_dims, op, *args):
        return _dispatch.vmap_elementwise(lambda *a: _Leaf.apply(op, *a), info, in_dims[1:], *args)


def _make_mask_backward(mask_backward_op):
    """The autograd of NAME_mask_backward(grad_output, mask, *params): linear in grad_output."""

    class MaskBackward(torch.autograd.Function):
        @staticmethod
        def forward(grad_output, mask, *args):
            return mask_backward_op(grad_output, mask, *args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[1])
            ctx.save_for_forward(inputs[1])
            ctx.args = inputs[2:]

        @staticmethod
        def backward(ctx, grad_grad):
            (mask,) = ctx.saved_tensors
            return (mask_backward_op(grad_grad, mask, *ctx.args), None) + (None,) * len(ctx.args)

        @staticmethod
        def jvp(ctx, t_grad, *_):
            (mask,) = ctx.saved_tensors
            return mask_backward_op(t_grad, mask, *ctx.args)

        @staticmethod
        def vmap(info, in_dims, *args):
            return _dispatch.vmap_loop(MaskBackward.apply, info, in_dims, *args)

    return MaskBackward.apply


for _op, (_cls, _params) in POINTWISE.items():
    globals()[_cls] = _make_pointwise(_op, _cls, _params)


@torch.library.register_fake("fastops::prelu")
def _prelu_fake(self, weight):
    return _contiguous_like(self)


@torch.library.register_fake("fastops::prelu_backward")
def _prelu_backward_fake(grad_output, self, weight):
    return _contiguous_like(self), _contiguous_like(weight)


def _slopes_like(weight, input):
    """prelu's weight broadcast against input: per channel (dim 1), or one shared slope."""
    if weight.numel() == 1 or input.dim() < 2:
        return weight.reshape([1] * input.dim())
    shape = [1] * input.dim()
    shape[1] = -1
    return weight.view(shape)


def _sum_to_slopes(t, weight):
    """The per-slope sum of t (input-shaped): over every dim but the channel dim."""
    if weight.numel() == 1 or t.dim() < 2:
        return t.sum().reshape(weight.shape)
    return t.sum([d for d in range(t.dim()) if d != 1]).reshape(weight.shape)


def _where_negative(input, t):
    """t where input <= 0, else 0: the part of prelu that the slopes act on."""
    return torch.where(input > 0, torch.zeros((), dtype=t.dtype, device=t.device), t)


class PReLUFunction(torch.autograd.Function):
    """fastops.prelu with its own backward. apply(input, weight); weight has 1 or C elements,
    C = input.size(1)."""

    @staticmethod
    def forward(input, weight):
        return torch.ops.fastops.prelu(input, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not any(ctx.needs_input_grad):
            return None, None
        input, weight = ctx.saved_tensors
        grad_input, grad_weight = torch.ops.fastops.prelu_backward(grad_output, input, weight)
        return (grad_input if ctx.needs_input_grad[0] else None,
                grad_weight if ctx.needs_input_grad[1] else None)

    @staticmethod
    def jvp(ctx, t_input, t_weight):
        input, weight = ctx.saved_tensors
        out = None
        if t_input is not None:
            out = torch.ops.fastops.prelu_backward(t_input, input, weight)[0]
        if t_weight is not None:
            d = _where_negative(input, _slopes_like(t_weight, input) * input)
            out = d if out is None else out + d
        return out

    @staticmethod
    def vmap(info, in_dims, input, weight):
        x = _dispatch.batch_first(input, in_dims[0], info.batch_size)
        if in_dims[1] is None and input.dim() - (in_dims[0] is not None) >= 2:
            # the batch folds into dim 0; the channels stay at dim 1
            return PReLUFunction.apply(x.flatten(0, 1), weight).unflatten(0, x.shape[:2]), 0
        if in_dims[1] is None:
            return PReLUFunction.apply(x, weight), 0
        # a slope tensor per sample (ensembles): torch ops on the batch
        w = _dispatch.batch_first(weight, in_dims[1], info.batch_size)
        slopes = torch.stack([_slopes_like(w[i], x[i]) for i in range(info.batch_size)])
        return torch.where(x > 0, x, slopes * x), 0


class _PReLUBackward(torch.autograd.Function):
    """The autograd of prelu_backward(grad_output, input, weight) -> (grad_input, grad_weight)."""

    @staticmethod
    def forward(grad_output, input, weight):
        return torch.ops.fastops.prelu_backward(grad_output, input, weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gg_input, gg_weight):
        g, input, weight = ctx.saved_tensors
        d_g = d_input = d_weight = None
        if gg_input is not None:
            d_g = torch.ops.fastops.prelu_backward(gg_input, input, weight)[0]
            d_weight = _sum_to_slopes(_where_negative(input, gg_input * g), weight)
        if gg_weight is not None:
            slopes = _slopes_like(gg_weight, input)
            d = _where_negative(input, slopes * input)
            d_g = d if d_g is None else d_g + d
            d_input = _where_negative(input, slopes * g)
        return d_g, d_input, d_weight

    @staticmethod
    def jvp(ctx, t_g, t_input, t_weight):
        g, input, weight = ctx.saved_tensors
        gi = gw = None
        if t_g is not None:
            gi, gw = torch.ops.fastops.prelu_backward(t_g, input, weight)
        if t_weight is not None:
            d = _where_negative(input, _slopes_like(t_weight, input) * g)
            gi = d if gi is None else gi + d
        if t_input is not None:
            d = _sum_to_slopes(_where_negative(input, t_input * g), weight)
            gw = d if gw is None else gw + d
        return gi, gw

    @staticmethod
    def vmap(info, in_dims, g, input, weight):
        # torch ops on the batch: the slope gradient is a sum per sample
        b = info.batch_size
        g, x = (_dispatch.batch_first(t, d, b) for t, d in zip((g, input), in_dims))
        w = _dispatch.batch_first(weight, in_dims[2], b)
        slopes = torch.stack([_slopes_like(w[i], x[i]) for i in range(b)])
        grad_input = torch.where(x > 0, g, slopes * g)
        neg = _where_negative(x, x * g)
        if w[0].numel() == 1 or x.dim() < 3:
            grad_weight = neg.flatten(1).sum(1).reshape(w.shape)
        else:
            grad_weight = neg.sum([d for d in range(x.dim()) if d not in (0, 2)]).reshape(w.shape)
        return (grad_input, grad_weight), (0, 0)


_dispatch.transforms_use("prelu", PReLUFunction.apply)
_dispatch.differentiable("prelu_backward", _PReLUBackward.apply)


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


def _maxout_gather(t, input, pool_size, indices=None):
    """t (input-shaped) at each group's argmax of input: the output-shaped slice the maxout
    gradient flows through."""
    if indices is None:
        if pool_size <= 256:
            indices = torch.ops.fastops.maxout_with_indices(input, pool_size)[1]
        else:
            indices = input.unflatten(1, (-1, pool_size)).argmax(2)
    return t.unflatten(1, (-1, pool_size)).gather(2, indices.long().unsqueeze(2)).squeeze(2)


def _vmap_fold(fn, info, in_dims, *args):
    """vmap rule of a maxout op: the batch folds into dim 0 (the op works over dim 1)."""
    moved = [_dispatch.batch_first(a, d, info.batch_size) if isinstance(a, torch.Tensor) else a
             for a, d in zip(args, in_dims)]
    out = fn(*[m.flatten(0, 1) if isinstance(m, torch.Tensor) else m for m in moved])
    return out.unflatten(0, (info.batch_size, -1)), 0


class MaxoutFunction(torch.autograd.Function):
    """fastops.maxout with its own backward. apply(input, pool_size): output channel j is the
    max of input channels j*k .. j*k+k-1 (dim 1); the gradient goes to the max."""

    @staticmethod
    def forward(input, pool_size):
        return torch.ops.fastops.maxout(input, pool_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])
        ctx.pool_size = inputs[1]

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not ctx.needs_input_grad[0]:
            return None, None
        (input,) = ctx.saved_tensors
        return torch.ops.fastops.maxout_backward(grad_output, input, ctx.pool_size), None

    @staticmethod
    def jvp(ctx, t_input, _):
        (input,) = ctx.saved_tensors
        return _maxout_gather(t_input, input, ctx.pool_size)

    @staticmethod
    def vmap(info, in_dims, input, pool_size):
        return _vmap_fold(MaxoutFunction.apply, info, in_dims, input, pool_size)


class _MaxoutBackward(torch.autograd.Function):
    """The autograd of maxout_backward(grad_output, input, pool_size) and of
    maxout_indices_backward(grad_output, indices, pool_size): linear in grad_output; the
    argmax does not move with the input (zero derivative)."""

    @staticmethod
    def forward(grad_output, saved, pool_size, indexed):
        ops = torch.ops.fastops
        op = ops.maxout_indices_backward if indexed else ops.maxout_backward
        return op(grad_output, saved, pool_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])
        ctx.pool_size, ctx.indexed = inputs[2], inputs[3]

    @staticmethod
    def _gather(ctx, t):
        (saved,) = ctx.saved_tensors
        if ctx.indexed:
            return _maxout_gather(t, None, ctx.pool_size, indices=saved)
        return _maxout_gather(t, saved, ctx.pool_size)

    @staticmethod
    def backward(ctx, grad_grad):
        return _MaxoutBackward._gather(ctx, grad_grad), None, None, None

    @staticmethod
    def jvp(ctx, t_grad, *_):
        (saved,) = ctx.saved_tensors
        return _MaxoutBackward.apply(t_grad, saved, ctx.pool_size, ctx.indexed)

    @staticmethod
    def vmap(info, in_dims, grad_output, saved, pool_size, indexed):
        return _vmap_fold(_MaxoutBackward.apply, info, in_dims, grad_output, saved, pool_size,
                          indexed)


_dispatch.transforms_use("maxout", MaxoutFunction.apply)
_dispatch.differentiable("maxout_backward",
                         lambda g, x, k: _MaxoutBackward.apply(g, x, k, False))
_dispatch.differentiable("maxout_indices_backward",
                         lambda g, i, k: _MaxoutBackward.apply(g, i, k, True))


# ---- RReLU ----------------------------------------------------------------------------------
# torch.ops.fastops.rrelu(input, lower, upper, training) is a composite (csrc/autograd.cpp):
# leaky_relu with slope (lower + upper) / 2 in evaluation; in training, rrelu_seed draws seed
# rows from the default generator of the input's device and rrelu_seeded applies the slopes
# they give (csrc/rrelu.h), a pure function of the input and the seed rows. Its C++ autograd
# saves the seed rows and a bit mask; RReLUFunction below saves the input and the seed rows.

_VMAP_RANDOMNESS_ERROR = (
    "vmap: called random operation while in randomness error mode. Please either use the "
    "'same' or 'different' randomness flags on vmap or perform the randomness operation out of "
    "vmap")


@torch.library.register_fake("fastops::rrelu_seed")
def _rrelu_seed_fake(self, samples=0):
    return self.new_empty((2,) if samples == 0 else (samples, 2), dtype=torch.int64)


@torch.library.register_fake("fastops::rrelu_seeded")
def _rrelu_seeded_fake(self, seed, lower, upper):
    return _contiguous_like(self)


@torch.library.register_fake("fastops::rrelu_seeded_backward")
def _rrelu_seeded_backward_fake(grad_output, self, seed, lower, upper):
    return _contiguous_like(self)


@torch.library.register_fake("fastops::rrelu_seeded_with_mask")
def _rrelu_seeded_with_mask_fake(self, seed, lower, upper):
    return _contiguous_like(self), _mask_like(self)


@torch.library.register_fake("fastops::rrelu_seeded_mask_backward")
def _rrelu_seeded_mask_backward_fake(grad_output, mask, seed, lower, upper):
    return _contiguous_like(grad_output)


@torch.library.register_vmap("fastops::rrelu_seed")
def _rrelu_seed_vmap(info, in_dims, self, samples=0):
    """vmap's randomness flag, as for torch's random ops: 'same' draws one seed for every sample,
    'different' one per sample (from one draw), 'error' raises."""
    if info.randomness == "error":
        raise RuntimeError(_VMAP_RANDOMNESS_ERROR)
    if info.randomness == "same":
        return torch.ops.fastops.rrelu_seed(self, samples), None
    rows = torch.ops.fastops.rrelu_seed(self, info.batch_size * max(samples, 1))
    return (rows if samples == 0 else rows.view(info.batch_size, samples, 2)), 0


def _vmap_seeded(fn, info, in_dims, tensors, seed, *bounds):
    """vmap rule of the rrelu_seeded ops: input-shaped tensors and the seed batch first. A seed of
    one row per sample (logical shape (2,)) gives each sample its row; a row per slice of each
    sample (logical (S, 2)) folds into the batch with the slices. Either way a sample whose seed
    is not batched draws the very slopes it would draw alone."""
    b = info.batch_size
    moved = [_dispatch.batch_first(t, d, b) for t, d in zip(tensors, in_dims)]
    rows = _dispatch.batch_first(seed, in_dims[len(tensors)], b)
    if rows.dim() == 2:
        return fn(*moved, rows, *bounds), 0
    out = fn(*[t.flatten(0, 1) for t in moved], rows.flatten(0, 1), *bounds)
    return out.unflatten(0, (b, -1)), 0


class RReLUFunction(torch.autograd.Function):
    """fastops.rrelu_seeded with its own backward: RReLU in training mode with the slopes that the
    seed rows give. apply(input, seed, lower, upper); seed = torch.ops.fastops.rrelu_seed(input)
    (the same seed gives the same slopes). F.rrelu draws the seed itself."""

    @staticmethod
    def forward(input, seed, lower, upper):
        return torch.ops.fastops.rrelu_seeded(input, seed, lower, upper)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.save_for_forward(*inputs[:2])
        ctx.bounds = inputs[2:]

    @staticmethod
    def backward(ctx, grad_output):
        input, seed = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0] and grad_output is not None:
            grad_input = torch.ops.fastops.rrelu_seeded_backward(grad_output, input, seed,
                                                                 *ctx.bounds)
        return grad_input, None, None, None

    @staticmethod
    def jvp(ctx, t_input, *_):
        input, seed = ctx.saved_tensors
        return torch.ops.fastops.rrelu_seeded_backward(t_input, input, seed, *ctx.bounds)

    @staticmethod
    def vmap(info, in_dims, input, seed, lower, upper):
        return _vmap_seeded(RReLUFunction.apply, info, in_dims, (input,), seed, lower, upper)


class _RReLUSeededBackward(torch.autograd.Function):
    """The autograd of rrelu_seeded_backward(grad_output, input, seed, lower, upper) =
    grad_output * slope: linear in grad_output, piecewise constant in input (zeros)."""

    @staticmethod
    def forward(grad_output, input, seed, lower, upper):
        return torch.ops.fastops.rrelu_seeded_backward(grad_output, input, seed, lower, upper)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:3])
        ctx.save_for_forward(*inputs[1:3])
        ctx.bounds = inputs[3:]

    @staticmethod
    def backward(ctx, grad_grad):
        input, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_grad = (torch.ops.fastops.rrelu_seeded_backward(grad_grad, input, seed, *ctx.bounds)
                  if need[0] else None)
        return d_grad, torch.zeros_like(input) if need[1] else None, None, None, None

    @staticmethod
    def jvp(ctx, t_grad, *_):
        input, seed = ctx.saved_tensors
        if t_grad is None:
            return torch.zeros_like(input)
        return torch.ops.fastops.rrelu_seeded_backward(t_grad, input, seed, *ctx.bounds)

    @staticmethod
    def vmap(info, in_dims, grad_output, input, seed, lower, upper):
        return _vmap_seeded(_RReLUSeededBackward.apply, info, in_dims, (grad_output, input), seed,
                            lower, upper)


class _RReLUSeededMaskBackward(torch.autograd.Function):
    """The autograd of rrelu_seeded_mask_backward(grad_output, mask, seed, lower, upper): linear
    in grad_output."""

    @staticmethod
    def forward(grad_output, mask, seed, lower, upper):
        return torch.ops.fastops.rrelu_seeded_mask_backward(grad_output, mask, seed, lower, upper)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:3])
        ctx.save_for_forward(*inputs[1:3])
        ctx.bounds = inputs[3:]

    @staticmethod
    def backward(ctx, grad_grad):
        mask, seed = ctx.saved_tensors
        return (torch.ops.fastops.rrelu_seeded_mask_backward(grad_grad, mask, seed, *ctx.bounds),
                None, None, None, None)

    @staticmethod
    def jvp(ctx, t_grad, *_):
        mask, seed = ctx.saved_tensors
        return torch.ops.fastops.rrelu_seeded_mask_backward(t_grad, mask, seed, *ctx.bounds)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _dispatch.vmap_loop(_RReLUSeededMaskBackward.apply, info, in_dims, *args)


def _rrelu_composite(input, lower, upper, training):
    """rrelu under torch.func transforms: the composite of csrc/autograd.cpp, so that each op it
    calls meets its own rule there (the seed draw, vmap's randomness flag)."""
    if not lower <= upper:
        raise RuntimeError(f"fastops.rrelu: Lower bound should be less than or equal to the upper "
                           f"bound, got lower={lower} and upper={upper}")
    if not training:
        return torch.ops.fastops.leaky_relu(input, (lower + upper) / 2)
    seed = torch.ops.fastops.rrelu_seed(input)
    return torch.ops.fastops.rrelu_seeded(input, seed, lower, upper)


_dispatch.transforms_use("rrelu", _rrelu_composite)
_dispatch.transforms_use("rrelu_seeded", RReLUFunction.apply)
_dispatch.differentiable("rrelu_seeded_backward", _RReLUSeededBackward.apply)
_dispatch.differentiable("rrelu_seeded_mask_backward", _RReLUSeededMaskBackward.apply)
