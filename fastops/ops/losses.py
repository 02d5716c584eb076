"""Autograd formulas, fake kernels and functional forms of the losses and their softmaxes:
log_softmax, softmax, nll_loss, cross_entropy (fused log_softmax + nll_loss), mse_loss, l1_loss,
binary_cross_entropy and binary_cross_entropy_with_logits.

The functional forms take exactly the arguments of their torch.nn.functional twins. The reduction
is passed to the ops as an int: 0 none, 1 mean, 2 sum.
"""

import warnings

import torch
from torch.nn import _reduction as _Reduction

from fastops.ops import _dispatch

_ops = torch.ops.fastops

__all__ = [
    "LogSoftmaxFunction", "SoftmaxFunction", "NLLLossFunction", "CrossEntropyFunction",
    "MSELossFunction", "log_softmax", "softmax", "nll_loss", "cross_entropy", "mse_loss",
    "L1LossFunction", "BinaryCrossEntropyFunction", "BinaryCrossEntropyWithLogitsFunction",
    "l1_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits",
]


# ---- fake kernels ------------------------------------------------------------------------------

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_shape(self):
    """The input's shape without its class dim (dim 1; dim 0 for a (C,) input)."""
    torch._check(self.dim() >= 1, lambda: "fastops: expected an input of 1 or more dims")
    class_dim = 0 if self.dim() == 1 else 1
    return [s for d, s in enumerate(self.shape) if d != class_dim]


def _loss_like(self, reduction):
    return self.new_empty(_row_shape(self) if reduction == 0 else ())


@torch.library.register_fake("fastops::log_softmax")
@torch.library.register_fake("fastops::softmax")
def _softmax_fake(self, dim):
    return self.new_empty(self.shape)


@torch.library.register_fake("fastops::log_softmax_backward")
@torch.library.register_fake("fastops::softmax_backward")
def _softmax_backward_fake(grad_output, output, dim):
    return output.new_empty(output.shape)


@torch.library.register_fake("fastops::nll_loss")
def _nll_loss_fake(self, target, weight, reduction, ignore_index):
    return (_loss_like(self, reduction),
            self.new_empty((), dtype=_acc_dtype(self.dtype)))


@torch.library.register_fake("fastops::nll_loss_backward")
def _nll_loss_backward_fake(grad_output, self, target, weight, reduction, ignore_index,
                            total_weight):
    return self.new_empty(self.shape)


@torch.library.register_fake("fastops::cross_entropy")
def _cross_entropy_fake(self, target, weight, reduction, ignore_index, label_smoothing):
    acc = _acc_dtype(self.dtype)
    return (_loss_like(self, reduction), self.new_empty(_row_shape(self), dtype=acc),
            self.new_empty((), dtype=acc))


@torch.library.register_fake("fastops::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_output, self, target, weight, reduction, ignore_index,
                                 label_smoothing, lse, total_weight):
    return self.new_empty(self.shape)


@torch.library.register_fake("fastops::mse_loss")
def _mse_loss_fake(self, target, reduction):
    return self.new_empty(self.shape if reduction == 0 else ())


@torch.library.register_fake("fastops::mse_loss_backward")
def _mse_loss_backward_fake(grad_output, self, target, reduction, output_mask):
    return tuple(self.new_empty(self.shape if want else (0,)) for want in output_mask)


# the elementwise losses: l1_loss as mse_loss; the binary cross entropies also take weight and
# pos_weight, broadcast to self's shape
def _elementwise_loss_fake(self, target, *rest):
    return self.new_empty(self.shape if rest[-1] == 0 else ())


def _elementwise_loss_backward_fake(grad_output, self, target, *rest):
    return tuple(self.new_empty(self.shape if want else (0,)) for want in rest[-1])


for _name in ("l1_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits"):
    torch.library.register_fake(f"fastops::{_name}", _elementwise_loss_fake)
    torch.library.register_fake(f"fastops::{_name}_backward", _elementwise_loss_backward_fake)


# ---- autograd.Function classes ---------------------------------------------------------------
# The public twins of the formulas the ops carry in C++ (csrc/autograd.cpp); the functional
# forms below call the ops directly.

class LogSoftmaxFunction(torch.autograd.Function):
    """fastops.log_softmax with its own backward. apply(input, dim)."""

    @staticmethod
    def forward(input, dim):
        return torch.ops.fastops.log_softmax(input, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not ctx.needs_input_grad[0]:
            return None, None
        (output,) = ctx.saved_tensors
        return torch.ops.fastops.log_softmax_backward(grad_output, output, ctx.dim), None

    @staticmethod
    def jvp(ctx, t_input, _):
        (output,) = ctx.saved_tensors
        return t_input - (output.exp() * t_input).sum(ctx.dim, keepdim=True)

    @staticmethod
    def vmap(info, in_dims, input, dim):
        x = _dispatch.batch_first(input, in_dims[0], info.batch_size)
        return LogSoftmaxFunction.apply(x, _batched_dim(dim, x)), 0


def _batched_dim(dim, x):
    """dim of the logical tensor as a dim of the batch-first physical x."""
    return dim % max(x.dim() - 1, 1) + 1


class _LogSoftmaxBackward(torch.autograd.Function):
    """The autograd of log_softmax_backward(g, y, dim) = g - exp(y) * sum(g, dim)."""

    @staticmethod
    def forward(grad_output, output, dim):
        return torch.ops.fastops.log_softmax_backward(grad_output, output, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.save_for_forward(*inputs[:2])
        ctx.dim = inputs[2]

    @staticmethod
    def backward(ctx, grad_grad):
        g, y = ctx.saved_tensors
        # the transpose of g -> g - exp(y) sum(g): gg - sum(gg exp(y))
        d_g = grad_grad - (grad_grad * y.exp()).sum(ctx.dim, keepdim=True)
        d_y = -grad_grad * y.exp() * g.sum(ctx.dim, keepdim=True)
        return d_g, d_y, None

    @staticmethod
    def jvp(ctx, t_g, t_y, _):
        g, y = ctx.saved_tensors
        out = torch.ops.fastops.log_softmax_backward(t_g, y, ctx.dim) if t_g is not None else None
        if t_y is not None:
            d = -t_y * y.exp() * g.sum(ctx.dim, keepdim=True)
            out = d if out is None else out + d
        return out

    @staticmethod
    def vmap(info, in_dims, grad_output, output, dim):
        g, y = (_dispatch.batch_first(t, d, info.batch_size)
                for t, d in zip((grad_output, output), in_dims))
        return _LogSoftmaxBackward.apply(g, y, _batched_dim(dim, y)), 0


_dispatch.transforms_use("log_softmax", LogSoftmaxFunction.apply)
_dispatch.differentiable("log_softmax_backward", _LogSoftmaxBackward.apply)


class SoftmaxFunction(torch.autograd.Function):
    """fastops.softmax with its own backward, from the output. apply(input, dim)."""

    @staticmethod
    def forward(input, dim):
        return torch.ops.fastops.softmax(input, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dim = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not ctx.needs_input_grad[0]:
            return None, None
        (output,) = ctx.saved_tensors
        return torch.ops.fastops.softmax_backward(grad_output, output, ctx.dim), None

    @staticmethod
    def jvp(ctx, t_input, _):
        (output,) = ctx.saved_tensors
        return torch.ops.fastops.softmax_backward(t_input, output, ctx.dim)

    @staticmethod
    def vmap(info, in_dims, input, dim):
        x = _dispatch.batch_first(input, in_dims[0], info.batch_size)
        return SoftmaxFunction.apply(x, _batched_dim(dim, x)), 0


class _SoftmaxBackward(torch.autograd.Function):
    """The autograd of softmax_backward(g, y, dim) = y * (g - sum(g * y, dim)): linear in g
    with a symmetric matrix (diag(y) - y y^T), so its transpose is itself."""

    @staticmethod
    def forward(grad_output, output, dim):
        return torch.ops.fastops.softmax_backward(grad_output, output, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.save_for_forward(*inputs[:2])
        ctx.dim = inputs[2]

    @staticmethod
    def _d_output(g, y, t, dim):
        """d/dy of y * (g - sum(g y)) applied to t: t (g - sum(g y)) - y sum(g t)."""
        return t * (g - (g * y).sum(dim, keepdim=True)) - y * (g * t).sum(dim, keepdim=True)

    @staticmethod
    def backward(ctx, grad_grad):
        g, y = ctx.saved_tensors
        d_g = torch.ops.fastops.softmax_backward(grad_grad, y, ctx.dim)
        # the transpose of t -> t (g - s) - y sum(g t): gg (g - s) - g sum(gg y)
        s = (g * y).sum(ctx.dim, keepdim=True)
        d_y = grad_grad * (g - s) - g * (grad_grad * y).sum(ctx.dim, keepdim=True)
        return d_g, d_y, None

    @staticmethod
    def jvp(ctx, t_g, t_y, _):
        g, y = ctx.saved_tensors
        out = torch.ops.fastops.softmax_backward(t_g, y, ctx.dim) if t_g is not None else None
        if t_y is not None:
            d = _SoftmaxBackward._d_output(g, y, t_y, ctx.dim)
            out = d if out is None else out + d
        return out

    @staticmethod
    def vmap(info, in_dims, grad_output, output, dim):
        g, y = (_dispatch.batch_first(t, d, info.batch_size)
                for t, d in zip((grad_output, output), in_dims))
        return _SoftmaxBackward.apply(g, y, _batched_dim(dim, y)), 0


_dispatch.transforms_use("softmax", SoftmaxFunction.apply)
_dispatch.differentiable("softmax_backward", _SoftmaxBackward.apply)


class NLLLossFunction(torch.autograd.Function):
    """fastops.nll_loss with its own backward. apply(input, target, weight, reduction,
    ignore_index) -> (loss, total_weight); reduction is 0 none, 1 mean, 2 sum. The target and
    the weight get no gradient."""

    @staticmethod
    def forward(input, target, weight, reduction, ignore_index):
        return torch.ops.fastops.nll_loss(input, target, weight, reduction, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction, ignore_index = inputs
        _, total_weight = output
        ctx.mark_non_differentiable(total_weight)
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        ctx.save_for_backward(input, target, weight, total_weight)
        ctx.fwd_inputs = inputs

    @staticmethod
    def backward(ctx, grad_loss, grad_total_weight=None):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        input, target, weight, total_weight = ctx.saved_tensors
        grad_input = torch.ops.fastops.nll_loss_backward(
            grad_loss, input, target, weight, ctx.reduction, ctx.ignore_index, total_weight)
        return grad_input, None, None, None, None

    @staticmethod
    def jvp(ctx, t_input, *_):
        # linear in the input; total_weight does not move
        input, target, weight, _, ignore_index = ctx.fwd_inputs
        loss, total_weight = torch.ops.fastops.nll_loss(t_input, target, weight, ctx.reduction,
                                                        ignore_index)
        return loss, None

    @staticmethod
    def vmap(info, in_dims, input, target, weight, reduction, ignore_index):
        if in_dims[2] is not None:  # class weights per sample
            return _dispatch.vmap_loop(NLLLossFunction.apply, info, in_dims, input, target,
                                       weight, reduction, ignore_index)
        x, t = _batch_rows(info, in_dims, input, target)
        loss, _ = NLLLossFunction.apply(_fold(x, x), _fold(t, x), weight, 0, ignore_index)
        total_weight = _sample_total_weight(x, t, weight, ignore_index)
        return (_reduce_samples(loss, t, reduction, total_weight), total_weight), (0, 0)


class CrossEntropyFunction(torch.autograd.Function):
    """Fused log_softmax + nll_loss with its own backward. apply(input, target, weight,
    reduction, ignore_index, label_smoothing) -> (loss, lse, total_weight).

    target holds class indices (int64 or uint8, the input's shape without the class dim) or
    class probabilities (the input's shape and dtype). Only lse (one value per row) is kept for
    the backward. Class-index targets and the weight get no gradient; probability targets do."""

    @staticmethod
    def forward(input, target, weight, reduction, ignore_index, label_smoothing):
        return torch.ops.fastops.cross_entropy(input, target, weight, reduction, ignore_index,
                                               label_smoothing)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction, ignore_index, label_smoothing = inputs
        _, lse, total_weight = output
        ctx.mark_non_differentiable(lse, total_weight)
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        ctx.label_smoothing = label_smoothing
        ctx.save_for_backward(input, target, weight, lse, total_weight)
        ctx.save_for_forward(input, target, weight, lse, total_weight)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse=None, grad_total_weight=None):
        grad_input = grad_target = None
        if grad_loss is None:
            return None, None, None, None, None, None
        input, target, weight, lse, total_weight = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.fastops.cross_entropy_backward(
                grad_loss, input, target, weight, ctx.reduction, ctx.ignore_index,
                ctx.label_smoothing, lse, total_weight)
        if ctx.needs_input_grad[1] and target.is_floating_point():
            grad_target = _soft_target_grad(grad_loss, input, weight, ctx.reduction,
                                            ctx.label_smoothing, lse)
        return grad_input, grad_target, None, None, None, None

    @staticmethod
    def jvp(ctx, t_input, t_target, *_):
        # the loss is a sum over elements of (d loss / d x) * t_x: the backward at grad 1
        input, target, weight, lse, total_weight = ctx.saved_tensors
        class_dim = 0 if input.dim() == 1 else 1
        ones = input.new_ones(lse.shape if ctx.reduction == 0 else ())
        out = None
        for t, grad in ((t_input, lambda: torch.ops.fastops.cross_entropy_backward(
                            ones, input, target, weight, ctx.reduction, ctx.ignore_index,
                            ctx.label_smoothing, lse, total_weight)),
                        (t_target if target.is_floating_point() else None,
                         lambda: _soft_target_grad(ones, input, weight, ctx.reduction,
                                                   ctx.label_smoothing, lse))):
            if t is not None:
                d = grad() * t
                d = d.sum(class_dim) if ctx.reduction == 0 else d.sum()
                out = d if out is None else out + d
        return out, None, None

    @staticmethod
    def vmap(info, in_dims, input, target, weight, reduction, ignore_index, label_smoothing):
        if in_dims[2] is not None:  # class weights per sample
            return _dispatch.vmap_loop(CrossEntropyFunction.apply, info, in_dims, input, target,
                                       weight, reduction, ignore_index, label_smoothing)
        x, t = _batch_rows(info, in_dims, input, target)
        loss, lse, _ = CrossEntropyFunction.apply(_fold(x, x), _fold(t, x), weight, 0, ignore_index,
                                                  label_smoothing)
        if t.is_floating_point():  # probabilities: a mean over the rows
            rows = x.numel() // (x.shape[0] * x.shape[_class_dim(x)])
            total_weight = torch.full((x.shape[0],), float(rows), dtype=lse.dtype,
                                      device=x.device)
            rows_shape = t.shape[:_class_dim(x)] + t.shape[_class_dim(x) + 1:]
        else:
            total_weight = _sample_total_weight(x, t, weight, ignore_index)
            rows_shape = t.shape
        lse = lse.reshape(rows_shape)
        loss = _reduce_samples(loss, lse, reduction, total_weight)
        return (loss, lse, total_weight), (0, 0, 0)


# ---- vmap of the classification losses: the batch folds into the rows -------------------------

def _class_dim(x):
    """The class dim of a batch-first physical input: (B, C) or (B, N, C, d..)."""
    return 1 if x.dim() == 2 else 2


def _batch_rows(info, in_dims, input, target):
    return (_dispatch.batch_first(input, in_dims[0], info.batch_size),
            _dispatch.batch_first(target, in_dims[1], info.batch_size))


def _fold(t, x):
    """(B, N, ...) -> (B*N, ...); a (B, C) input x, one row per sample, is rows already."""
    return t.flatten(0, 1) if x.dim() > 2 else t


def _sample_total_weight(x, target, weight, ignore_index):
    """Per sample, the sum of the class weights of the targets that are not ignored."""
    valid = target != ignore_index
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if weight is None:
        w = valid.to(acc)
    else:
        w = weight.to(acc)[target.clamp(0, x.shape[_class_dim(x)] - 1)] * valid
    return w.reshape(x.shape[0], -1).sum(1)


def _reduce_samples(loss, rows, reduction, total_weight):
    """Per-row losses (reduction 'none' of the folded call) -> per sample."""
    n = total_weight.shape[0]
    if reduction == 0:
        return loss.reshape(rows.shape)
    total = loss.reshape(n, -1).sum(1)
    if reduction == 1:
        total = (total.to(total_weight.dtype) / total_weight).to(loss.dtype)
    return total


def _soft_target_grad(grad_loss, input, weight, reduction, label_smoothing, lse):
    """d loss / d target for probability targets: -(1 - eps) * w_c * log_softmax(input)_c
    times the row's incoming gradient."""
    class_dim = 0 if input.dim() == 1 else 1
    if torch.is_grad_enabled():  # recorded: with the graph of log_softmax (lse has none)
        logp = torch.ops.fastops.log_softmax(input, class_dim).to(lse.dtype)
    else:
        logp = input.to(lse.dtype) - lse.unsqueeze(class_dim)
    g = -(1.0 - label_smoothing) * logp
    if weight is not None:
        shape = [1] * input.dim()
        shape[class_dim] = -1
        g = g * weight.to(lse.dtype).view(shape)
    if reduction == 0:
        g = g * grad_loss.to(lse.dtype).unsqueeze(class_dim)
    else:
        scale = grad_loss.to(lse.dtype)
        if reduction == 1:
            scale = scale / (input.numel() // max(input.shape[class_dim], 1))
        g = g * scale
    return g.to(input.dtype)


def _regression_loss_function(op_name, doc):
    """The autograd.Function of an elementwise regression loss fastops::op_name(input, target,
    reduction), whose backward op gives the gradients of both input and target."""
    forward_op = getattr(torch.ops.fastops, op_name)
    backward_op = getattr(torch.ops.fastops, op_name + "_backward")

    class RegressionLossFunction(torch.autograd.Function):
        @staticmethod
        def forward(input, target, reduction):
            return forward_op(input, target, reduction)

        @staticmethod
        def setup_context(ctx, inputs, output):
            input, target, reduction = inputs
            ctx.reduction = reduction
            ctx.save_for_backward(input, target)
            ctx.save_for_forward(input, target)

        @staticmethod
        def backward(ctx, grad_output):
            if grad_output is None or not any(ctx.needs_input_grad[:2]):
                return None, None, None
            input, target = ctx.saved_tensors
            grad_input, grad_target = backward_op(grad_output, input, target, ctx.reduction,
                                                  list(ctx.needs_input_grad[:2]))
            return (grad_input if ctx.needs_input_grad[0] else None,
                    grad_target if ctx.needs_input_grad[1] else None, None)

        @staticmethod
        def jvp(ctx, t_input, t_target, _):
            input, target = ctx.saved_tensors
            return _elementwise_jvp(backward_op, (input, target), t_input, t_target,
                                    ctx.reduction)

        @staticmethod
        def vmap(info, in_dims, input, target, reduction):
            x, t = _batch_elementwise(info, in_dims, input, target)
            return _reduce_per_sample(RegressionLossFunction.apply(x, t, 0), reduction), 0

    name = "".join(w.capitalize() for w in op_name.split("_")).replace("Mse", "MSE")
    RegressionLossFunction.__name__ = RegressionLossFunction.__qualname__ = name + "Function"
    RegressionLossFunction.__doc__ = doc
    return RegressionLossFunction


MSELossFunction = _regression_loss_function("mse_loss", """fastops.mse_loss with its own
    backward. apply(input, target, reduction); input and target have the same shape and dtype.
    Both get a gradient.""")

L1LossFunction = _regression_loss_function("l1_loss", """fastops.l1_loss with its own backward.
    apply(input, target, reduction); input and target have the same shape and dtype. Both get a
    gradient: sign(input - target), 0 where they are equal, as torch's.""")


def _mse_loss_backward(grad_output, input, target, reduction, output_mask):
    """mse_loss_backward as torch ops, differentiable: 2 (input - target) grad (/ numel)."""
    scale = grad_output / input.numel() if reduction == 1 else grad_output
    grad_input = 2 * (input - target) * scale
    empty = input.new_empty(0)
    return (grad_input if output_mask[0] else empty,
            -grad_input if output_mask[1] else empty)


def _l1_loss_backward(grad_output, input, target, reduction, output_mask):
    """l1_loss_backward as torch ops, differentiable: sign(input - target) grad (/ numel)."""
    scale = grad_output / input.numel() if reduction == 1 else grad_output
    grad_input = (torch.sign(input - target) * scale).to(input.dtype)
    empty = input.new_empty(0)
    return (grad_input if output_mask[0] else empty,
            -grad_input if output_mask[1] else empty)


def _not_differentiable(op, arg):
    return RuntimeError(f"fastops.{op} is not differentiable with respect to argument '{arg}' "
                        "(as torch's). This input cannot have requires_grad True.")


class BinaryCrossEntropyFunction(torch.autograd.Function):
    """fastops.binary_cross_entropy with its own backward. apply(input, target, weight,
    reduction): input holds probabilities in [0, 1] (anything else raises), target has its
    shape and dtype, weight (or None) broadcasts to its shape. input and target get a gradient;
    weight gets none (as in torch: differentiating it raises)."""

    @staticmethod
    def forward(input, target, weight, reduction):
        return torch.ops.fastops.binary_cross_entropy(input, target, weight, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        ctx.reduction = reduction
        ctx.set_materialize_grads(False)  # an absent weight tangent stays None, not zeros
        ctx.save_for_backward(input, target, weight)
        ctx.save_for_forward(input, target, weight)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.needs_input_grad[2]:
            raise _not_differentiable("binary_cross_entropy", "weight")
        if grad_output is None or not any(ctx.needs_input_grad[:2]):
            return None, None, None, None
        input, target, weight = ctx.saved_tensors
        grad_input, grad_target = torch.ops.fastops.binary_cross_entropy_backward(
            grad_output, input, target, weight, ctx.reduction, list(ctx.needs_input_grad[:2]))
        return (grad_input if ctx.needs_input_grad[0] else None,
                grad_target if ctx.needs_input_grad[1] else None, None, None)

    @staticmethod
    def jvp(ctx, t_input, t_target, t_weight, _):
        if t_weight is not None:
            raise _not_differentiable("binary_cross_entropy", "weight")
        input, target, weight = ctx.saved_tensors
        return _elementwise_jvp(torch.ops.fastops.binary_cross_entropy_backward,
                                (input, target, weight), t_input, t_target, ctx.reduction)

    @staticmethod
    def vmap(info, in_dims, input, target, weight, reduction):
        x, t, w = _batch_elementwise(info, in_dims, input, target, weight)
        return _reduce_per_sample(BinaryCrossEntropyFunction.apply(x, t, w, 0), reduction), 0


class BinaryCrossEntropyWithLogitsFunction(torch.autograd.Function):
    """fastops.binary_cross_entropy_with_logits with its own backward. apply(input, target,
    weight, pos_weight, reduction): target has input's shape and dtype, weight and pos_weight
    (or None) broadcast to its shape. input and target get a gradient. weight and pos_weight get
    one here when asked (torch.func transforms differentiate them, as torch.func does torch's);
    through the op itself, as through torch's, they may not require a gradient."""

    @staticmethod
    def forward(input, target, weight, pos_weight, reduction):
        return torch.ops.fastops.binary_cross_entropy_with_logits(input, target, weight,
                                                                  pos_weight, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction = inputs
        ctx.reduction = reduction
        ctx.set_materialize_grads(False)  # absent weight tangents stay None, not zeros
        ctx.save_for_backward(input, target, weight, pos_weight)
        ctx.save_for_forward(input, target, weight, pos_weight)

    @staticmethod
    def backward(ctx, grad_output):
        needs = ctx.needs_input_grad
        grads = [None] * 5
        if grad_output is None:
            return tuple(grads)
        input, target, weight, pos_weight = ctx.saved_tensors
        if needs[0] or needs[1]:
            gi, gt = torch.ops.fastops.binary_cross_entropy_with_logits_backward(
                grad_output, input, target, weight, pos_weight, ctx.reduction, list(needs[:2]))
            grads[0], grads[1] = (gi if needs[0] else None), (gt if needs[1] else None)
        if needs[2] or needs[3]:
            scale = grad_output / input.numel() if ctx.reduction == 1 else grad_output
            if needs[2]:
                grads[2] = _weight_grad(scale, input, target, pos_weight, weight)
            if needs[3]:
                grads[3] = _pos_weight_grad(scale, input, target, weight, pos_weight)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, t_input, t_target, t_weight, t_pos_weight, _):
        input, target, weight, pos_weight = ctx.saved_tensors
        d = _elementwise_jvp(torch.ops.fastops.binary_cross_entropy_with_logits_backward,
                             (input, target, weight, pos_weight), t_input, t_target, 0)
        if t_weight is not None:
            e = _weight_grad(1.0, input, target, pos_weight, t_weight, reduce=False)
            d = e if d is None else d + e
        if t_pos_weight is not None:
            e = _pos_weight_grad(1.0, input, target, weight, t_pos_weight, reduce=False)
            d = e if d is None else d + e
        return None if d is None else _reduce_all(d, ctx.reduction)

    @staticmethod
    def vmap(info, in_dims, input, target, weight, pos_weight, reduction):
        x, t, w, p = _batch_elementwise(info, in_dims, input, target, weight, pos_weight)
        loss = BinaryCrossEntropyWithLogitsFunction.apply(x, t, w, p, 0)
        return _reduce_per_sample(loss, reduction), 0


def _weight_grad(scale, input, target, pos_weight, weight, reduce=True):
    """d loss / d weight (scale times the unweighted loss), summed to weight's shape; with
    reduce=False, the elementwise product with weight (a tangent) instead."""
    unweighted = torch.ops.fastops.binary_cross_entropy_with_logits(input, target, None,
                                                                    pos_weight, 0)
    g = scale * unweighted
    return (g * weight) if not reduce else g.sum_to_size(weight.shape)


def _pos_weight_grad(scale, input, target, weight, pos_weight, reduce=True):
    """d loss / d pos_weight: -scale * weight * target * log_sigmoid(input), summed to
    pos_weight's shape; with reduce=False, the elementwise product with pos_weight instead."""
    g = -scale * target * torch.nn.functional.logsigmoid(input)
    if weight is not None:
        g = g * weight
    return (g * pos_weight) if not reduce else g.sum_to_size(pos_weight.shape)


def _binary_cross_entropy_backward(grad_output, input, target, weight, reduction, output_mask):
    """binary_cross_entropy_backward as torch ops, differentiable: grad w (x - y) /
    max((1 - x) x, 1e-12) for the input, -grad w logit(x) for the target (/ numel)."""
    scale = grad_output / input.numel() if reduction == 1 else grad_output
    if weight is not None:
        scale = scale * weight
    empty = input.new_empty(0)
    grad_input = grad_target = empty
    if output_mask[0]:
        d = (input - target) / ((1 - input) * input).clamp_min(1e-12)
        grad_input = (d * scale).to(input.dtype)
    if output_mask[1]:
        grad_target = (-torch.logit(input) * scale).to(input.dtype)
    return grad_input, grad_target


def _binary_cross_entropy_with_logits_backward(grad_output, input, target, weight, pos_weight,
                                               reduction, output_mask):
    """binary_cross_entropy_with_logits_backward as torch ops, differentiable (torch's
    formulas)."""
    logsigmoid = torch.nn.functional.logsigmoid
    scale = grad_output / input.numel() if reduction == 1 else grad_output
    if weight is not None:
        scale = scale * weight
    empty = input.new_empty(0)
    grad_input = grad_target = empty
    if output_mask[0]:
        if pos_weight is None:
            d = torch.sigmoid(input) - target
        else:
            py = pos_weight * target
            d = (py + 1 - target) * torch.sigmoid(input) - py
        grad_input = (d * scale).to(input.dtype)
    if output_mask[1]:
        if pos_weight is None:
            d = -input
        else:
            d = logsigmoid(-input) - pos_weight * logsigmoid(input)
        grad_target = (d * scale).to(input.dtype)
    return grad_input, grad_target


# ---- helpers of the elementwise losses' jvp and vmap rules -------------------------------------

def _reduce_all(d, reduction):
    return d if reduction == 0 else (d.sum() if reduction == 2 else d.mean())


def _elementwise_jvp(backward_op, operands, t_input, t_target, reduction):
    """The tangent of an elementwise loss: its elementwise derivatives (the backward op at an
    incoming gradient of ones) times the tangents of input and target, reduced."""
    input = operands[0]
    if t_input is None and t_target is None:
        return None
    grad_input, grad_target = backward_op(torch.ones_like(input), *operands, 0,
                                          [t_input is not None, t_target is not None])
    d = grad_input * t_input if t_input is not None else None
    if t_target is not None:
        d = grad_target * t_target if d is None else d + grad_target * t_target
    return _reduce_all(d, reduction)


def _batch_elementwise(info, in_dims, input, target, *weights):
    """input and target batch-first; a batched weight batch-first with ones inserted after the
    batch dim, so that each sample's weight broadcasts against its input as it would alone."""
    n = info.batch_size
    x = _dispatch.batch_first(input, in_dims[0], n)
    out = [x, _dispatch.batch_first(target, in_dims[1], n)]
    for w, d in zip(weights, in_dims[2:]):
        if w is not None and d is not None:
            w = w.movedim(d, 0)
            w = w.reshape(n, *[1] * (x.dim() - w.dim()), *w.shape[1:])
        out.append(w)
    return out


def _reduce_per_sample(loss, reduction):
    """The unreduced loss of a batch-first call, reduced per sample."""
    if reduction == 0:
        return loss
    per_sample = loss.reshape(loss.shape[0], -1)
    return per_sample.sum(1) if reduction == 2 else per_sample.mean(1)


class _NLLLossBackward(torch.autograd.Function):
    """The autograd of nll_loss_backward: linear in grad_output (its derivative there is
    nll_loss itself), constant in the input."""

    @staticmethod
    def forward(grad_output, input, target, weight, reduction, ignore_index, total_weight):
        return torch.ops.fastops.nll_loss_backward(grad_output, input, target, weight, reduction,
                                                   ignore_index, total_weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.fwd_inputs = inputs

    @staticmethod
    def backward(ctx, grad_grad):
        _, _, target, weight, reduction, ignore_index, _ = ctx.fwd_inputs
        d_g = torch.ops.fastops.nll_loss(grad_grad, target, weight, reduction, ignore_index)[0]
        return d_g, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t_grad, *_):
        _, *rest = ctx.fwd_inputs
        return torch.ops.fastops.nll_loss_backward(t_grad, *rest)

    @staticmethod
    def vmap(info, in_dims, grad_output, input, target, weight, reduction, ignore_index,
             total_weight):
        args = (grad_output, input, target, weight, reduction, ignore_index, total_weight)
        if in_dims[3] is not None:
            return _dispatch.vmap_loop(_NLLLossBackward.apply, info, in_dims, *args)
        n = info.batch_size
        x, t = _batch_rows(info, in_dims[1:], input, target)
        g = _dispatch.batch_first(grad_output, in_dims[0], n)
        if reduction != 0:  # one gradient per sample -> one per row
            if reduction == 1:
                g = g / _dispatch.batch_first(total_weight, in_dims[6], n)
            g = g.reshape(n, *[1] * (t.dim() - 1)).expand(t.shape).to(x.dtype)
        out = _NLLLossBackward.apply(_fold(g, x), _fold(x, x), _fold(t, x), weight, 0,
                                     ignore_index, total_weight.new_ones(()))
        return out.reshape(x.shape), 0


def _cross_entropy_backward(grad_output, input, target, weight, reduction, ignore_index,
                            label_smoothing, lse, total_weight):
    """cross_entropy_backward as a composite of differentiable ops: the gradient of the
    log-probabilities (nll_loss_backward, plus the smoothing term), through
    log_softmax_backward at log_softmax(input). lse and total_weight are taken as the
    forward's, not differentiated."""
    class_dim = 0 if input.dim() == 1 else 1
    classes = input.shape[class_dim]
    logp = torch.ops.fastops.log_softmax(input, class_dim)
    shape = [1] * input.dim()
    shape[class_dim] = -1
    w = weight.view(shape) if weight is not None else 1.0

    def per_row(t):  # a row-shaped (or 0-d) scale against the input
        return t.unsqueeze(class_dim) if reduction == 0 else t

    if target.is_floating_point():
        p = target * (1 - label_smoothing) + label_smoothing / classes
        scale = grad_output / (input.numel() // max(classes, 1)) if reduction == 1 else grad_output
        grad_logp = -(p * w) * per_row(scale)
    else:
        grad_logp = 0
        if label_smoothing < 1:
            grad_logp = (1 - label_smoothing) * torch.ops.fastops.nll_loss_backward(
                grad_output, logp, target, weight, reduction, ignore_index, total_weight)
        if label_smoothing > 0:
            scale = grad_output / total_weight if reduction == 1 else grad_output
            valid = (target != ignore_index).unsqueeze(class_dim)
            grad_logp = grad_logp - (label_smoothing / classes) * w * per_row(scale) * valid
    return torch.ops.fastops.log_softmax_backward(grad_logp.to(input.dtype), logp, class_dim)


_dispatch.transforms_use("nll_loss", NLLLossFunction.apply)
_dispatch.differentiable("nll_loss_backward", _NLLLossBackward.apply)
_dispatch.transforms_use("cross_entropy", CrossEntropyFunction.apply)
_dispatch.differentiable("cross_entropy_backward", _cross_entropy_backward)
_dispatch.transforms_use("mse_loss", MSELossFunction.apply)
_dispatch.differentiable("mse_loss_backward", _mse_loss_backward)
_dispatch.transforms_use("l1_loss", L1LossFunction.apply)
_dispatch.differentiable("l1_loss_backward", _l1_loss_backward)
_dispatch.transforms_use("binary_cross_entropy", BinaryCrossEntropyFunction.apply)
_dispatch.differentiable("binary_cross_entropy_backward", _binary_cross_entropy_backward)
_dispatch.transforms_use("binary_cross_entropy_with_logits",
                         BinaryCrossEntropyWithLogitsFunction.apply)
_dispatch.differentiable("binary_cross_entropy_with_logits_backward",
                         _binary_cross_entropy_with_logits_backward)


# ---- functional forms (the signatures of torch.nn.functional) --------------------------------

def _reduction_enum(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    return _Reduction.get_enum(reduction)


def _softmax_dim(name, input, dim, _stacklevel):
    """torch's legacy choice when dim is None, with its warning."""
    if dim is None:
        warnings.warn(f"Implicit dimension choice for {name} has been deprecated. "
                      "Change the call to include dim=X as an argument.",
                      stacklevel=_stacklevel)
        dim = 0 if input.dim() in (0, 1, 3) else 1
    return dim


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """torch.nn.functional.log_softmax on fastops kernels."""
    dim = _softmax_dim("log_softmax", input, dim, _stacklevel + 1)
    if dtype is not None:
        input = input.to(dtype)
    return _ops.log_softmax.default(input, dim)


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    """torch.nn.functional.softmax on fastops kernels."""
    dim = _softmax_dim("softmax", input, dim, _stacklevel + 1)
    if dtype is not None:
        input = input.to(dtype)
    return _ops.softmax.default(input, dim)


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """torch.nn.functional.nll_loss on fastops kernels."""
    r = _reduction_enum(size_average, reduce, reduction)
    loss, _ = _ops.nll_loss.default(input, target, weight, r, ignore_index)
    return loss


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """torch.nn.functional.cross_entropy on fastops kernels: one fused pass forward, one
    backward; class-index or class-probability targets."""
    r = _reduction_enum(size_average, reduce, reduction)
    loss, _, _ = _ops.cross_entropy.default(input, target, weight, r, ignore_index,
                                            float(label_smoothing))
    return loss


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """torch.nn.functional.mse_loss on fastops kernels. A target of another size is broadcast
    (with torch's warning); weight (the input's size) weights each element, and 'mean' then
    divides by the sum of the weights, as torch does."""
    return _regression_loss(_ops.mse_loss.default, input, target, size_average, reduce,
                            reduction, weight)


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """torch.nn.functional.l1_loss on fastops kernels; target and weight as in mse_loss."""
    return _regression_loss(_ops.l1_loss.default, input, target, size_average, reduce,
                            reduction, weight)


def _regression_loss(op, input, target, size_average, reduce, reduction, weight):
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if target.size() != input.size():
        input, target = torch.broadcast_tensors(input, target)
        input, target = input.contiguous(), target.contiguous()
    if weight is not None:
        if weight.size() != input.size():
            raise ValueError("Weights and input must have the same size.")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"Invalid reduction mode: {reduction}. "
                             "Expected one of 'none', 'mean', 'sum'.")
        weighted = op(input, target, 0) * weight
        if reduction == "none":
            return weighted
        if reduction == "sum":
            return weighted.sum()
        return weighted.sum() / weight.sum()
    return op(input, target, _Reduction.get_enum(reduction))


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """torch.nn.functional.binary_cross_entropy on fastops kernels: input holds probabilities
    in [0, 1] (anything else raises, as in torch); each log is clamped at -100; weight
    broadcasts to the input's shape."""
    r = _reduction_enum(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}) is deprecated. Please ensure they have the same size.")
    if weight is not None and weight.dtype != input.dtype:
        weight = weight.to(input.dtype)  # torch multiplies the loss by it in place
    return _ops.binary_cross_entropy.default(input, target, weight, r)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """torch.nn.functional.binary_cross_entropy_with_logits on fastops kernels, in one pass
    forward and one backward: weight and pos_weight broadcast to the input's shape (pos_weight
    of C elements: one per class, along the last dim). Mixed dtypes compute in the target's, as
    torch's does."""
    r = _reduction_enum(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    dtype = target.dtype
    input, weight, pos_weight = (t.to(dtype) if t is not None and t.dtype != dtype else t
                                 for t in (input, weight, pos_weight))
    return _ops.binary_cross_entropy_with_logits.default(input, target, weight, pos_weight, r)
