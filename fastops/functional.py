"""Drop-in twins of torch.nn.functional: same names, signatures and defaults, fastops kernels.

`inplace=True` is accepted for compatibility; the result is computed out of place and returned
(the input is left unchanged), which is what code that uses the return value sees anyway.

The activations call their ops directly: the ops carry the autograd formulas of their
autograd.Function classes (fastops.ops.*Function), and skipping Function.apply saves a layer of
Python per call.
"""

import torch

from fastops.ops.fused_mlp import fused_mlp
from fastops.ops.linear import linear, linear_act
from fastops.ops.linear_cross_entropy import linear_cross_entropy
from fastops.ops.losses import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    l1_loss,
    log_softmax,
    mse_loss,
    nll_loss,
    softmax,
)
from fastops.ops.margin_losses import hinge_embedding_loss, multi_margin_loss

_ops = torch.ops.fastops

__all__ = [
    "linear", "linear_act", "fused_mlp", "relu", "elu", "gelu", "prelu", "hardtanh",
    "leaky_relu", "rrelu", "sigmoid", "tanh", "hardshrink", "maxout", "log_softmax", "softmax",
    "nll_loss",
    "cross_entropy", "mse_loss", "l1_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "hinge_embedding_loss", "multi_margin_loss",
    "linear_cross_entropy",
]


def relu(input, inplace=False):
    return _ops.relu.default(input)


def elu(input, alpha=1.0, inplace=False):
    return _ops.elu.default(input, float(alpha))


def gelu(input, approximate="none"):
    if approximate == "none":
        return _ops.gelu.default(input)
    if approximate == "tanh":
        return _ops.gelu_tanh.default(input)
    raise ValueError(f"fastops.gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def prelu(input, weight):
    return _ops.prelu.default(input, weight)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    if min_val > max_val:
        raise ValueError(f"fastops.hardtanh: min_val ({min_val}) cannot be greater than "
                         f"max_val ({max_val})")
    return _ops.hardtanh.default(input, float(min_val), float(max_val))


def leaky_relu(input, negative_slope=0.01, inplace=False):
    return _ops.leaky_relu.default(input, float(negative_slope))


def rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    """Training: a slope per element where input <= 0, drawn uniformly from [lower, upper] from
    the default generator of input's device (torch.manual_seed reproduces it); autograd keeps a
    bit per element and 16 bytes of seed. Evaluation: leaky_relu with slope (lower + upper) / 2.
    The exact draw is documented in csrc/rrelu.h."""
    return _ops.rrelu.default(input, float(lower), float(upper), bool(training))


def sigmoid(input):
    return _ops.sigmoid.default(input)


def tanh(input):
    return _ops.tanh.default(input)


def hardshrink(input, lambd=0.5):
    return _ops.hardshrink.default(input, float(lambd))


def maxout(input, pool_size):
    """Maxout over dim 1: output channel j is the max of input channels j*k .. j*k+k-1,
    k = pool_size. (N, C, *) -> (N, C // k, *)."""
    return _ops.maxout.default(input, int(pool_size))
