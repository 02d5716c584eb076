"""Autograd formulas and fake kernels of the fully fused MLP.

torch.ops.fastops.fused_mlp(input, weights, biases, activation, output_activation,
save_for_backward) runs every layer of a small MLP in one kernel call and returns (output,
hidden, out_preact): hidden is a list of the hidden layers' pre-activations, one (N, hidden)
tensor per layer, and out_preact the output layer's (when output_activation is not 'none'),
both kept for backward only when save_for_backward is true. On the CPU a first layer of at most
16 inputs is recomputed by the backward instead (hidden[0] is then an empty tensor).
fused_mlp_backward gives the gradients of the input, of every weight and of every bias in one
call. The op carries a C++ autograd node (csrc/autograd_fused_mlp.cpp); FusedMLPFunction is its
Python twin, which torch.func transforms run.
"""

import torch

from fastops.ops import _dispatch

# The functional `fused_mlp` is left out of __all__: a star import of it into fastops.ops would
# shadow this module's name there. Import it from here (or fastops.functional).
__all__ = ["FusedMLPFunction", "FUSED_MLP_ACTIVATIONS"]

# the activations the fused kernels apply, at torch's default parameters
FUSED_MLP_ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "hardtanh",
                         "hardshrink", "sigmoid", "tanh")

_ops = torch.ops.fastops


def _check_names(activation, output_activation):
    if activation not in FUSED_MLP_ACTIVATIONS:
        raise ValueError(f"fastops.fused_mlp: unknown activation {activation!r}; expected one of "
                         f"{', '.join(FUSED_MLP_ACTIVATIONS)}")
    if output_activation != "none" and output_activation not in FUSED_MLP_ACTIVATIONS:
        raise ValueError(
            f"fastops.fused_mlp: unknown output_activation {output_activation!r}; expected "
            f"'none' or one of {', '.join(FUSED_MLP_ACTIVATIONS)}")


# ---- fake kernels -------------------------------------------------------------------------------

def _dims(input, weights):
    op = "fastops.fused_mlp"
    torch._check(input.dim() == 2, lambda: f"{op}: expected input of shape (N, in_features)")
    torch._check(len(weights) >= 1, lambda: f"{op}: expected at least one weight")
    for i, w in enumerate(weights):
        torch._check(w.dim() == 2 and w.dtype == input.dtype,
                     lambda i=i: f"{op}: expected weights[{i}] 2-D of the input's dtype")
        want = input.shape[1] if i == 0 else weights[i - 1].shape[0]
        torch._check(w.shape[1] == want,
                     lambda i=i, want=want: f"{op}: weights[{i}].size(1) must be {want}")
    return input.shape[0], weights[0].shape[0], weights[-1].shape[0]


# On the CPU a first layer of at most this many inputs is recomputed by the backward and not
# saved (hidden[0] is empty): kFusedMlpRecomputeIn of csrc/fused_mlp_checks.h.
_RECOMPUTE_IN = 16


def _recomputes_z0(input, weights):
    return input.device.type == "cpu" and len(weights) >= 2 and input.shape[1] <= _RECOMPUTE_IN


@torch.library.register_fake("fastops::fused_mlp")
def _fused_mlp_fake(input, weights, biases, activation, output_activation, save_for_backward):
    n, hidden, out = _dims(input, weights)
    y = input.new_empty((n, out))
    saved_hidden = ([input.new_empty((n, hidden)) for _ in weights[1:]] if save_for_backward
                    else [])
    if saved_hidden and _recomputes_z0(input, weights):
        saved_hidden[0] = input.new_empty(0)
    out_preact = (input.new_empty((n, out))
                  if save_for_backward and output_activation != "none" else input.new_empty(0))
    return y, saved_hidden, out_preact


@torch.library.register_fake("fastops::fused_mlp_backward")
def _fused_mlp_backward_fake(grad_output, input, weights, biases, hidden, out_preact, activation,
                             output_activation, output_mask):
    has_bias = any(b is not None for b in biases)
    gi = input.new_empty(input.shape) if output_mask[0] else input.new_empty(0)
    gw = [input.new_empty(w.shape) if output_mask[1] else input.new_empty(0) for w in weights]
    gb = [input.new_empty(w.shape[0]) if output_mask[2] and has_bias else input.new_empty(0)
          for w in weights]
    return gi, gw, gb


# ---- autograd.Function (the op carries the same formula in C++) ---------------------------------

class FusedMLPFunction(torch.autograd.Function):
    """The fused MLP with its own backward.

    apply(activation, output_activation, layers, input, *weights, *biases) returns (output,
    out_preact, *hidden), all but the output non-differentiable (the op's own order is (output,
    hidden, out_preact), hidden a list); the biases are all given or left out.
    A second derivative is not supported (the backward raises when it is recorded).
    """

    @staticmethod
    def forward(activation, output_activation, layers, input, *params):
        weights, biases = list(params[:layers]), list(params[layers:])
        out, hidden, out_preact = _ops.fused_mlp(input, weights, biases, activation,
                                                 output_activation, True)
        return (out, out_preact, *hidden)

    @staticmethod
    def setup_context(ctx, inputs, output):
        activation, output_activation, layers, input, *params = inputs
        _, out_preact, *hidden = output
        ctx.mark_non_differentiable(out_preact, *hidden)
        ctx.set_materialize_grads(False)
        ctx.names = (activation, output_activation)
        ctx.layers = layers
        ctx.save_for_backward(input, *params, out_preact, *hidden)

    @staticmethod
    def backward(ctx, grad_output, _grad_out_preact, *_grad_hidden):
        need = ctx.needs_input_grad
        layers = ctx.layers
        n_bias = len(need) - 4 - layers
        mask = [need[3], any(need[4:4 + layers]), any(need[4 + layers:])]
        none = (None,) * len(need)
        if grad_output is None or not any(mask):
            return none
        # a second derivative (through fused_mlp_backward, which has none) raises when taken
        input, *rest = ctx.saved_tensors
        weights, biases = rest[:layers], rest[layers:len(need) - 4]
        out_preact, hidden = rest[len(need) - 4], rest[len(need) - 3:]
        gi, gw, gb = _ops.fused_mlp_backward(grad_output, input, weights, biases, hidden,
                                             out_preact, *ctx.names, mask)
        grads = [None, None, None, gi if mask[0] else None]
        grads += [g if n else None for g, n in zip(gw, need[4:4 + layers])]
        grads += [g if n else None for g, n in zip(gb[:n_bias], need[4 + layers:])]
        return tuple(grads)


def _transforms_impl(input, weights, biases, activation, output_activation, save_for_backward):
    given = [b for b in biases if b is not None]
    out, out_preact, *hidden = FusedMLPFunction.apply(activation, output_activation, len(weights),
                                                      input, *weights, *given)
    return out, hidden, out_preact


_dispatch.transforms_use("fused_mlp", _transforms_impl)


# ---- functional form ----------------------------------------------------------------------------

def fused_mlp(input, weights, biases=None, activation="relu", output_activation="none"):
    """A whole MLP in one fused op: for l < L-1, x = activation(x W_l^T + b_l), then
    output_activation(x W_{L-1}^T + b_{L-1}); every hidden layer of one width.

    input (*, in_features); weights: L tensors (out_l, in_l) as nn.Linear's; biases: None, or L
    tensors (out_l,) (or all None). activation: relu, leaky_relu, elu, gelu, gelu_tanh,
    hardtanh, hardshrink, sigmoid or tanh, at torch's default parameters; output_activation:
    'none' or one of those. The same values as the nn.Sequential of those Linear and activation
    modules; not twice differentiable.
    """
    if activation not in FUSED_MLP_ACTIVATIONS or (
            output_activation != "none" and output_activation not in FUSED_MLP_ACTIVATIONS):
        _check_names(activation, output_activation)
    if biases is None:
        biases = ()
    dim = input.dim()
    if dim == 2:
        x = input
    elif dim == 0:
        raise ValueError("fastops.fused_mlp: expected input of shape (*, in_features), got a "
                         "0-d tensor")
    else:
        x = input.reshape(-1, input.shape[-1])
    # the pre-activations are kept only when a gradient will be asked for (a plain loop: this
    # runs on every call of a small net, where microseconds count)
    save = False
    if torch.is_grad_enabled():
        save = input.requires_grad
        for t in (*weights, *biases):
            if save:
                break
            save = t is not None and t.requires_grad
    out = _ops.fused_mlp.default(x, weights, biases, activation, output_activation, save)[0]
    if dim != 2:
        out = out.reshape(*input.shape[:-1], out.shape[-1])
    return out
