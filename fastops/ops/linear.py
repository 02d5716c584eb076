"""Autograd formulas and fake kernels of linear and the fused linear + activation.

torch.ops.fastops.linear / linear_act run the forward (the activation is applied as the GEMM
writes its tiles); linear_backward / linear_act_backward give every gradient in one call, with
an output_mask saying which are wanted.

The fused activation is chosen by the name of its torch.nn.functional twin and that op's
keyword arguments; ``activation_params`` turns them into the (op name, a, b) the kernels take.
"""

import torch

from fastops.ops import _dispatch
from fastops.ops.activations import _maxout_gather

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

def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _rows(t, batch):
    """A batch-first (B, *, n) tensor as (B, rows, n)."""
    return t.reshape(batch, -1, t.shape[-1])


def _batched_linear(x, w, bias):
    """x W^T + b for batch-first x (B, *, in) and weight (B, out, in): per-sample weights
    (ensembles) under vmap, one batched matmul."""
    y = torch.bmm(_rows(x, x.shape[0]), w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])
    if bias is not None:
        y = y + bias.reshape(bias.shape[0], *[1] * (y.dim() - 2), bias.shape[-1])
    return y


def _linear_jvp(input, weight, t_input, t_weight, t_bias):
    """The tangent of x W^T + b: t_x W^T + x t_W^T + t_b (None when no tangent is given)."""
    out = _ops.linear(t_input, weight, t_bias) if t_input is not None else None
    if t_weight is not None:
        out = _add(out, _ops.linear(input, t_weight, None if t_input is not None else t_bias))
    elif t_input is None and t_bias is not None:
        out = t_bias.expand(*input.shape[:-1], weight.shape[0])
    return out


class LinearFunction(torch.autograd.Function):
    """y = x W^T + b with its own backward. apply(input, weight, bias); bias may be None."""

    @staticmethod
    def forward(input, weight, bias):
        return torch.ops.fastops.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
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

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias):
        return _linear_jvp(*ctx.saved_tensors, t_input, t_weight, t_bias)

    @staticmethod
    def vmap(info, in_dims, input, weight, bias):
        x = _dispatch.batch_first(input, in_dims[0], info.batch_size)
        if in_dims[1] is None and in_dims[2] is None:
            return LinearFunction.apply(x, weight, bias), 0
        w = _dispatch.batch_first(weight, in_dims[1], info.batch_size)
        b = None if bias is None else _dispatch.batch_first(bias, in_dims[2], info.batch_size)
        return _batched_linear(x, w, b), 0


class _LinearBackward(torch.autograd.Function):
    """The autograd of linear_backward(grad_output, input, weight, output_mask) ->
    (grad_input = g W, grad_weight = g^T x, grad_bias = sum g), each bilinear, so every
    derivative is again a fastops linear or linear_backward."""

    @staticmethod
    def forward(grad_output, input, weight, output_mask):
        return torch.ops.fastops.linear_backward(grad_output, input, weight, output_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.save_for_forward(*inputs[:3])
        ctx.mask = list(inputs[3])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias):
        g, input, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        gg_input = gg_input if ctx.mask[0] else None
        gg_weight = gg_weight if ctx.mask[1] else None
        gg_bias = gg_bias if ctx.mask[2] else None
        d_g = d_input = d_weight = None
        if need[0]:
            if gg_input is not None:
                d_g = _ops.linear(gg_input, weight, None)
            if gg_weight is not None:
                d_g = _add(d_g, _ops.linear(input, gg_weight, None))
            if gg_bias is not None:
                d_g = _add(d_g, gg_bias.expand(g.shape))
        if need[1] and gg_weight is not None:
            d_input = _ops.linear_backward(g, input, gg_weight, [True, False, False])[0]
        if need[2] and gg_input is not None:
            d_weight = _ops.linear_backward(g, gg_input, weight, [False, True, False])[1]
        return d_g, d_input, d_weight, None

    @staticmethod
    def jvp(ctx, t_g, t_input, t_weight, _):
        g, input, weight = ctx.saved_tensors
        m = ctx.mask
        out = list(_ops.linear_backward(t_g, input, weight, m)) if t_g is not None else [None] * 3
        if t_weight is not None and m[0]:
            out[0] = _add(out[0], _ops.linear_backward(g, input, t_weight, [True, False, False])[0])
        if t_input is not None and m[1]:
            out[1] = _add(out[1], _ops.linear_backward(g, t_input, weight, [False, True, False])[1])
        empty = g.new_empty(0)
        return tuple(o if o is not None and want else (torch.zeros_like(r) if want else empty)
                     for o, want, r in zip(out, m, (input, weight, weight[:, 0])))

    @staticmethod
    def vmap(info, in_dims, grad_output, input, weight, output_mask):
        n = info.batch_size
        g = _dispatch.batch_first(grad_output, in_dims[0], n)
        x = _dispatch.batch_first(input, in_dims[1], n)
        empty = g.new_empty(n, 0)
        gi = gw = gb = empty
        if output_mask[0]:
            if in_dims[2] is None:  # the batch folds into the rows
                gi = _LinearBackward.apply(g, x, weight, [True, False, False])[0]
            else:
                w = _dispatch.batch_first(weight, in_dims[2], n)
                gi = torch.bmm(_rows(g, n), w).reshape(x.shape)
        # per-sample weight and bias gradients: one batched matmul, one sum
        if output_mask[1]:
            gw = torch.bmm(_rows(g, n).transpose(1, 2), _rows(x, n))
        if output_mask[2]:
            gb = _rows(g, n).sum(1)
        return (gi, gw, gb), (0, 0, 0)


_dispatch.transforms_use("linear", LinearFunction.apply)


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
        ctx.save_for_backward(input, weight, preact if save_preact else None, act_weight, bias)
        ctx.save_for_forward(input, weight, act_weight, bias)

    @staticmethod
    def backward(ctx, grad_output, grad_preact):
        need = ctx.needs_input_grad
        input, weight, preact, act_weight, bias = ctx.saved_tensors
        mask = [need[0], need[1], need[2] and ctx.has_bias,
                need[6] and act_weight is not None]
        if grad_output is None or not any(mask):
            return (None,) * 8
        if not ctx.saved_preact:
            raise RuntimeError(
                "fastops.LinearActFunction: backward needs the pre-activation, but forward ran "
                "with save_preact=False; pass save_preact=True when a gradient is needed")
        if torch.is_grad_enabled():
            # a recorded backward differentiates through the pre-activation too, which the
            # saved one (a non-differentiable output) would cut off: recompute it
            preact = _ops.linear(input, weight, bias)
        gi, gw, gb, gaw = torch.ops.fastops.linear_act_backward(
            grad_output, input, weight, preact, ctx.activation, ctx.a, ctx.b, act_weight, mask)
        return (gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, gaw if mask[3] else None, None)

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias, _act, _a, _b, t_act_weight, _save):
        input, weight, act_weight, bias = ctx.saved_tensors
        preact = _ops.linear(input, weight, bias)
        t_preact = _linear_jvp(input, weight, t_input, t_weight, t_bias)
        out = None
        if t_preact is not None and ctx.activation == "maxout":  # the tangent at each argmax
            out = _maxout_gather(_features(t_preact), _features(preact), int(ctx.a))
            out = out.reshape(*preact.shape[:-1], out.shape[-1])
        elif t_preact is not None:  # a diagonal derivative: the backward op is the jvp
            out = _activation_backward(t_preact, preact, ctx.activation, ctx.a, ctx.b, act_weight)
        if t_act_weight is not None:  # prelu: the slopes act where preact <= 0
            out = _add(out, _activation(preact, "prelu", 0.0, 0.0, t_act_weight)
                       - _activation(preact, "relu", 0.0, 0.0, None))
        return out, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, activation, a, b, act_weight, save_preact):
        n = info.batch_size
        x = _dispatch.batch_first(input, in_dims[0], n)
        if all(d is None for d in in_dims[1:]):
            out, preact = LinearActFunction.apply(x, weight, bias, activation, a, b, act_weight,
                                                  save_preact)
            return (out, preact), (0, 0 if save_preact else None)
        # per-sample weights: a batched matmul, then the activation
        w = _dispatch.batch_first(weight, in_dims[1], n)
        bias = None if bias is None else _dispatch.batch_first(bias, in_dims[2], n)
        preact = _batched_linear(x, w, bias)
        if act_weight is not None and in_dims[6] is not None:
            aw = _dispatch.batch_first(act_weight, in_dims[6], n)
            out = torch.stack([_activation(preact[i], activation, a, b, aw[i]) for i in range(n)])
        else:
            out = _activation(preact, activation, a, b, act_weight)
        return (out, preact.detach() if save_preact else preact.new_empty(n, 0)), (0, 0)


_dispatch.transforms_use("linear_act", LinearActFunction.apply)


_dispatch.differentiable("linear_backward", _LinearBackward.apply)


def _features(t):
    """t as (rows, features): the fused activation (prelu slopes, maxout groups) acts over the
    last dim, the output features."""
    return t.reshape(-1, t.shape[-1])


def _act_params(activation, a, b):
    n = len(LINEAR_ACTIVATIONS["gelu" if activation == "gelu_tanh" else activation])
    return (a, b)[:n]


def _activation(preact, activation, a, b, act_weight):
    """act(preact) by the fastops op of the activation."""
    z = _features(preact)
    if activation == "prelu":
        y = _ops.prelu(z, act_weight)
    elif activation == "maxout":
        y = _ops.maxout(z, int(a))
    else:
        y = getattr(_ops, activation)(z, *_act_params(activation, a, b))
    return y.reshape(*preact.shape[:-1], y.shape[-1])


def _activation_backward(grad, preact, activation, a, b, act_weight):
    """grad (output-shaped) times d act / d preact, by the fastops backward op of the
    activation."""
    g, z = _features(grad), _features(preact)
    if activation == "prelu":
        r = _ops.prelu_backward(g, z, act_weight)[0]
    elif activation == "maxout":
        r = _ops.maxout_backward(g, z, int(a))
    else:
        r = getattr(_ops, activation + "_backward")(g, z, *_act_params(activation, a, b))
    return r.reshape(preact.shape)


def _linear_act_backward(grad_output, input, weight, preact, activation, a, b, act_weight,
                         output_mask):
    """linear_act_backward as a composite of differentiable fastops ops: its derivatives (by
    the pre-activation too) are theirs."""
    grad_preact = _activation_backward(grad_output, preact, activation, a, b, act_weight)
    gi, gw, gb = _ops.linear_backward(grad_preact, input, weight, list(output_mask[:3]))
    gaw = grad_output.new_empty(0)
    if output_mask[3]:
        gaw = _ops.prelu_backward(_features(grad_output), _features(preact), act_weight)[1]
    return gi, gw, gb, gaw


_dispatch.differentiable("linear_act_backward", _linear_act_backward)


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
