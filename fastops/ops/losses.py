"""Autograd formulas, fake kernels and functional forms of the losses: log_softmax, nll_loss,
cross_entropy (fused log_softmax + nll_loss) and mse_loss.

The functional forms take exactly the arguments of their torch.nn.functional twins. The reduction
is passed to the ops as an int: 0 none, 1 mean, 2 sum.
"""

import warnings

import torch
from torch.nn import _reduction as _Reduction

_ops = torch.ops.fastops

__all__ = [
    "LogSoftmaxFunction", "NLLLossFunction", "CrossEntropyFunction", "MSELossFunction",
    "log_softmax", "nll_loss", "cross_entropy", "mse_loss",
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
def _log_softmax_fake(self, dim):
    return self.new_empty(self.shape)


@torch.library.register_fake("fastops::log_softmax_backward")
def _log_softmax_backward_fake(grad_output, output, dim):
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

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not ctx.needs_input_grad[0]:
            return None, None
        (output,) = ctx.saved_tensors
        return torch.ops.fastops.log_softmax_backward(grad_output, output, ctx.dim), None


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

    @staticmethod
    def backward(ctx, grad_loss, grad_total_weight=None):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        input, target, weight, total_weight = ctx.saved_tensors
        grad_input = torch.ops.fastops.nll_loss_backward(
            grad_loss, input, target, weight, ctx.reduction, ctx.ignore_index, total_weight)
        return grad_input, None, None, None, None


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


def _soft_target_grad(grad_loss, input, weight, reduction, label_smoothing, lse):
    """d loss / d target for probability targets: -(1 - eps) * w_c * log_softmax(input)_c
    times the row's incoming gradient."""
    class_dim = 0 if input.dim() == 1 else 1
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


class MSELossFunction(torch.autograd.Function):
    """fastops.mse_loss with its own backward. apply(input, target, reduction); input and
    target have the same shape and dtype. Both get a gradient."""

    @staticmethod
    def forward(input, target, reduction):
        return torch.ops.fastops.mse_loss(input, target, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, reduction = inputs
        ctx.reduction = reduction
        ctx.save_for_backward(input, target)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None or not any(ctx.needs_input_grad[:2]):
            return None, None, None
        input, target = ctx.saved_tensors
        grad_input, grad_target = torch.ops.fastops.mse_loss_backward(
            grad_output, input, target, ctx.reduction, list(ctx.needs_input_grad[:2]))
        return (grad_input if ctx.needs_input_grad[0] else None,
                grad_target if ctx.needs_input_grad[1] else None, None)


# ---- functional forms (the signatures of torch.nn.functional) --------------------------------

def _reduction_enum(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    return _Reduction.get_enum(reduction)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """torch.nn.functional.log_softmax on fastops kernels."""
    if dim is None:
        warnings.warn("Implicit dimension choice for log_softmax has been deprecated. "
                      "Change the call to include dim=X as an argument.",
                      stacklevel=_stacklevel)
        dim = 0 if input.dim() in (0, 1, 3) else 1
    if dtype is not None:
        input = input.to(dtype)
    return _ops.log_softmax.default(input, dim)


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
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=2,
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
        weighted = _ops.mse_loss.default(input, target, 0) * weight
        if reduction == "none":
            return weighted
        if reduction == "sum":
            return weighted.sum()
        return weighted.sum() / weight.sum()
    return _ops.mse_loss.default(input, target, _Reduction.get_enum(reduction))
