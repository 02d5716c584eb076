"""Drop-in twins of torch.nn.functional: same names, signatures and defaults, fastops kernels.

`inplace=True` is accepted for compatibility; the result is computed out of place and returned
(the input is left unchanged), which is what code that uses the return value sees anyway.
"""

from fastops.ops import activations as _act
from fastops.ops.linear import linear, linear_act
from fastops.ops.losses import cross_entropy, log_softmax, mse_loss, nll_loss

__all__ = [
    "linear", "linear_act", "relu", "elu", "gelu", "prelu", "hardtanh", "leaky_relu", "sigmoid",
    "tanh", "hardshrink", "maxout", "log_softmax", "nll_loss", "cross_entropy", "mse_loss",
]


def relu(input, inplace=False):
    return _act.ReLUFunction.apply(input)


def elu(input, alpha=1.0, inplace=False):
    return _act.ELUFunction.apply(input, float(alpha))


def gelu(input, approximate="none"):
    if approximate == "none":
        return _act.GELUFunction.apply(input)
    if approximate == "tanh":
        return _act.GELUTanhFunction.apply(input)
    raise ValueError(f"fastops.gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def prelu(input, weight):
    return _act.PReLUFunction.apply(input, weight)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    if min_val > max_val:
        raise ValueError(f"fastops.hardtanh: min_val ({min_val}) cannot be greater than "
                         f"max_val ({max_val})")
    return _act.HardtanhFunction.apply(input, float(min_val), float(max_val))


def leaky_relu(input, negative_slope=0.01, inplace=False):
    return _act.LeakyReLUFunction.apply(input, float(negative_slope))


def sigmoid(input):
    return _act.SigmoidFunction.apply(input)


def tanh(input):
    return _act.TanhFunction.apply(input)


def hardshrink(input, lambd=0.5):
    return _act.HardshrinkFunction.apply(input, float(lambd))


def maxout(input, pool_size):
    """Maxout over dim 1: output channel j is the max of input channels j*k .. j*k+k-1,
    k = pool_size. (N, C, *) -> (N, C // k, *)."""
    return _act.MaxoutFunction.apply(input, int(pool_size))
