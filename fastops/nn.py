"""Drop-in twins of torch.nn modules. Each subclasses its torch.nn twin, so it takes the same
constructor arguments, has the same parameters and buffers (a torch state_dict loads unchanged)
and prints the same; only forward runs fastops kernels.

`convert(model)` swaps the torch.nn modules of an existing model for these, in place, keeping
the very same parameter objects, and fuses each Linear followed by a parameter-free activation
into one LinearAct; with fuse_mlp=True it first turns every nn.Sequential that is a whole small
MLP into one FusedMLP.
"""

import copy

import torch
from torch import nn as _nn

from fastops import functional as F

__all__ = [
    "Linear", "LinearAct", "ReLU", "ELU", "GELU", "PReLU", "Hardtanh", "Maxout", "LeakyReLU",
    "RReLU", "Sigmoid", "Tanh", "Hardshrink", "LogSoftmax", "Softmax", "NLLLoss",
    "CrossEntropyLoss", "MSELoss", "L1Loss", "BCELoss", "BCEWithLogitsLoss",
    "HingeEmbeddingLoss", "MultiMarginLoss", "FusedMLP", "LinearCrossEntropyLoss", "split_head",
    "convert",
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


def _activation_module(name):
    """The torch.nn module of a fused-MLP activation name, at torch's defaults."""
    if name == "gelu_tanh":
        return _nn.GELU(approximate="tanh")
    return _MLP_ACTIVATION_MODULES[name]()


_MLP_ACTIVATION_MODULES = {
    "relu": _nn.ReLU, "leaky_relu": _nn.LeakyReLU, "elu": _nn.ELU, "gelu": _nn.GELU,
    "hardtanh": _nn.Hardtanh, "hardshrink": _nn.Hardshrink, "sigmoid": _nn.Sigmoid,
    "tanh": _nn.Tanh,
}


def _mlp_activation_name(module):
    """The fused-MLP name of an activation module at torch's default parameters, else None."""
    for name in (*_MLP_ACTIVATION_MODULES, "gelu_tanh"):
        ref = _activation_module(name)
        if type(module) in (type(ref), _TWINS.get(type(ref))) and (
                module.extra_repr() == ref.extra_repr()):
            return name
    return None


class FusedMLP(_nn.Module):
    """A whole MLP in one fused op per pass (fastops.functional.fused_mlp):

        Linear(in, hidden) act [Linear(hidden, hidden) act] x (hidden_layers - 1)
        Linear(hidden, out) output_activation

    (hidden_layers=0: one Linear(in, out)). activation: relu, leaky_relu, elu, gelu,
    gelu_tanh, hardtanh, hardshrink, sigmoid or tanh (torch's default parameters);
    output_activation: 'none' or one of those. The Linear layers are submodules named by their
    index in that nn.Sequential, so the state_dict is the Sequential's, key for key, and the
    initial weights drawn from one seed are the same. Not twice differentiable (use
    to_sequential() for that).
    """

    def __init__(self, in_features, out_features, hidden_features=64, hidden_layers=2,
                 activation="relu", output_activation="none", bias=True, device=None,
                 dtype=None):
        super().__init__()
        from fastops.ops.fused_mlp import _check_names

        _check_names(activation, output_activation)
        if hidden_layers < 0:
            raise ValueError(f"FusedMLP: hidden_layers must be >= 0, got {hidden_layers}")
        self.in_features, self.out_features = in_features, out_features
        self.hidden_features, self.hidden_layers = hidden_features, hidden_layers
        self.activation, self.output_activation = activation, output_activation
        self._has_bias = bool(bias)
        widths = [in_features] + [hidden_features] * hidden_layers + [out_features]
        for i in range(len(widths) - 1):
            self.add_module(str(2 * i), _nn.Linear(widths[i], widths[i + 1], bias=bias,
                                                   device=device, dtype=dtype))

    def linears(self):
        return list(self._modules.values())

    def forward(self, input):
        # the parameters straight from each Linear's _parameters (what functional_call swaps
        # too): nn.Module.__getattr__ would cost a microsecond per tensor on every call
        params = [m._parameters for m in self._modules.values()]
        weights = [p["weight"] for p in params]
        biases = [p["bias"] for p in params] if self._has_bias else None
        return F.fused_mlp(input, weights, biases, self.activation, self.output_activation)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"hidden_features={self.hidden_features}, hidden_layers={self.hidden_layers}, "
                f"activation={self.activation!r}, output_activation="
                f"{self.output_activation!r}, bias={self._has_bias}")

    @classmethod
    def from_sequential(cls, seq):
        """The FusedMLP of an nn.Sequential Linear, act, Linear, act, ..., Linear[, out_act]
        (hidden layers of one width, one activation module at its default parameters, all
        Linear layers with a bias or none). It holds the Sequential's very Linear modules: the
        same parameter objects, so an optimizer built before keeps working. Raises ValueError
        when seq is not of that form."""
        spec = _mlp_spec(seq)
        if isinstance(spec, str):
            raise ValueError(f"FusedMLP.from_sequential: {spec}")
        linears, activation, output_activation = spec
        fused = cls.__new__(cls)
        _nn.Module.__init__(fused)
        first, last = linears[0], linears[-1]
        fused.in_features, fused.out_features = first.in_features, last.out_features
        fused.hidden_features = first.out_features if len(linears) > 1 else 0
        fused.hidden_layers = len(linears) - 1
        fused.activation = activation or "relu"
        fused.output_activation = output_activation
        fused._has_bias = first.bias is not None
        for i, lin in enumerate(linears):
            fused.add_module(str(2 * i), lin)
        return fused

    def to_sequential(self):
        """The equivalent torch.nn.Sequential (torch modules), with copies of the parameters."""
        layers = []
        linears = self.linears()
        for i, lin in enumerate(linears):
            plain = copy.deepcopy(lin)
            plain.__class__ = _nn.Linear
            layers.append(plain)
            if i < len(linears) - 1:
                layers.append(_activation_module(self.activation))
        if self.output_activation != "none":
            layers.append(_activation_module(self.output_activation))
        return _nn.Sequential(*layers)


def _mlp_spec(seq):
    """(linears, activation, output_activation) of a Sequential that FusedMLP can run, or a
    string saying why not."""
    mods = list(seq)
    if not mods or not isinstance(mods[0], _nn.Linear):
        return "expected a Sequential that starts with a Linear"
    linears, activation, output_activation = [], None, "none"
    i = 0
    while i < len(mods):
        lin = mods[i]
        if type(lin) not in (_nn.Linear, Linear):
            return f"expected a Linear at index {i}, got {type(lin).__name__}"
        linears.append(lin)
        if i + 1 == len(mods):
            break
        name = _mlp_activation_name(mods[i + 1])
        if name is None:
            return (f"module {i + 1} ({mods[i + 1]}) is not a parameter-free activation at "
                    "its default parameters (relu, leaky_relu, elu, gelu, gelu_tanh, "
                    "hardtanh, hardshrink, sigmoid, tanh)")
        if i + 2 == len(mods):  # the output activation
            output_activation = name
            break
        if activation is not None and name != activation:
            return f"the hidden activations differ ({activation} and {name})"
        activation = name
        i += 2
    widths = {lin.out_features for lin in linears[:-1]}
    if len(widths) > 1:
        return f"the hidden layers have different widths {sorted(widths)}"
    for a, b in zip(linears, linears[1:]):
        if a.out_features != b.in_features:
            return "consecutive Linear layers do not chain"
    if len({lin.bias is None for lin in linears}) > 1:
        return "some Linear layers have a bias and some do not"
    ref = linears[0].weight
    if any(p.dtype != ref.dtype or p.device != ref.device
           for lin in linears for p in lin.parameters()):
        return "the Linear layers differ in dtype or device"
    return linears, activation, output_activation


class LinearCrossEntropyLoss(_nn.Module):
    """A classifier head and its cross entropy in one op: loss(input, target) is
    cross_entropy(linear(input, weight, bias), target) without the (N, num_classes) logits in
    memory (fastops.functional.linear_cross_entropy).

    weight (num_classes, in_features) and bias (num_classes,) are named and initialised as
    nn.Linear's, so an nn.Linear head's state_dict loads unchanged. class_weight (the `weight`
    of nn.CrossEntropyLoss) is a non-persistent buffer: it is a constructor argument, not a
    learnt parameter. logits(input) gives the head's logits for inference.
    """

    def __init__(self, in_features, num_classes, bias=False, class_weight=None,
                 ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 logit_softcap=None, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = _nn.Parameter(torch.empty(num_classes, in_features, **kw))
        if bias:
            self.bias = _nn.Parameter(torch.empty(num_classes, **kw))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.logit_softcap = (label_smoothing, z_loss,
                                                                 logit_softcap)
        self.reset_parameters()

    reset_parameters = _nn.Linear.reset_parameters

    @classmethod
    def from_linear(cls, linear, criterion=None, **kwargs):
        """The fused head of an nn.Linear (sharing its weight and bias objects) and the
        settings of an nn.CrossEntropyLoss (weight, ignore_index, reduction,
        label_smoothing)."""
        if criterion is not None:
            kwargs = {"class_weight": criterion.weight, "ignore_index": criterion.ignore_index,
                      "reduction": criterion.reduction,
                      "label_smoothing": criterion.label_smoothing, **kwargs}
        head = cls.__new__(cls)
        _nn.Module.__init__(head)
        head.in_features, head.num_classes = linear.in_features, linear.out_features
        head.weight = linear.weight
        head.bias = linear.bias
        head.register_buffer("class_weight", kwargs.pop("class_weight", None), persistent=False)
        head.ignore_index = kwargs.pop("ignore_index", -100)
        head.reduction = kwargs.pop("reduction", "mean")
        head.label_smoothing = kwargs.pop("label_smoothing", 0.0)
        head.z_loss = kwargs.pop("z_loss", 0.0)
        head.logit_softcap = kwargs.pop("logit_softcap", None)
        if kwargs:
            raise TypeError(f"LinearCrossEntropyLoss.from_linear: unexpected {sorted(kwargs)}")
        return head

    def forward(self, input, target):
        return F.linear_cross_entropy(
            input, self.weight, target, linear_bias=self.bias, weight=self.class_weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            logit_softcap=self.logit_softcap)

    def logits(self, input):
        z = F.linear(input, self.weight, self.bias)
        if self.logit_softcap is not None:
            z = self.logit_softcap * torch.tanh(z / self.logit_softcap)
        return z

    def extra_repr(self):
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}, reduction={self.reduction!r}")


def split_head(model, name, criterion=None, **kwargs):
    """Use the fused loss in place of a model's final Linear + CrossEntropyLoss.

    The Linear at attribute path `name` (e.g. "fc" or "net.3") is replaced by nn.Identity, so
    model(x) returns the features the head took, and the returned LinearCrossEntropyLoss owns
    the very same weight and bias objects (an optimizer built before keeps working):

        head = fastops.nn.split_head(model, "fc", nn.CrossEntropyLoss())
        loss = head(model(x), y)          # was: nn.CrossEntropyLoss()(model(x), y)
        logits = head.logits(model(x))    # for predictions
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
    if not isinstance(linear, _nn.Linear):
        raise TypeError(f"split_head: {name!r} is a {type(linear).__name__}, not an nn.Linear")
    head = LinearCrossEntropyLoss.from_linear(linear, criterion, **kwargs)
    if leaf.isdigit():
        parent[int(leaf)] = _nn.Identity()
    else:
        setattr(parent, leaf, _nn.Identity())
    return head


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


def _fuse_mlps(model):
    """Every nn.Sequential in model that FusedMLP can run replaced by one; returns model, or its
    replacement when model itself is such a Sequential."""
    if isinstance(model, _nn.Sequential) and not isinstance(_mlp_spec(model), str):
        return FusedMLP.from_sequential(model)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, _nn.Sequential) and not isinstance(_mlp_spec(child), str):
                module._modules[name] = FusedMLP.from_sequential(child)
    return model


def convert(model, fuse=True, fuse_mlp=False):
    """Swap the torch.nn modules of model for their fastops twins, in place, and return it.

    Parameters and buffers stay the very same objects (an optimizer built before keeps
    working; the state_dict keys do not change). With fuse=True, inside every nn.Sequential a
    Linear directly followed by a parameter-free activation becomes one LinearAct and the
    activation's slot becomes nn.Identity. With fuse_mlp=True, first every nn.Sequential of
    Linear and activation modules that FusedMLP can run (see FusedMLP.from_sequential)
    becomes one FusedMLP; when model itself is one, the FusedMLP is returned.
    """
    if fuse_mlp:
        model = _fuse_mlps(model)
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
