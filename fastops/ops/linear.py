"""Autograd formulas and fake kernels of linear and the fused linear + activation.

torch.ops.fastops.linear / linear_act run the forward (the activation is applied as the GEMM
writes its tiles); linear_backward / linear_act_backward give every gradient in one call, with
an output_mask saying which are wanted.

The fused activation is chosen by the name of its torch.nn.functional twin and that op's
keyword arguments; ``activation_params`` turns them into the (op name, a, b) the kernels take.
"""

import torch

# The functional `linear` is left out of __all__: a star import of it into fastops.ops would
# shadow this module's name there. Import it from here (or fastops.functional).
__all__ = [
    "LinearFunction", "LinearActFunction", "linear_act", "activation_params",
    "LINEAR_ACTIVATIONS",
]

# activation -> its keyword arguments (as in torch.nn.functional) with their defaults, in the
# order of the kernels' (a, b). A default of None means the argument is required. gelu is
# special: approximate='none' | 'tanh' picks the op gelu or gelu_tanh. prelu takes its slopes
# from act_weight.
LINEAR_ACTIVATIONS = {
    "relu": (),
    "elu": (("alpha", 1.0),),
    "gelu": (),
    "gelu_tanh": (),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
    "leaky_relu": (("negative_slope", 0.01),),
    "sigmoid": (),
    "tanh": (),
    "hardshrink": (("lambd", 0.5),),
    "prelu": (),
    "maxout": (("pool_size", None),),
}

# keywords torch.nn.functional accepts that change nothing here (the output is always new)
_IGNORED_KWARGS = {"inplace"}


def activation_params(activation, **act_kwargs):
    """(op name, a, b) of a fused activation given as in torch.nn.functional, e.g.
    ``activation_params("elu", alpha=0.5) == ("elu", 0.5, 0.0)`` and
    ``activation_params("gelu", approximate="tanh") == ("gelu_tanh", 0.0, 0.0)``."""
    if not isinstance(activation, str) or activation not in LINEAR_ACTIVATIONS:
        raise ValueError(
            f"fastops.linear_act: unknown activation {activation!r}; expected one of "
            f"{', '.join(LINEAR_ACTIVATIONS)}")
    kwargs = {k: v for k, v in act_kwargs.items() if k not in _IGNORED_KWARGS}
    name = activation
    if activation == "gelu":
        approximate = kwargs.pop("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise ValueError(
                f"fastops.linear_act: gelu approximate must be 'none' or 'tanh', got {approximate!r}")
        name = "gelu" if approximate == "none" else "gelu_tanh"
    params = LINEAR_ACTIVATIONS[activation]
    known = {p for p, _ in params}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"fastops.linear_act: activation {activation!r} got unexpected keyword argument(s) "
            f"{', '.join(unknown)}; it takes {', '.join(sorted(known)) or 'none'}")
    values = []
    for p, default in params:
        v = kwargs.get(p, default)
        if v is None:
            raise TypeError(f"fastops.linear_act: activation {activation!r} needs {p}=")
        values.append(v)
    if activation == "maxout":
        k = values[0]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"fastops.linear_act: maxout pool_size must be a positive int, got {k!r}")
    values = [float(v) for v in values] + [0.0] * (2 - len(values))
    return name, values[0], values[1]


# ---- fake kernels -------------------------------------------------------------------------------

def _check_linear(op, input, weight, bias):
    torch._check(input.dim() >= 1, lambda: f"{op}: expected input of shape (*, in_features), got a 0-d tensor")
    torch._check(weight.dim() == 2, lambda: f"{op}: expected weight of shape (out_features, in_features)")
    torch._check(input.dtype == weight.dtype, lambda: f"{op}: expected weight to have the dtype of input")
    torch._check(input.shape[-1] == weight.shape[1], lambda: (
        f"{op}: expected input.size(-1) to equal in_features = weight.size(1) = {weight.shape[1]}, "
        f"got {input.shape[-1]}"))
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"{op}: expected bias of shape ({weight.shape[0]},)")


def _out_features(activation, a, out_features):
    if activation == "maxout":
        k = int(a)
        torch._check(k >= 1 and out_features % k == 0, lambda: (
            f"fastops.linear_act: maxout needs out_features divisible by pool_size, got "
            f"out_features {out_features} and pool_size {k}"))
        return out_features // k
    return out_features


@torch.library.register_fake("fastops::linear")
def _linear_fake(input, weight, bias):
    _check_linear("fastops.linear", input, weight, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("fastops::linear_backward")
def _linear_backward_fake(grad_output, input, weight, output_mask):
    empty = input.new_empty(0)
    return (input.new_empty(input.shape) if output_mask[0] else empty,
            input.new_empty(weight.shape) if output_mask[1] else input.new_empty(0),
            input.new_empty(weight.shape[0]) if output_mask[2] else input.new_empty(0))


@torch.library.register_fake("fastops::linear_act")
def _linear_act_fake(input, weight, bias, activation, a, b, act_weight, save_preact):
    _check_linear("fastops.linear_act", input, weight, bias)
    n = weight.shape[0]
    out = input.new_empty((*input.shape[:-1], _out_features(activation, a, n)))
    preact = input.new_empty((*input.shape[:-1], n)) if save_preact else input.new_empty(0)
    return out, preact


@torch.library.register_fake("fastops::linear_act_backward")
def _linear_act_backward_fake(grad_output, input, weight, preact, activation, a, b, act_weight,
                              output_mask):
    want_aw = output_mask[3] and activation == "prelu" and act_weight is not None
    return (input.new_empty(input.shape) if output_mask[0] else input.new_empty(0),
            input.new_empty(weight.shape) if output_mask[1] else input.new_empty(0),
            input.new_empty(weight.shape[0]) if output_mask[2] else input.new_empty(0),
            input.new_empty(act_weight.shape) if want_aw else input.new_empty(0))


# ---- autograd.Function classes (the ops carry the same formulas in C++, csrc/autograd.cpp) ---
#
# The functional forms below call the ops directly: their autograd runs in C++.

_ops = torch.ops.fastops


# ---- autograd -----------------------------------------------------------------------------------

class LinearFunction(torch.autograd.Function):
    """y = x W^T + b with its own backward. apply(input, weight, bias); bias may be None."""

    @staticmethod
    def forward(input, weight, bias):
        return torch.ops.fastops.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output):
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2] and ctx.has_bias]
        if grad_output is None or not any(mask):
            return None, None, None
        input, weight = ctx.saved_tensors
        gi, gw, gb = torch.ops.fastops.linear_backward(grad_output, input, weight, mask)
        return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None)


class LinearActFunction(torch.autograd.Function):
    """Fused y = act(x W^T + b) with its own backward.

    apply(input, weight, bias, activation, a, b, act_weight, save_preact) returns
    (output, preact): activation is an op name with its parameters (a, b) as given by
    ``activation_params``; act_weight the PReLU slopes (else None). The pre-activation is kept
    for backward only when save_preact is true (pass whether a gradient will be needed); it is
    returned as a non-differentiable tensor, empty when save_preact is false.
    """

    @staticmethod
    def forward(input, weight, bias, activation, a, b, act_weight, save_preact):
        return torch.ops.fastops.linear_act(input, weight, bias, activation, a, b, act_weight,
                                            save_preact)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, activation, a, b, act_weight, save_preact = inputs
        _, preact = output
        ctx.mark_non_differentiable(preact)
        ctx.set_materialize_grads(False)
        ctx.has_bias = bias is not None
        ctx.activation, ctx.a, ctx.b, ctx.saved_preact = activation, a, b, save_preact
        ctx.save_for_backward(input, weight, preact if save_preact else None, act_weight)

    @staticmethod
    def backward(ctx, grad_output, grad_preact):
        need = ctx.needs_input_grad
        input, weight, preact, act_weight = ctx.saved_tensors
        mask = [need[0], need[1], need[2] and ctx.has_bias,
                need[6] and act_weight is not None]
        if grad_output is None or not any(mask):
            return (None,) * 8
        if not ctx.saved_preact:
            raise RuntimeError(
                "fastops.LinearActFunction: backward needs the pre-activation, but forward ran "
                "with save_preact=False; pass save_preact=True when a gradient is needed")
        gi, gw, gb, gaw = torch.ops.fastops.linear_act_backward(
            grad_output, input, weight, preact, ctx.activation, ctx.a, ctx.b, act_weight, mask)
        return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, gaw if mask[3] else None, None)


# ---- functional forms ---------------------------------------------------------------------------

def linear(input, weight, bias=None):
    """Drop-in for torch.nn.functional.linear: y = input weight^T + bias."""
    return _ops.linear.default(input, weight, bias)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def linear_act(input, weight, bias=None, activation="relu", act_weight=None, **act_kwargs):
    """act(F.linear(input, weight, bias)) in one fused op.

    activation names a torch.nn.functional op: relu, elu (alpha), gelu (approximate),
    hardtanh (min_val, max_val), leaky_relu (negative_slope), sigmoid, tanh, hardshrink (lambd),
    prelu (slopes in act_weight: 1 or out_features elements) or maxout (pool_size: the max over
    groups of pool_size consecutive output features), with that op's keyword arguments.
    """
    name, a, b = activation_params(activation, **act_kwargs)
    if name == "prelu" and act_weight is None:
        raise ValueError("fastops.linear_act: activation 'prelu' needs act_weight (the slopes)")
    if name != "prelu" and act_weight is not None:
        raise ValueError(
            f"fastops.linear_act: act_weight is only used by 'prelu', got activation {activation!r}")
    save = _needs_grad(input, weight, bias, act_weight)
    out, _ = _ops.linear_act.default(input, weight, bias, name, a, b, act_weight, save)
    return out
