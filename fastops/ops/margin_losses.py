"""Autograd formulas, fake kernels and functional forms of the margin losses:
hinge_embedding_loss (the binary hinge) and multi_margin_loss (the multi-class one-vs-rest hinge).

The functional forms take exactly the arguments of their torch.nn.functional twins. The targets
get no gradient (they enter through comparisons only), nor does multi_margin_loss's weight in
reverse mode: a weight that requires grad is refused, as torch refuses it (forward mode carries
a weight's tangent).
"""

import torch

from fastops.ops import _dispatch
from fastops.ops.losses import _reduction_enum

_ops = torch.ops.fastops

__all__ = [
    "HingeEmbeddingLossFunction", "MultiMarginLossFunction",
    "hinge_embedding_loss", "multi_margin_loss",
]


def _reduce(loss, reduction):
    """Per-sample reduction of a batch-first loss (B, ...) -> (B,) for 'sum' and 'mean'."""
    if reduction == 0 or loss.dim() == 1:
        return loss
    flat = loss.flatten(1)
    return flat.sum(1) if reduction == 2 else flat.mean(1)


def _margin_rows(shape):
    """(rows, classes) of a multi_margin_loss input's shape: (N, C), (C,) as one row, () as
    one row of one class."""
    if len(shape) == 2:
        return shape[0], shape[1]
    return 1, shape[0] if len(shape) == 1 else 1


def _margin_loss_shape(input, target):
    """The unreduced multi_margin_loss's shape, torch's: (N,) for a 1-D target, () for 0-d."""
    return (_margin_rows(input.shape)[0],) if target.dim() > 0 else ()


def _weight_has_no_grad(needs_grad):
    if needs_grad:
        raise RuntimeError("fastops.multi_margin_loss: the loss is not differentiable with "
                           "respect to weight (as torch's); pass a weight that does not "
                           "require grad (e.g. weight.detach())")


# ---- fake kernels ------------------------------------------------------------------------------

@torch.library.register_fake("fastops::hinge_embedding_loss")
def _hinge_embedding_loss_fake(self, target, margin, reduction):
    return self.new_empty(self.shape if reduction == 0 else ())


@torch.library.register_fake("fastops::hinge_embedding_loss_backward")
def _hinge_embedding_loss_backward_fake(grad_output, self, target, margin, reduction):
    return self.new_empty(self.shape)


@torch.library.register_fake("fastops::multi_margin_loss")
def _multi_margin_loss_fake(self, target, p, margin, weight, reduction):
    return self.new_empty(_margin_loss_shape(self, target) if reduction == 0 else ())


@torch.library.register_fake("fastops::multi_margin_loss_backward")
def _multi_margin_loss_backward_fake(grad_output, self, target, p, margin, weight, reduction):
    return self.new_empty(self.shape)


# ---- autograd.Function classes ---------------------------------------------------------------
# The public twins of the formulas the ops carry in C++ (csrc/autograd.cpp); the functional
# forms below call the ops directly.

class HingeEmbeddingLossFunction(torch.autograd.Function):
    """fastops.hinge_embedding_loss with its own backward. apply(input, target, margin,
    reduction); input and target have one shape, target in input's dtype or int64. Only the
    input gets a gradient."""

    @staticmethod
    def forward(input, target, margin, reduction):
        return torch.ops.fastops.hinge_embedding_loss(input, target, margin, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, margin, reduction = inputs
        ctx.margin, ctx.reduction = margin, reduction
        ctx.save_for_backward(input, target)
        ctx.save_for_forward(input, target)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        input, target = ctx.saved_tensors
        grad_input = torch.ops.fastops.hinge_embedding_loss_backward(
            grad_output, input, target, ctx.margin, ctx.reduction)
        return grad_input, None, None, None

    @staticmethod
    def jvp(ctx, t_input, *_):
        input, target = ctx.saved_tensors
        if t_input is None:  # a tangent of the target only: it does not move the loss
            return input.new_zeros(input.shape if ctx.reduction == 0 else ())
        slope = torch.ops.fastops.hinge_embedding_loss_backward(
            torch.ones_like(input), input, target, ctx.margin, 0)
        d = slope * t_input
        return d if ctx.reduction == 0 else (d.sum() if ctx.reduction == 2 else d.mean())

    @staticmethod
    def vmap(info, in_dims, input, target, margin, reduction):
        x, t = (_dispatch.batch_first(a, d, info.batch_size)
                for a, d in zip((input, target), in_dims))
        loss = HingeEmbeddingLossFunction.apply(x, t, margin, 0)
        return _reduce(loss, reduction), 0


def _hinge_embedding_loss_backward(grad_output, input, target, margin, reduction):
    """hinge_embedding_loss_backward as torch ops, differentiable (in grad_output; the slope
    is piecewise constant in the input): g where target != -1, minus g where target != 1 and
    margin - input > 0."""
    active = (target != 1) & (margin - input > 0)
    g = grad_output / input.numel() if reduction == 1 else grad_output
    zero = torch.zeros((), dtype=input.dtype, device=input.device)
    return torch.where(target != -1, g, zero) - torch.where(active, g, zero)


class MultiMarginLossFunction(torch.autograd.Function):
    """fastops.multi_margin_loss with its own backward. apply(input, target, p, margin, weight,
    reduction): input (N, C), (C,) or 0-d, int64 targets, p 1 or 2, weight None or C values.
    Only the input gets a gradient."""

    @staticmethod
    def forward(input, target, p, margin, weight, reduction):
        return torch.ops.fastops.multi_margin_loss(input, target, p, margin, weight, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, p, margin, weight, reduction = inputs
        ctx.p, ctx.margin, ctx.reduction = p, margin, reduction
        ctx.save_for_backward(input, target, weight)
        ctx.save_for_forward(input, target, weight)

    @staticmethod
    def backward(ctx, grad_output):
        _weight_has_no_grad(ctx.needs_input_grad[4])
        if grad_output is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        input, target, weight = ctx.saved_tensors
        grad_input = torch.ops.fastops.multi_margin_loss_backward(
            grad_output, input, target, ctx.p, ctx.margin, weight, ctx.reduction)
        return grad_input, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t_input, _t_target, _p, _margin, t_weight, _reduction):
        input, target, weight = ctx.saved_tensors
        shape = _margin_loss_shape(input, target)
        d = input.new_zeros(shape)
        if t_input is not None:
            # each row's loss moves by its gradient (the backward at grad 1) against the tangent
            rows, classes = _margin_rows(input.shape)
            slope = torch.ops.fastops.multi_margin_loss_backward(
                input.new_ones(shape), input, target, ctx.p, ctx.margin, weight, 0)
            d = d + (slope * t_input).reshape(rows, classes).sum(1).reshape(shape)
        if t_weight is not None:
            # w[y] scales its row's loss (transforms may hand a zero tangent here even where
            # the weight is not differentiated)
            unweighted = torch.ops.fastops.multi_margin_loss(input, target, ctx.p, ctx.margin,
                                                             None, 0)
            d = d + t_weight[target] * unweighted
        if ctx.reduction == 0:
            return d
        return d.sum() if ctx.reduction == 2 else d.mean()

    @staticmethod
    def vmap(info, in_dims, input, target, p, margin, weight, reduction):
        if in_dims[4] is not None:  # class weights per sample
            return _dispatch.vmap_loop(MultiMarginLossFunction.apply, info, in_dims, input,
                                       target, p, margin, weight, reduction)
        # the samples' rows fold into the rows of one call
        n = info.batch_size
        x = _dispatch.batch_first(input, in_dims[0], n)
        t = _dispatch.batch_first(target, in_dims[1], n)
        rows, classes = _margin_rows(x.shape[1:])
        loss = MultiMarginLossFunction.apply(x.reshape(n * rows, classes), t.reshape(n * rows),
                                             p, margin, weight, 0).reshape(n, rows)
        if reduction == 0:
            return loss.reshape((n, rows) if t.dim() > 1 else (n,)), 0
        return (loss.sum(1) if reduction == 2 else loss.mean(1)), 0


def _multi_margin_loss_backward(grad_output, input, target, p, margin, weight, reduction):
    """multi_margin_loss_backward as torch ops, differentiable (twice for p = 2), computed in
    float32 for the 16-bit dtypes as the kernels compute it."""
    rows, classes = _margin_rows(input.shape)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(acc).reshape(rows, classes)
    t = target.reshape(rows, 1)
    z = margin - x.gather(1, t) + x
    active = (z > 0) & (torch.arange(classes, device=x.device) != t)
    h = torch.where(active, torch.ones_like(z) if p == 1 else 2 * z, torch.zeros_like(z))
    g = grad_output.to(acc)
    g = g.reshape(rows, 1) if reduction == 0 else g
    g = g / (classes * rows) if reduction == 1 else g / classes
    if weight is not None:
        g = g * weight.to(acc)[t]
    h = h * g
    # the target class gets minus the sum of the others
    grad = h.scatter(1, t, -h.sum(1, keepdim=True))
    return grad.reshape(input.shape).to(input.dtype)


_dispatch.transforms_use("hinge_embedding_loss", HingeEmbeddingLossFunction.apply)
_dispatch.differentiable("hinge_embedding_loss_backward", _hinge_embedding_loss_backward)
_dispatch.transforms_use("multi_margin_loss", MultiMarginLossFunction.apply)
_dispatch.differentiable("multi_margin_loss_backward", _multi_margin_loss_backward)


# ---- functional forms (the signatures of torch.nn.functional) --------------------------------

def hinge_embedding_loss(input, target, margin=1.0, size_average=None, reduce=None,
                         reduction="mean"):
    """torch.nn.functional.hinge_embedding_loss on fastops kernels: (target != 1) *
    max(0, margin - input) + (target != -1) * input, reduced. input and target broadcast as
    in torch; a target of another dtype than the input's or int64 is taken as its comparisons
    with 1 and -1, all the loss reads of it."""
    r = _reduction_enum(size_average, reduce, reduction)
    if target.dtype not in (input.dtype, torch.int64):
        target = (target == 1).to(input.dtype) - (target == -1).to(input.dtype)
    if target.shape != input.shape:
        input, target = torch.broadcast_tensors(input, target)
    return _ops.hinge_embedding_loss.default(input, target, float(margin), r)


def multi_margin_loss(input, target, p=1, margin=1.0, weight=None, size_average=None,
                      reduce=None, reduction="mean"):
    """torch.nn.functional.multi_margin_loss on fastops kernels: per row,
    w[y] * sum_{i != y} max(0, margin - x[y] + x[i])^p / C, reduced over the rows."""
    r = _reduction_enum(size_average, reduce, reduction)
    if p != 1 and p != 2:
        raise ValueError("only p == 1 and p == 2 supported")
    if weight is not None and weight.dim() != 1:
        raise ValueError("weight must be one-dimensional")
    return _ops.multi_margin_loss.default(input, target, int(p), float(margin), weight, r)
