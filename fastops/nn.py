"""Drop-in twins of torch.nn modules. Each subclasses its torch.nn twin, so it takes the same
constructor arguments, has the same parameters and buffers (a torch state_dict loads unchanged)
and prints the same; only forward runs fastops kernels.

`convert(model)` swaps the torch.nn modules of an existing model for these, in place, keeping
the very same parameter objects, and fuses each Linear followed by a parameter-free activation
into one LinearAct.
"""

import torch
from torch import nn as _nn

from fastops import functional as F

__all__ = [
    "Linear", "LinearAct", "ReLU", "ELU", "GELU", "PReLU", "Hardtanh", "Maxout", "LeakyReLU",
    "RReLU", "Sigmoid", "Tanh", "Hardshrink", "LogSoftmax", "Softmax", "NLLLoss",
    "CrossEntropyLoss", "MSELoss", "L1Loss", "BCELoss", "BCEWithLogitsLoss",
    "HingeEmbeddingLoss", "MultiMarginLoss", "convert",
]


class Linear(_nn.Linear):
    def forward(self, input):
        return F.linear(input, self.weight, self.bias)


class ReLU(_nn.ReLU):
    def forward(self, input):
        return F.relu(input)


class ELU(_nn.ELU):
    def forward(self, input):
        return F.elu(input, self.alpha)


class GELU(_nn.GELU):
    def forward(self, input):
        return F.gelu(input, approximate=self.approximate)


class PReLU(_nn.PReLU):
    def forward(self, input):
        return F.prelu(input, self.weight)


class Hardtanh(_nn.Hardtanh):
    def forward(self, input):
        return F.hardtanh(input, self.min_val, self.max_val)


class LeakyReLU(_nn.LeakyReLU):
    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope)


class RReLU(_nn.RReLU):
    def forward(self, input):
        return F.rrelu(input, self.lower, self.upper, self.training, self.inplace)


class Sigmoid(_nn.Sigmoid):
    def forward(self, input):
        return F.sigmoid(input)


class Tanh(_nn.Tanh):
    def forward(self, input):
        return F.tanh(input)


class Hardshrink(_nn.Hardshrink):
    def forward(self, input):
        return F.hardshrink(input, self.lambd)


class Maxout(_nn.Module):
    """Maxout over dim 1 with groups of pool_size channels: (N, C, *) -> (N, C // pool_size, *).
    Placed after a Linear(in, k * out), it gives the maxout unit of Goodfellow et al. (2013)."""

    def __init__(self, pool_size):
        super().__init__()
        if int(pool_size) < 1:
            raise ValueError(f"Maxout: pool_size must be positive, got {pool_size}")
        self.pool_size = int(pool_size)

    def forward(self, input):
        return F.maxout(input, self.pool_size)

    def extra_repr(self):
        return f"pool_size={self.pool_size}"


class LogSoftmax(_nn.LogSoftmax):
    def forward(self, input):
        return F.log_softmax(input, self.dim, _stacklevel=5)


class Softmax(_nn.Softmax):
    def forward(self, input):
        return F.softmax(input, self.dim, _stacklevel=5)


class NLLLoss(_nn.NLLLoss):
    def forward(self, input, target):
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class CrossEntropyLoss(_nn.CrossEntropyLoss):
    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class MSELoss(_nn.MSELoss):
    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)


class L1Loss(_nn.L1Loss):
    def forward(self, input, target):
        return F.l1_loss(input, target, reduction=self.reduction)


class BCELoss(_nn.BCELoss):  # weight: a buffer, as in torch
    def forward(self, input, target):
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_nn.BCEWithLogitsLoss):  # weight and pos_weight: buffers, as in torch
    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight,
                                                  pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class HingeEmbeddingLoss(_nn.HingeEmbeddingLoss):
    def forward(self, input, target):
        return F.hinge_embedding_loss(input, target, margin=self.margin,
                                      reduction=self.reduction)


class MultiMarginLoss(_nn.MultiMarginLoss):
    def forward(self, input, target):
        return F.multi_margin_loss(input, target, p=self.p, margin=self.margin,
                                   weight=self.weight, reduction=self.reduction)


class LinearAct(_nn.Linear):
    """Linear followed by an activation, in one fused op: the bias and the activation are applied
    as the GEMM writes its output, and the backward fuses the activation's derivative with the
    bias gradient. Parameters are those of nn.Linear (weight, bias), plus act_weight for
    activation='prelu' (num_parameters slopes, initialised to init).

    activation: relu, elu, gelu, hardtanh, leaky_relu, sigmoid, tanh, hardshrink, prelu or
    maxout; act_kwargs are the keywords of the matching torch.nn.functional op (alpha,
    approximate, min_val/max_val, negative_slope, lambd) or pool_size for maxout.
    """

    def __init__(self, in_features, out_features, bias=True, activation="relu", device=None,
                 dtype=None, num_parameters=1, init=0.25, **act_kwargs):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation
        self.act_kwargs = dict(act_kwargs)
        if activation == "prelu":
            self.act_weight = _nn.Parameter(
                torch.full((num_parameters,), float(init), device=device, dtype=dtype))
        else:
            self.register_parameter("act_weight", None)

    def forward(self, input):
        return F.linear_act(input, self.weight, self.bias, self.activation,
                            act_weight=self.act_weight, **self.act_kwargs)

    def extra_repr(self):
        kwargs = "".join(f", {k}={v!r}" for k, v in self.act_kwargs.items())
        return f"{super().extra_repr()}, activation={self.activation!r}{kwargs}"


# torch.nn class -> fastops class, for convert(). Subclasses share their parent's __dict__
# layout, so swapping __class__ converts a module in place with its parameters untouched.
_TWINS = {
    _nn.Linear: Linear, _nn.ReLU: ReLU, _nn.ELU: ELU, _nn.GELU: GELU, _nn.PReLU: PReLU,
    _nn.Hardtanh: Hardtanh, _nn.LeakyReLU: LeakyReLU, _nn.RReLU: RReLU, _nn.Sigmoid: Sigmoid,
    _nn.Tanh: Tanh, _nn.Hardshrink: Hardshrink, _nn.LogSoftmax: LogSoftmax, _nn.Softmax: Softmax,
    _nn.NLLLoss: NLLLoss, _nn.CrossEntropyLoss: CrossEntropyLoss, _nn.MSELoss: MSELoss,
    _nn.L1Loss: L1Loss, _nn.BCELoss: BCELoss, _nn.BCEWithLogitsLoss: BCEWithLogitsLoss,
    _nn.HingeEmbeddingLoss: HingeEmbeddingLoss, _nn.MultiMarginLoss: MultiMarginLoss,
}


def _fusable_activation(module):
    """(activation name, act_kwargs) for a parameter-free activation module, else None."""
    if isinstance(module, _nn.ReLU):
        return "relu", {}
    if isinstance(module, _nn.ELU):
        return "elu", {"alpha": module.alpha}
    if isinstance(module, _nn.GELU):
        return "gelu", {"approximate": module.approximate}
    if isinstance(module, _nn.Hardtanh):  # also ReLU6
        return "hardtanh", {"min_val": module.min_val, "max_val": module.max_val}
    if isinstance(module, _nn.LeakyReLU):
        return "leaky_relu", {"negative_slope": module.negative_slope}
    if isinstance(module, _nn.Sigmoid):
        return "sigmoid", {}
    if isinstance(module, _nn.Tanh):
        return "tanh", {}
    if isinstance(module, _nn.Hardshrink):
        return "hardshrink", {"lambd": module.lambd}
    if isinstance(module, Maxout):
        return "maxout", {"pool_size": module.pool_size}
    return None


def _fuse(linear, activation, kwargs):
    fused = LinearAct.__new__(LinearAct)
    fused.__dict__.update(linear.__dict__)  # the same weight and bias objects
    fused.activation = activation
    fused.act_kwargs = kwargs
    fused.register_parameter("act_weight", None)
    return fused


def convert(model, fuse=True):
    """Swap the torch.nn modules of model for their fastops twins, in place, and return it.

    Parameters and buffers stay the very same objects (an optimizer built before keeps
    working; the state_dict keys do not change). With fuse=True, inside every nn.Sequential a
    Linear directly followed by a parameter-free activation becomes one LinearAct and the
    activation's slot becomes nn.Identity.
    """
    for module in model.modules():
        twin = _TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin
    if fuse:
        for module in list(model.modules()):
            if not isinstance(module, _nn.Sequential):
                continue
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                lin, act = module._modules[first], module._modules[second]
                spec = _fusable_activation(act)
                if type(lin) is Linear and spec is not None:
                    module._modules[first] = _fuse(lin, *spec)
                    module._modules[second] = _nn.Identity()
    return model
