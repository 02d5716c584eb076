"""Models built from fastops modules, each with a plain torch.nn twin of the same architecture.

Every model takes ``backend="fastops"`` (fastops.nn modules; a Linear followed by a
parameter-free activation is one fused LinearAct) or ``backend="torch"`` (torch.nn only). Both
have the same parameter names and shapes, so a state_dict moves between them unchanged, and
``model.twin("torch")`` gives the other one with the same weights.

- MLP(in_features, hidden_sizes, out_features, activation="relu", dropout=0.0, fused=False)
- LinearRegression(in_features, out_features=1)
- MaxoutNet(in_features, hidden_sizes, out_features, pool_size=2, dropout=0.0)
- GAN(data_dim=2, latent_dim=2, hidden_sizes=(128, 128), loss="bce"): a generator and a
  discriminator MLP with one logit and binary cross entropy; loss="ce" gives the discriminator
  two logits and cross entropy, loss="wgan-gp" makes it a critic with a gradient penalty
"""

import torch
import torch.nn.functional as _torch_functional
from torch import nn as tnn

from fastops import functional as _fastops_functional
from fastops import nn as fnn

__all__ = [
    "BACKENDS", "ACTIVATIONS", "MLP", "LinearRegression", "MaxoutNet", "GAN", "TorchMaxout",
    "functional", "check_backend",
]

BACKENDS = ("fastops", "torch")


class TorchMaxout(tnn.Module):
    """Maxout in plain torch, grouping channels as fastops.nn.Maxout does: output channel j is
    the max of input channels j*k .. j*k+k-1. (torch.nn has no Maxout.)"""

    def __init__(self, pool_size):
        super().__init__()
        if int(pool_size) < 1:
            raise ValueError(f"Maxout: pool_size must be positive, got {pool_size}")
        self.pool_size = int(pool_size)

    def forward(self, input):
        return input.unflatten(1, (-1, self.pool_size)).amax(dim=2)

    def extra_repr(self):
        return f"pool_size={self.pool_size}"


# activation name -> (torch.nn class, fastops.nn class, fusable into LinearAct). Both classes
# take the same keyword arguments. prelu is left unfused: its slope would move from the
# activation module into LinearAct.act_weight and the state_dict keys would no longer match
# the torch twin's.
ACTIVATIONS = {
    "none": (tnn.Identity, tnn.Identity, False),
    "relu": (tnn.ReLU, fnn.ReLU, True),
    "elu": (tnn.ELU, fnn.ELU, True),
    "gelu": (tnn.GELU, fnn.GELU, True),
    "hardtanh": (tnn.Hardtanh, fnn.Hardtanh, True),
    "leaky_relu": (tnn.LeakyReLU, fnn.LeakyReLU, True),
    "sigmoid": (tnn.Sigmoid, fnn.Sigmoid, True),
    "tanh": (tnn.Tanh, fnn.Tanh, True),
    "hardshrink": (tnn.Hardshrink, fnn.Hardshrink, True),
    "prelu": (tnn.PReLU, fnn.PReLU, False),
    # random slopes in training: fastops and torch draw different ones (the same distribution)
    "rrelu": (tnn.RReLU, fnn.RReLU, False),
    "maxout": (TorchMaxout, fnn.Maxout, True),
}


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def functional(backend):
    """The functional module of a backend: fastops.functional or torch.nn.functional."""
    return _fastops_functional if check_backend(backend) == "fastops" else _torch_functional


def _linear(backend, in_features, out_features):
    cls = fnn.Linear if backend == "fastops" else tnn.Linear
    return cls(in_features, out_features)


class _Twin(tnn.Module):
    """Base of the models: remembers its constructor arguments so that twin() can build the
    same architecture on the other backend."""

    def __init__(self, backend, config):
        super().__init__()
        self.backend = check_backend(backend)
        self._config = dict(config)

    def twin(self, backend=None):
        """The same model built with `backend` (default: the other one), with this model's
        weights copied in, on the same device and dtype."""
        if backend is None:
            backend = "torch" if self.backend == "fastops" else "fastops"
        other = type(self)(**self._config, backend=backend)
        ref = next(self.parameters(), None)
        if ref is not None:
            other.to(device=ref.device, dtype=ref.dtype)
        other.load_state_dict(self.state_dict())
        other.train(self.training)
        return other


def _mlp_layers(backend, in_features, hidden_sizes, out_features, activation, act_kwargs,
                dropout, fuse):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    torch_act, fastops_act, fusable = ACTIVATIONS[activation]
    act_cls = fastops_act if backend == "fastops" else torch_act
    act_kwargs = dict(act_kwargs or {})
    # maxout takes the max over groups of pool_size units, so its Linear is that much wider
    widen = 1
    if activation == "maxout":
        act_kwargs.setdefault("pool_size", 2)
        widen = int(act_kwargs["pool_size"])
    layers = []
    width_in = in_features
    for width in hidden_sizes:
        if backend == "fastops" and fuse and fusable:
            layers.append(fnn.LinearAct(width_in, width * widen, activation=activation,
                                        **act_kwargs))
            # keeps the index of each Linear, hence the state_dict keys, those of the twin
            layers.append(tnn.Identity())
        else:
            layers.append(_linear(backend, width_in, width * widen))
            layers.append(act_cls(**act_kwargs))
        if dropout:
            layers.append(tnn.Dropout(dropout))
        width_in = width
    layers.append(_linear(backend, width_in, out_features))
    return tnn.Sequential(*layers)


def _fused_mlp(in_features, hidden_sizes, out_features, activation, act_kwargs, dropout):
    """The FusedMLP of an MLP, or a ValueError saying why it has none."""
    kwargs = dict(act_kwargs or {})
    name = activation
    if activation == "gelu" and kwargs.get("approximate", "none") == "tanh":
        name = "gelu_tanh"
    kwargs.pop("approximate", None)
    from fastops.ops.fused_mlp import FUSED_MLP_ACTIVATIONS

    why = None
    if len(set(hidden_sizes)) > 1:
        why = f"hidden layers of one width, got {list(hidden_sizes)}"
    elif name not in FUSED_MLP_ACTIVATIONS:
        why = (f"one of the activations {', '.join(FUSED_MLP_ACTIVATIONS)}, got "
               f"{activation!r}")
    elif kwargs:
        why = f"the activation at its default parameters, got {kwargs}"
    elif dropout:
        why = f"no dropout, got dropout={dropout}"
    if why is not None:
        raise ValueError(f"MLP(fused=True) needs {why}")
    hidden = hidden_sizes[0] if hidden_sizes else 0
    return fnn.FusedMLP(in_features, out_features, hidden, len(hidden_sizes), activation=name)


class MLP(_Twin):
    """in_features -> hidden_sizes[0] -> ... -> out_features, `activation` after each hidden
    Linear (by name: none, relu, elu, gelu, hardtanh, leaky_relu, sigmoid, tanh, prelu,
    maxout), then Dropout(dropout) if dropout > 0. act_kwargs go to the activation module
    (alpha, approximate, min_val/max_val, negative_slope, num_parameters/init for prelu,
    pool_size for maxout: default 2). The output is the raw last Linear (logits).

    fused=True (fastops backend): the whole MLP is one fastops.nn.FusedMLP (one kernel per
    pass), with the same state_dict; it needs hidden layers of one width, an activation that
    FusedMLP runs at its default parameters and no dropout. The torch backend ignores it."""

    def __init__(self, in_features, hidden_sizes, out_features, activation="relu", dropout=0.0,
                 act_kwargs=None, fuse=True, backend="fastops", fused=False):
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        super().__init__(backend, dict(
            in_features=in_features, hidden_sizes=hidden_sizes, out_features=out_features,
            activation=activation, dropout=dropout, act_kwargs=act_kwargs, fuse=fuse,
            fused=fused))
        self.activation = activation
        if fused and backend == "fastops":
            self.layers = _fused_mlp(in_features, hidden_sizes, out_features, activation,
                                     act_kwargs, dropout)
        else:
            self.layers = _mlp_layers(backend, in_features, hidden_sizes, out_features,
                                      activation, act_kwargs, dropout, fuse)

    def forward(self, x):
        return self.layers(x)


class MaxoutNet(MLP):
    """An MLP of maxout units (Goodfellow et al., 2013): each hidden layer is a Linear to
    pool_size * width units and a max over groups of pool_size."""

    def __init__(self, in_features, hidden_sizes, out_features, pool_size=2, dropout=0.0,
                 fuse=True, backend="fastops"):
        super().__init__(in_features, hidden_sizes, out_features, activation="maxout",
                         dropout=dropout, act_kwargs={"pool_size": pool_size}, fuse=fuse,
                         backend=backend)
        self._config = dict(in_features=in_features, hidden_sizes=tuple(hidden_sizes),
                            out_features=out_features, pool_size=pool_size, dropout=dropout,
                            fuse=fuse)


class LinearRegression(_Twin):
    """y = x W^T + b: one Linear(in_features, out_features)."""

    def __init__(self, in_features, out_features=1, backend="fastops"):
        super().__init__(backend, dict(in_features=in_features, out_features=out_features))
        self.linear = _linear(backend, in_features, out_features)

    def forward(self, x):
        return self.linear(x)


class GAN(_Twin):
    """A generator MLP (latent_dim noise -> data_dim, ReLU) and a discriminator MLP
    (data_dim -> logits, LeakyReLU(0.2)), trained with one of three losses:

    - loss="bce" (the default; Goodfellow et al., 2014, with the non-saturating generator
      loss): the discriminator has one logit, the probability that its input is real, and
      both players train with binary cross entropy on that logit (BCEWithLogits):

          loss_D = BCE(D(real), 1) + BCE(D(G(z)), 0)    loss_G = BCE(D(G(z)), 1)

    - loss="ce": the discriminator is a two-class classifier (logits: fake, real) and both
      players train with the fused cross entropy:

          loss_D = CE(D(real), 1) + CE(D(G(z)), 0)      loss_G = CE(D(G(z)), 1)

    - loss="wgan-gp" (Gulrajani et al., 2017): the discriminator is a critic with one output and
      no sigmoid, held near 1-Lipschitz by a penalty on its input gradient:

          loss_D = mean D(G(z)) - mean D(real) + gp_weight * mean((|grad D(x_hat)|_2 - 1)^2)
          loss_G = -mean D(G(z))

      at x_hat = eps * real + (1 - eps) * G(z), eps ~ U[0, 1] per sample. The penalty
      differentiates the critic's input gradient, so its backward is a double backward.
    """

    REAL, FAKE = 1, 0
    LOSSES = ("bce", "ce", "wgan-gp")

    def __init__(self, data_dim=2, latent_dim=2, hidden_sizes=(128, 128), loss="bce",
                 gp_weight=10.0, backend="fastops"):
        if loss not in self.LOSSES:
            raise ValueError(f"GAN: loss must be one of {', '.join(self.LOSSES)}, got {loss!r}")
        hidden_sizes = tuple(int(h) for h in hidden_sizes)
        super().__init__(backend, dict(data_dim=data_dim, latent_dim=latent_dim,
                                       hidden_sizes=hidden_sizes, loss=loss, gp_weight=gp_weight))
        self.latent_dim = latent_dim
        self.loss = loss
        self.gp_weight = float(gp_weight)
        self.generator = MLP(latent_dim, hidden_sizes, data_dim, activation="relu",
                             backend=backend)
        self.discriminator = MLP(data_dim, hidden_sizes, 2 if loss == "ce" else 1,
                                 activation="leaky_relu", act_kwargs={"negative_slope": 0.2},
                                 backend=backend)

    def forward(self, z):
        return self.generator(z)

    def sample(self, n, generator=None):
        """n generated points (no gradient), from noise drawn with `generator`."""
        ref = next(self.generator.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=ref.dtype)
        with torch.no_grad():
            return self.generator(z.to(ref.device))

    def _targets(self, n, label, device):
        return torch.full((n,), label, dtype=torch.long, device=device)

    def _classify(self, x, label):
        """The discriminator's loss for calling the points x `label` (REAL or FAKE)."""
        logits = self.discriminator(x)
        if self.loss == "bce":
            bce = functional(self.backend).binary_cross_entropy_with_logits
            return bce(logits.squeeze(1), torch.full((len(x),), float(label), dtype=logits.dtype,
                                                     device=logits.device))
        ce = functional(self.backend).cross_entropy
        return ce(logits, self._targets(len(x), label, x.device))

    def discriminator_loss(self, real, fake, eps=None):
        """The discriminator's (critic's) loss on a batch of real and one of generated points
        (detached from the generator). eps: the wgan-gp interpolation weights, one per sample
        (default: drawn from U[0, 1])."""
        if self.loss == "wgan-gp":
            wasserstein, penalty = self.critic_terms(real, fake, eps)
            return penalty - wasserstein
        return self._classify(real, self.REAL) + self._classify(fake, self.FAKE)

    def critic_terms(self, real, fake, eps=None):
        """wgan-gp: (the critic's estimate of the Wasserstein distance, mean D(real) -
        mean D(fake); the gradient penalty). The critic's loss is penalty - estimate."""
        wasserstein = self.discriminator(real).mean() - self.discriminator(fake).mean()
        return wasserstein, self.gradient_penalty(real, fake, eps)

    def gradient_penalty(self, real, fake, eps=None):
        """gp_weight * mean((|grad_x D(x)|_2 - 1)^2) at x = eps * real + (1 - eps) * fake."""
        if eps is None:
            eps = torch.rand(len(real), *(1,) * (real.dim() - 1), dtype=real.dtype,
                             device=real.device)
        x_hat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
        # create_graph: the penalty is a function of this gradient, and its own gradient with
        # respect to the critic's weights runs backward through the backward
        (grad,) = torch.autograd.grad(self.discriminator(x_hat).sum(), x_hat, create_graph=True)
        norm = grad.flatten(1).norm(2, dim=1)
        mse = functional(self.backend).mse_loss
        return self.gp_weight * mse(norm, torch.ones_like(norm))

    def generator_loss(self, fake):
        if self.loss == "wgan-gp":
            return -self.discriminator(fake).mean()
        # the non-saturating loss: G maximises log D(G(z)) rather than minimising log(1 - D)
        return self._classify(fake, self.REAL)
