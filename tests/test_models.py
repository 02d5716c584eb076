"""fastops.models: each model built from fastops modules loads the state_dict of its torch.nn
twin and back, and computes the same outputs and gradients."""

import pytest
import torch
from torch import nn as tnn

from fastops import nn as fnn
from fastops.models import ACTIVATIONS, GAN, MLP, LinearRegression, MaxoutNet, TorchMaxout


def _mlp(activation, **kw):
    return lambda backend: MLP(5, [7, 6], 3, activation=activation, backend=backend, **kw)


BUILDERS = {f"mlp-{a}": _mlp(a) for a in ACTIVATIONS}
BUILDERS.update({
    "mlp-dropout": _mlp("gelu", dropout=0.3, act_kwargs={"approximate": "tanh"}),
    "mlp-elu-alpha": _mlp("elu", act_kwargs={"alpha": 0.5}),
    "mlp-prelu-channels": lambda backend: MLP(5, [7, 7], 3, activation="prelu", backend=backend,
                                              act_kwargs={"num_parameters": 7, "init": 0.1}),
    "mlp-hardtanh-range": _mlp("hardtanh", act_kwargs={"min_val": -0.5, "max_val": 2.0}),
    "mlp-unfused": _mlp("relu", fuse=False),
    "mlp-no-hidden": lambda backend: MLP(5, [], 3, backend=backend),
    "linear-regression": lambda backend: LinearRegression(5, 1, backend=backend),
    "maxout-net": lambda backend: MaxoutNet(5, [4, 6], 3, pool_size=3, backend=backend),
    "gan": lambda backend: GAN(data_dim=5, latent_dim=5, hidden_sizes=(8, 6), backend=backend),
})


def _forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return out.detach(), x.grad, grads


def _assert_same_function(a, b, device):
    torch.manual_seed(1)
    x = torch.randn(9, 5, device=device)
    a.eval(), b.eval()  # dropout off
    out_a, gx_a, g_a = _forward_backward(a, x)
    out_b, gx_b, g_b = _forward_backward(b, x)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(gx_a, gx_b)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], msg=lambda m, k=k: f"grad of {k}: {m}")


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("source", ["torch", "fastops"])
def test_state_dict_moves_between_backends(name, source, device):
    """A state_dict of either backend loads into the other (strict: same keys and shapes), and
    both then compute the same outputs and gradients."""
    target = "fastops" if source == "torch" else "torch"
    torch.manual_seed(0)
    src = BUILDERS[name](source).to(device)
    torch.manual_seed(123)  # different initial weights, so the load has something to do
    dst = BUILDERS[name](target).to(device)
    assert src.state_dict().keys() == dst.state_dict().keys()
    dst.load_state_dict(src.state_dict())
    _assert_same_function(src, dst, device)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_backends_use_their_own_modules(name):
    """The fastops model runs fastops modules only (fused LinearAct where the activation is
    parameter-free); the torch model has no fastops module at all."""
    fast, ref = BUILDERS[name]("fastops"), BUILDERS[name]("torch")
    fastops_classes = tuple(c for c in (getattr(fnn, n) for n in fnn.__all__)
                            if isinstance(c, type))  # (convert and split_head are functions)
    for m in fast.modules():
        if isinstance(m, (tnn.Linear, TorchMaxout)) or type(m) in (
                tnn.ReLU, tnn.ELU, tnn.GELU, tnn.PReLU, tnn.Hardtanh, tnn.LeakyReLU, tnn.Sigmoid,
                tnn.Tanh, tnn.Hardshrink, tnn.RReLU):
            assert isinstance(m, fastops_classes), f"{type(m).__name__} in the fastops model"
    assert not any(isinstance(m, fastops_classes) for m in ref.modules())
    act = name[len("mlp-"):]
    fusable = act in ACTIVATIONS and ACTIVATIONS[act][2]  # prelu, rrelu stay modules
    if fusable and act != "none":
        assert any(isinstance(m, fnn.LinearAct) for m in fast.modules())
    if name == "mlp-unfused" or (act in ACTIVATIONS and not fusable):
        assert not any(isinstance(m, fnn.LinearAct) for m in fast.modules())


def test_mlp_loads_a_hand_built_torch_sequential():
    """The torch twin is nothing exotic: a plain nn.Sequential of the same layers loads into
    the fastops MLP once the `layers.` prefix is added."""
    torch.manual_seed(0)
    plain = tnn.Sequential(tnn.Linear(2, 16), tnn.ReLU(), tnn.Dropout(0.1), tnn.Linear(16, 3))
    model = MLP(2, [16], 3, activation="relu", dropout=0.1)
    model.load_state_dict({f"layers.{k}": v for k, v in plain.state_dict().items()})
    plain.eval(), model.eval()
    x = torch.randn(10, 2)
    torch.testing.assert_close(model(x), plain(x))


@pytest.mark.parametrize("name", ["mlp-relu", "mlp-prelu", "maxout-net", "gan"])
def test_twin_copies_architecture_and_weights(name):
    fast = BUILDERS[name]("fastops")
    ref = fast.twin()
    assert ref.backend == "torch" and type(ref) is type(fast)
    assert ref.twin().backend == "fastops"
    _assert_same_function(fast, ref, "cpu")
    ref_params = dict(ref.named_parameters())
    for k, p in fast.named_parameters():
        assert ref_params[k] is not p  # a copy, not shared
        assert torch.equal(ref_params[k], p)


def test_maxout_twins_group_the_same_channels():
    x = torch.randn(4, 12)
    torch.testing.assert_close(TorchMaxout(3)(x), fnn.Maxout(3)(x))
    torch.testing.assert_close(TorchMaxout(3)(x), x.view(4, 4, 3).amax(-1))


def test_gan_losses_agree_between_backends():
    torch.manual_seed(0)
    fast = GAN(hidden_sizes=(16, 16))
    ref = fast.twin("torch")
    real = torch.randn(32, 2)
    fake = fast.sample(32, generator=torch.Generator().manual_seed(1))
    assert fake.shape == (32, 2) and not fake.requires_grad
    torch.testing.assert_close(fast.discriminator_loss(real, fake),
                               ref.discriminator_loss(real, fake))
    torch.testing.assert_close(fast.generator_loss(fake), ref.generator_loss(fake))
    torch.testing.assert_close(
        fake, ref.sample(32, generator=torch.Generator().manual_seed(1)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP(2, [4], 3, activation="swish")
    with pytest.raises(ValueError, match="backend must be one of"):
        MLP(2, [4], 3, backend="jax")
    with pytest.raises(ValueError, match="pool_size"):
        TorchMaxout(0)
