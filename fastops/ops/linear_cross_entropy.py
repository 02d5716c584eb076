"""The fused linear + cross entropy: fake kernels, the autograd.Function twin of its C++ node
and the functional form, a drop-in for torch's F.linear_cross_entropy.

The (N, V) logits are never stored: the kernels compute them tile by tile, reduce them to one
log-sum-exp per row and, for reductions mean and sum under autograd, compute the gradients in
the same pass (csrc/cpu/linear_cross_entropy.cpp, csrc/autograd_linear_cross_entropy.cpp).
"""

import torch
from torch.nn import _reduction as _Reduction

from fastops.ops import _dispatch

__all__ = ["LinearCrossEntropyFunction", "linear_cross_entropy"]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastops::linear_cross_entropy")
def _linear_cross_entropy_fake(input, weight, bias, target, class_weight, reduction,
                               ignore_index, label_smoothing, z_loss, softcap, with_grad):
    torch._check(input.dim() == 2 and weight.dim() == 2,
                 lambda: "fastops.linear_cross_entropy: expected 2-D input and weight")
    n, h = input.shape
    v = weight.shape[0]
    grads = with_grad and reduction != 0
    loss = input.new_empty((n,) if reduction == 0 else ())
    lse = input.new_empty((n,), dtype=_acc_dtype(input.dtype))
    gi = input.new_empty((n, h) if grads else (0,))
    gw = input.new_empty((v, h) if grads else (0,))
    gb = input.new_empty((v,) if grads and bias is not None else (0,))
    return loss, lse, gi, gw, gb


@torch.library.register_fake("fastops::linear_cross_entropy_backward")
def _linear_cross_entropy_backward_fake(grad_loss, input, weight, bias, target, class_weight,
                                        lse, reduction, ignore_index, label_smoothing, z_loss,
                                        softcap, output_mask):
    n, h = input.shape
    v = weight.shape[0]
    return (input.new_empty((n, h) if output_mask[0] else (0,)),
            input.new_empty((v, h) if output_mask[1] else (0,)),
            input.new_empty((v,) if output_mask[2] and bias is not None else (0,)))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """fastops::linear_cross_entropy with its own backward (what torch.func transforms run).
    apply(input, weight, bias, target, class_weight, reduction, ignore_index, label_smoothing,
    z_loss, softcap, with_grad) -> (loss, lse, grad_input, grad_weight, grad_bias), the last
    three empty: this form recomputes the logit tiles in its backward. First order only: the
    backward op has no derivative (differentiating it raises)."""

    @staticmethod
    def forward(input, weight, bias, target, class_weight, reduction, ignore_index,
                label_smoothing, z_loss, softcap, with_grad):
        return torch.ops.fastops.linear_cross_entropy(input, weight, bias, target, class_weight,
                                                      reduction, ignore_index, label_smoothing,
                                                      z_loss, softcap, False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, weight, bias, target, class_weight, reduction, ignore_index, label_smoothing,
         z_loss, softcap, _) = inputs
        _, lse, gi, gw, gb = output
        ctx.mark_non_differentiable(lse, gi, gw, gb)
        ctx.args = (reduction, ignore_index, label_smoothing, z_loss, softcap)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, bias, target, class_weight, lse)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        none = (None,) * 11
        if grad_loss is None:
            return none
        input, weight, bias, target, class_weight, lse = ctx.saved_tensors
        if ctx.needs_input_grad[4]:
            raise RuntimeError("fastops.linear_cross_entropy is not differentiable with respect "
                               "to argument 'class_weight'")
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        gi, gw, gb = torch.ops.fastops.linear_cross_entropy_backward(
            grad_loss, input, weight, bias, target, class_weight, lse, *ctx.args, mask)
        gt = None
        if ctx.needs_input_grad[3]:
            gt = _soft_target_grad(grad_loss, input, weight, bias, class_weight, lse, *ctx.args)
        return (gi if mask[0] else None, gw if mask[1] else None,
                gb if mask[2] else None, gt) + none[4:]


def _soft_target_grad(grad_loss, input, weight, bias, class_weight, lse, reduction,
                      ignore_index, label_smoothing, z_loss, softcap):
    """-(1 - label_smoothing) w_c log p_c, scaled: the gradient of a probability target (it has
    the target's N x V size, so the logits are recomputed)."""
    acc = lse.dtype
    z = torch.nn.functional.linear(input.to(acc), weight.to(acc),
                                   None if bias is None else bias.to(acc))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    g = (z - lse.unsqueeze(1)) * (label_smoothing - 1.0)
    if class_weight is not None:
        g = g * class_weight.to(acc)
    gl = grad_loss.to(acc)
    g = g * (gl.unsqueeze(1) if reduction == 0 else gl / input.shape[0] if reduction == 1 else gl)
    return g.to(input.dtype)


_dispatch.transforms_use("linear_cross_entropy", LinearCrossEntropyFunction.apply)


def _fused(input, weight, target, bias, class_weight, reduction, ignore_index, label_smoothing,
           z_loss, softcap):
    return torch.ops.fastops.linear_cross_entropy(
        input, weight, bias, target, class_weight, reduction, ignore_index,
        float(label_smoothing), float(z_loss), float(softcap), False)[0]


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0, options=None,
                         z_loss=0.0, logit_softcap=None):
    """cross_entropy(linear(input, linear_weight, linear_bias), target, ...) without the logits
    in memory; torch's F.linear_cross_entropy signature and semantics.

    input: (H,) or (N, H), like torch; fastops also takes (N, d1.., H) (the rows flattened,
    target (N, d1..) of class indices or (N, d1.., V) of probabilities). linear_weight (V, H), or
    (V, d1.., dK, H) for torch's K-dimensional loss. target: class indices (int64) or class
    probabilities (target.shape == the logits' shape). options (torch's
    LinearCrossEntropyOptions) is accepted and ignored: the kernel always works tile by tile.

    Extras, off by default: z_loss, the coefficient of PaLM's z-loss (z_loss * lse^2 added per
    non-ignored row, reduced like the loss), and logit_softcap, Gemma 2's soft cap
    (c * tanh(z / c) applied to the logits before the softmax)."""
    red = _Reduction.get_enum(reduction)
    if red not in (0, 1, 2):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    softcap = 0.0 if logit_softcap is None else float(logit_softcap)
    if softcap < 0 or (logit_softcap is not None and softcap == 0):
        raise ValueError(f"fastops.linear_cross_entropy: logit_softcap must be > 0 or None, "
                         f"got {logit_softcap}")
    if input.dim() < 1:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError("expected linear_weight with dimensionality at least 2, got "
                           f"{linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, got "
                           f"{tuple(linear_bias.shape)}")
    batch = tuple(input.shape[:-1])
    if out_features and len(batch) != 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
            f"requires batched input, (N, {in_features}), got input with shape "
            f"{tuple(input.shape)}")
    logits_shape = (*batch, num_classes, *out_features)
    soft = tuple(target.shape) == logits_shape
    if soft and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    args = (weight, red, ignore_index, label_smoothing, z_loss, softcap)
    if out_features:
        return _k_dim(input, linear_weight, target, linear_bias, soft, *args)

    if not soft and tuple(target.shape) != batch:
        raise RuntimeError(f"expected a class-index target of shape {batch} (the input's shape "
                           f"without in_features) or class probabilities of shape {logits_shape},"
                           f" got {tuple(target.shape)}")
    x = input.reshape(-1, in_features)
    rows = x.shape[0]
    t = target.reshape(rows, num_classes) if soft else target.reshape(rows)
    loss = _fused(x, linear_weight, t, linear_bias, *args)
    return loss.reshape(batch) if red == 0 else loss


def _k_dim(input, linear_weight, target, linear_bias, soft, class_weight, red, ignore_index,
           label_smoothing, z_loss, softcap):
    """torch's K-dimensional loss: logits (N, V, d1..dK), a softmax over V at each of the
    S = d1*..*dK positions, each position its own (V, H) slice of the weight."""
    n, v = input.shape[0], linear_weight.shape[0]
    positions = linear_weight.shape[1:-1]
    s_count = 1
    for d in positions:
        s_count *= d
    w = linear_weight.reshape(v, s_count, input.shape[-1])
    b = None if linear_bias is None else linear_bias.reshape(v, s_count)
    t = target.reshape(n, v, s_count) if soft else target.reshape(n, s_count)
    per = [_fused(input, w[:, s], t[:, :, s] if soft else t[:, s],
                  None if b is None else b[:, s], class_weight, 0, ignore_index, label_smoothing,
                  z_loss, softcap) for s in range(s_count)]
    loss = torch.stack(per, 1)  # (N, S)
    if red == 0:
        return loss.reshape(n, *positions)
    total = loss.sum()
    if red == 2:
        return total
    if soft:
        return total / (n * s_count)
    keep = t != ignore_index
    if class_weight is None:
        return total / keep.sum()
    return total / class_weight[t.clamp(0, v - 1)].masked_fill(~keep, 0).sum()
