"""Second-order gradients, forward mode and torch.func transforms of every fastops op, held
against torch on the same inputs.

One table (CASES) names each op with an option set: the fastops call, its torch twin and the
inputs it differentiates. The tests below run it through gradgradcheck (float64), through
double backward against torch, and through the torch.func transforms.
"""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import (
    functional_call,
    grad,
    hessian,
    jacfwd,
    jacrev,
    jvp,
    stack_module_state,
    vjp,
    vmap,
)

import fastops
import fastops.functional as FF
from fastops import nn as fnn
from fastops.ops import linear_act
from test_margin_losses import torch_multi_margin


def torch_maxout(x, k):
    return x.unflatten(1, (-1, k)).amax(2)


def torch_linear_act(act):
    def f(x, w, b=None, aw=None):
        z = F.linear(x, w, b)
        if act == "prelu":
            return F.prelu(z.reshape(-1, z.shape[-1]), aw).reshape(z.shape)
        if act == "maxout":
            return z.unflatten(-1, (-1, 2)).amax(-1)
        return {
            "relu": F.relu,
            "elu": F.elu,
            "gelu": F.gelu,
            "tanh": torch.tanh,
            "sigmoid": torch.sigmoid,
            "leaky_relu": F.leaky_relu,
        }[act](z)

    return f


def fo_linear_act(act):
    def f(x, w, b=None, aw=None):
        kwargs = {"pool_size": 2} if act == "maxout" else {}
        return linear_act(x, w, b, act, act_weight=aw, **kwargs)

    return f


def _pos(shape):
    return lambda g, dev: torch.rand(shape, generator=g, dtype=torch.float64).to(dev) + 0.1


def _randn(*shape):
    # values kept off the kinks of the piecewise-linear ops, where finite differences break
    def make(g, dev):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        return (x + 0.05 * torch.sign(x)).to(dev)

    return make


def _target(shape, classes, ignore=None):
    def make(g, dev):
        t = torch.randint(0, classes, shape, generator=g)
        if ignore is not None:
            t.view(-1)[0] = ignore
        return t.to(dev)

    return make


def _signs(*shape):
    return lambda g, dev: (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dev, torch.float64)


def _unit(*shape):
    # probabilities kept off 0 and 1, where binary_cross_entropy's log clamps
    return lambda g, dev: (0.1 + 0.8 * torch.rand(shape, generator=g, dtype=torch.float64)).to(dev)


def _probs(*shape):
    return lambda g, dev: torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1).to(
        dev
    )


def _reseeded(fn, seed=7):
    """fn with the default generators re-seeded on every call (and restored after): a random op
    then draws the same values each time, a function gradcheck and the transforms can probe."""

    def f(x, *rest):
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn(x, *rest)

    return f


def _rrelu_slopes_reference(lower, upper):
    """torch ops on the slopes fastops draws: they depend on the seed and the element's index
    only, so -rrelu(-1) under the same seed gives them."""

    draw = _reseeded(functools.partial(FF.rrelu, lower=lower, upper=upper, training=True))

    def f(x):
        slopes = -draw(-torch.ones(x.shape, dtype=x.dtype, device=x.device))
        return torch.where(x <= 0, x * slopes, x)

    return f


_w5 = _pos((5,))
# name -> (fastops fn, torch fn, [input makers], indices of the differentiated inputs)
CASES = {
    "relu": (FF.relu, F.relu, [_randn(4, 5)], [0]),
    "elu": (
        functools.partial(FF.elu, alpha=0.7),
        functools.partial(F.elu, alpha=0.7),
        [_randn(4, 5)],
        [0],
    ),
    "gelu": (FF.gelu, F.gelu, [_randn(4, 5)], [0]),
    "gelu_tanh": (
        functools.partial(FF.gelu, approximate="tanh"),
        functools.partial(F.gelu, approximate="tanh"),
        [_randn(4, 5)],
        [0],
    ),
    "hardtanh": (
        functools.partial(FF.hardtanh, min_val=-0.8, max_val=0.9),
        functools.partial(F.hardtanh, min_val=-0.8, max_val=0.9),
        [_randn(4, 5)],
        [0],
    ),
    "leaky_relu": (
        functools.partial(FF.leaky_relu, negative_slope=0.2),
        functools.partial(F.leaky_relu, negative_slope=0.2),
        [_randn(4, 5)],
        [0],
    ),
    # eval: torch's leaky_relu with the mean slope (torch's rrelu has no vmap rule)
    "rrelu_eval": (
        functools.partial(FF.rrelu, lower=0.1, upper=0.3),
        functools.partial(F.leaky_relu, negative_slope=0.2),
        [_randn(4, 5)],
        [0],
    ),
    "rrelu_train": (
        _reseeded(functools.partial(FF.rrelu, lower=0.1, upper=0.3, training=True)),
        _rrelu_slopes_reference(0.1, 0.3),
        [_randn(4, 5)],
        [0],
    ),
    "sigmoid": (FF.sigmoid, torch.sigmoid, [_randn(4, 5)], [0]),
    "tanh": (FF.tanh, torch.tanh, [_randn(4, 5)], [0]),
    "hardshrink": (
        functools.partial(FF.hardshrink, lambd=0.3),
        functools.partial(F.hardshrink, lambd=0.3),
        [_randn(4, 5)],
        [0],
    ),
    "prelu_shared": (FF.prelu, F.prelu, [_randn(4, 3, 2), _pos((1,))], [0, 1]),
    "prelu_channels": (FF.prelu, F.prelu, [_randn(4, 3, 2), _pos((3,))], [0, 1]),
    "maxout": (
        functools.partial(FF.maxout, pool_size=2),
        functools.partial(torch_maxout, k=2),
        [_randn(3, 6, 2)],
        [0],
    ),
    "linear": (FF.linear, F.linear, [_randn(4, 3), _randn(5, 3), _randn(5)], [0, 1, 2]),
    "linear_nobias": (FF.linear, F.linear, [_randn(2, 4, 3), _randn(5, 3)], [0, 1]),
    **{
        f"linear_act_{a}": (
            fo_linear_act(a),
            torch_linear_act(a),
            [_randn(4, 3), _randn(6, 3), _randn(6)],
            [0, 1, 2],
        )
        for a in ("relu", "elu", "gelu", "tanh", "sigmoid", "leaky_relu", "maxout")
    },
    "linear_act_prelu": (
        fo_linear_act("prelu"),
        torch_linear_act("prelu"),
        [_randn(4, 3), _randn(6, 3), _randn(6), _pos((6,))],
        [0, 1, 2, 3],
    ),
    "linear_act_3d": (
        fo_linear_act("gelu"),
        torch_linear_act("gelu"),
        [_randn(2, 3, 3), _randn(4, 3), _randn(4)],
        [0, 1, 2],
    ),
    "log_softmax": (
        functools.partial(FF.log_softmax, dim=1),
        functools.partial(F.log_softmax, dim=1),
        [_randn(4, 5)],
        [0],
    ),
    "log_softmax_dim0": (
        functools.partial(FF.log_softmax, dim=0),
        functools.partial(F.log_softmax, dim=0),
        [_randn(4, 3, 2)],
        [0],
    ),
    "softmax": (
        functools.partial(FF.softmax, dim=1),
        functools.partial(F.softmax, dim=1),
        [_randn(4, 5)],
        [0],
    ),
    "softmax_dim0": (
        functools.partial(FF.softmax, dim=0),
        functools.partial(F.softmax, dim=0),
        [_randn(4, 3, 2)],
        [0],
    ),
    "nll_loss": (
        lambda x, t: FF.nll_loss(FF.log_softmax(x, 1), t),
        lambda x, t: F.nll_loss(F.log_softmax(x, 1), t),
        [_randn(4, 5), _target((4,), 5)],
        [0],
    ),
    "nll_loss_weight_ignore_sum": (
        lambda x, t, w: FF.nll_loss(FF.log_softmax(x, 1), t, w, ignore_index=1, reduction="sum"),
        lambda x, t, w: F.nll_loss(F.log_softmax(x, 1), t, w, ignore_index=1, reduction="sum"),
        [_randn(4, 5), _target((4,), 5, ignore=1), _w5],
        [0],
    ),
    "nll_loss_none": (
        lambda x, t: FF.nll_loss(x, t, reduction="none"),
        lambda x, t: F.nll_loss(x, t, reduction="none"),
        [_randn(4, 5), _target((4,), 5)],
        [0],
    ),
    "cross_entropy": (FF.cross_entropy, F.cross_entropy, [_randn(4, 5), _target((4,), 5)], [0]),
    "cross_entropy_all_options": (
        lambda x, t, w: FF.cross_entropy(x, t, w, ignore_index=2, label_smoothing=0.2),
        lambda x, t, w: F.cross_entropy(x, t, w, ignore_index=2, label_smoothing=0.2),
        [_randn(4, 5), _target((4,), 5, ignore=2), _w5],
        [0],
    ),
    "cross_entropy_none_smooth": (
        lambda x, t: FF.cross_entropy(x, t, reduction="none", label_smoothing=0.1),
        lambda x, t: F.cross_entropy(x, t, reduction="none", label_smoothing=0.1),
        [_randn(3, 5, 2), _target((3, 2), 5)],
        [0],
    ),
    "cross_entropy_sum_1d": (
        lambda x, t: FF.cross_entropy(x, t, reduction="sum"),
        lambda x, t: F.cross_entropy(x, t, reduction="sum"),
        [_randn(5), _target((), 5)],
        [0],
    ),
    "cross_entropy_probs": (
        lambda x, p, w: FF.cross_entropy(x, p, w, label_smoothing=0.1),
        lambda x, p, w: F.cross_entropy(x, p, w, label_smoothing=0.1),
        [_randn(4, 5), _probs(4, 5), _w5],
        [0, 1],
    ),
    "mse_loss": (FF.mse_loss, F.mse_loss, [_randn(4, 5), _randn(4, 5)], [0, 1]),
    "mse_loss_sum": (
        functools.partial(FF.mse_loss, reduction="sum"),
        functools.partial(F.mse_loss, reduction="sum"),
        [_randn(4, 5), _randn(4, 5)],
        [0, 1],
    ),
    "mse_loss_none": (
        functools.partial(FF.mse_loss, reduction="none"),
        functools.partial(F.mse_loss, reduction="none"),
        [_randn(4, 5), _randn(4, 5)],
        [0, 1],
    ),
    "hinge_embedding_loss": (
        functools.partial(FF.hinge_embedding_loss, margin=0.5),
        functools.partial(F.hinge_embedding_loss, margin=0.5),
        [_randn(4, 5), _signs(4, 5)],
        [0],
    ),
    "hinge_embedding_loss_none_broadcast": (
        functools.partial(FF.hinge_embedding_loss, reduction="none"),
        functools.partial(F.hinge_embedding_loss, reduction="none"),
        [_randn(4, 5), _signs(5)],
        [0],
    ),
    # torch's multi_margin_loss has no double backward nor forward-mode formula: its twin here
    # is the same loss composed of torch ops
    "multi_margin_loss": (
        FF.multi_margin_loss,
        torch_multi_margin,
        [_randn(4, 5), _target((4,), 5)],
        [0],
    ),
    "multi_margin_loss_p2_weight_sum": (
        lambda x, t, w: FF.multi_margin_loss(x, t, p=2, margin=0.7, weight=w, reduction="sum"),
        lambda x, t, w: torch_multi_margin(x, t, p=2, margin=0.7, weight=w, reduction="sum"),
        [_randn(4, 5), _target((4,), 5), _w5],
        [0],
    ),
    "multi_margin_loss_none_1d": (
        functools.partial(FF.multi_margin_loss, p=2, reduction="none"),
        functools.partial(torch_multi_margin, p=2, reduction="none"),
        [_randn(5), _target((1,), 5)],
        [0],
    ),
    "l1_loss": (FF.l1_loss, F.l1_loss, [_randn(4, 5), _randn(4, 5)], [0, 1]),
    "l1_loss_sum_weight": (
        lambda x, y, w: FF.l1_loss(x, y, reduction="sum", weight=w),
        lambda x, y, w: F.l1_loss(x, y, reduction="sum", weight=w),
        [_randn(4, 5), _randn(4, 5), _pos((4, 5))],
        [0, 1, 2],
    ),
    "l1_loss_none": (
        functools.partial(FF.l1_loss, reduction="none"),
        functools.partial(F.l1_loss, reduction="none"),
        [_randn(3, 4, 2), _randn(3, 4, 2)],
        [0, 1],
    ),
    "binary_cross_entropy": (
        FF.binary_cross_entropy, F.binary_cross_entropy, [_unit(4, 5), _unit(4, 5)], [0, 1]
    ),
    "binary_cross_entropy_weight_sum": (
        lambda x, y, w: FF.binary_cross_entropy(x, y, w, reduction="sum"),
        lambda x, y, w: F.binary_cross_entropy(x, y, w, reduction="sum"),
        [_unit(4, 5), _unit(4, 5), _w5],
        [0, 1],
    ),
    "binary_cross_entropy_none": (
        lambda x, y: FF.binary_cross_entropy(x, y, reduction="none"),
        lambda x, y: F.binary_cross_entropy(x, y, reduction="none"),
        [_unit(3, 4, 2), _unit(3, 4, 2)],
        [0, 1],
    ),
    "bce_with_logits": (
        FF.binary_cross_entropy_with_logits,
        F.binary_cross_entropy_with_logits,
        [_randn(4, 5), _unit(4, 5)],
        [0, 1],
    ),
    "bce_with_logits_weight_pos_weight": (
        lambda x, y, w, p: FF.binary_cross_entropy_with_logits(x, y, w, pos_weight=p),
        lambda x, y, w, p: F.binary_cross_entropy_with_logits(x, y, w, pos_weight=p),
        [_randn(4, 5), _unit(4, 5), _pos((4, 1)), _w5],
        [0, 1],
    ),
    "bce_with_logits_none_pos_weight": (
        lambda x, y, p: FF.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=p),
        lambda x, y, p: F.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=p),
        [_randn(3, 5), _unit(3, 5), _w5],
        [0, 1],
    ),
}
# A batch of the first differentiated input for the vmap tests; probabilities stay in [0, 1].
_BATCH = {name: lambda x: torch.stack([x, 1 - x, x * 0.5 + 0.1])
          for name in CASES if name.startswith("binary_cross_entropy")}


# vmap's randomness flag per case (default "error"): the random ones draw one seed for the batch
VMAP_RANDOMNESS = {"rrelu_train": "same"}


def make_inputs(name, device, dtype=torch.float64):
    fo, tf, makers, diff = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    args = [m(g, device) for m in makers]
    args = [a.to(dtype) if a.is_floating_point() else a for a in args]
    return fo, tf, args, diff


def with_diff(fn, args, diff):
    """fn as a function of the differentiated inputs only."""

    def f(*d):
        full = list(args)
        for i, v in zip(diff, d):
            full[i] = v
        return fn(*full)

    return f


def sum_of(fn):
    return lambda *a: fn(*a).sum()


@pytest.mark.parametrize("name", CASES)
def test_gradgradcheck(name, device):
    fo, _, args, diff = make_inputs(name, device)
    d = [args[i].requires_grad_() for i in diff]
    f = with_diff(fo, args, diff)
    assert torch.autograd.gradcheck(f, d, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, d, fast_mode=True)


@pytest.mark.parametrize("name", CASES)
def test_double_backward_matches_torch(name, device):
    """grad of (grad . v) through fastops against the same through torch."""
    fo, tf, args, diff = make_inputs(name, device)
    results = []
    for fn in (fo, tf):
        d = [args[i].detach().clone().requires_grad_() for i in diff]
        out = with_diff(fn, args, diff)(*d)
        v = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).view(out.shape)
        gs = torch.autograd.grad((out * v).sum(), d, create_graph=True)
        total = sum((g * g).sum() for g in gs)
        if not total.requires_grad:  # torch's amax: a constant gradient, no graph
            results.append([torch.zeros_like(a) for a in d])
            continue
        results.append(torch.autograd.grad(total, d, allow_unused=True, materialize_grads=True))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", CASES)
def test_func_transforms(name, device):
    fo, tf, args, diff = make_inputs(name, device)
    d = [args[i] for i in diff]
    f_fo, f_t = with_diff(fo, args, diff), with_diff(tf, args, diff)
    argnums = tuple(range(len(d)))
    for transform in (
        lambda f: grad(sum_of(f), argnums=argnums)(*d),
        lambda f: jacrev(f, argnums=argnums)(*d),
        lambda f: jacfwd(f, argnums=argnums)(*d),
        lambda f: hessian(sum_of(f), argnums=0)(*d),
        lambda f: vjp(f, *d)[1](torch.ones_like(f(*d))),
        lambda f: jvp(f, tuple(d), tuple(torch.ones_like(a) for a in d))[1],
    ):
        torch.testing.assert_close(transform(f_fo), transform(f_t))


@pytest.mark.parametrize("name", CASES)
def test_vmap_and_per_sample_grad(name, device):
    """vmap over a batch of inputs (the first differentiated one batched), and vmap(grad)."""
    fo, tf, args, diff = make_inputs(name, device)
    first = args[diff[0]]
    batch = _BATCH.get(name, lambda x: torch.stack([x, x * 0.5 + 0.1, -x]))(first)

    def per_sample(fn):
        def f(x):
            full = list(args)
            full[diff[0]] = x
            return fn(*full)

        return f

    randomness = VMAP_RANDOMNESS.get(name, "error")
    for f in (lambda fn: per_sample(fn), lambda fn: grad(sum_of(per_sample(fn)))):
        torch.testing.assert_close(
            vmap(f(fo), randomness=randomness)(batch), vmap(f(tf), randomness=randomness)(batch)
        )


def test_vmap_does_not_loop(device):
    """The batching rules of the ops run: no per-sample fallback (which warns)."""
    x = torch.randn(3, 4, 5, device=device)
    w = torch.randn(6, 5, device=device)
    t = torch.zeros(4, dtype=torch.long, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vmap(grad(lambda x: FF.cross_entropy(FF.linear(FF.gelu(x), w), t)))(x)


@pytest.mark.parametrize("fn", [FF.sigmoid, FF.tanh])
def test_second_derivative_of_output_saving_ops_is_not_zero(fn, device):
    # regression: the output-saving activations once gave zeros here
    x = torch.randn(7, device=device, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    tx = x.detach().clone().requires_grad_()
    tfn = torch.sigmoid if fn is FF.sigmoid else torch.tanh
    (tg,) = torch.autograd.grad(tfn(tx).sum(), tx, create_graph=True)
    torch.testing.assert_close(gg, torch.autograd.grad(tg.sum(), tx)[0])
    assert gg.abs().max() > 1e-3


@pytest.mark.parametrize(
    "fn",
    [
        FF.relu,
        functools.partial(FF.maxout, pool_size=2),
        functools.partial(FF.leaky_relu, negative_slope=0.1),
    ],
)
def test_second_derivative_of_piecewise_linear_is_zeros(fn, device):
    # torch gives zeros (not "does not require grad") though the mask is all that is saved
    x = torch.randn(4, 6, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    assert g.requires_grad
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert torch.equal(gg, torch.zeros_like(x))


@pytest.mark.parametrize(
    "fn,tfn",
    [
        (functools.partial(FF.elu, alpha=0.5), functools.partial(F.elu, alpha=0.5)),
        (FF.tanh, torch.tanh),
        (FF.relu, F.relu),
    ],
)
def test_forward_ad_dual_tensors(fn, tfn, device):
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    t = torch.randn(3, 4, device=device, dtype=torch.float64)
    out = []
    for f in (fn, tfn):
        with fwAD.dual_level():
            y = f(fwAD.make_dual(x, t))
            out.append(fwAD.unpack_dual(y))
    torch.testing.assert_close(out[0].primal, out[1].primal)
    torch.testing.assert_close(out[0].tangent, out[1].tangent)


def test_third_derivative_raises(device):
    x = torch.randn(5, device=device, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(FF.gelu(x).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="gelu_double_backward is not implemented"):
        torch.autograd.grad(gg.sum(), x)
    # the same under torch.func, which runs the Python formulas
    with pytest.raises(RuntimeError, match="third derivative|not implemented"):
        hessian(lambda x: grad(lambda x: FF.gelu(x).sum())(x).sum())(x)


def _mlps(device):
    torch.manual_seed(0)
    fo = (
        torch.nn.Sequential(
            fnn.Linear(3, 16), fnn.LeakyReLU(0.2), fnn.Linear(16, 16), fnn.Tanh(), fnn.Linear(16, 1)
        )
        .double()
        .to(device)
    )
    tm = (
        torch.nn.Sequential(
            torch.nn.Linear(3, 16),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Linear(16, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 1),
        )
        .double()
        .to(device)
    )
    tm.load_state_dict(fo.state_dict())
    return fo, tm


def test_gradient_penalty_matches_torch(device):
    """WGAN-GP: the gradient of ||d critic / d x|| with respect to the parameters."""
    fo, tm = _mlps(device)
    x = torch.randn(32, 3, device=device, dtype=torch.float64)
    grads = []
    for m in (fo, tm):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(xi).sum(), xi, create_graph=True)
        ((g.norm(2, dim=1) - 1) ** 2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_readme_per_sample_gradients(device):
    """The README's per-sample-gradient example: vmap(grad) over functional_call."""
    fo, tm = _mlps(device)
    x = torch.randn(8, 3, device=device, dtype=torch.float64)
    y = torch.randn(8, 1, device=device, dtype=torch.float64)

    def per_sample_grads(model, loss_fn):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    a = per_sample_grads(fo, FF.mse_loss)
    b = per_sample_grads(tm, F.mse_loss)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_readme_ensemble(device):
    """The README's ensemble example: stack_module_state + vmap over functional_call."""
    models = [_mlps(device) for _ in range(3)]
    for m_fo, _ in models[1:]:
        for p in m_fo.parameters():
            p.data.mul_(0.5)
    x = torch.randn(10, 3, device=device, dtype=torch.float64)
    outs = []
    for k in (0, 1):
        ms = [m[k] for m in models]
        if k == 1:
            for m_t, (m_fo, _) in zip(ms, models):
                m_t.load_state_dict(m_fo.state_dict())
        params, buffers = stack_module_state(ms)
        base = ms[0]
        outs.append(
            vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(
                params, buffers, x
            )
        )
    torch.testing.assert_close(outs[0], outs[1])


def test_function_twins_gradgradcheck(device):
    """The public autograd.Function classes are differentiable twice as well."""
    x = torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: fastops.ops.ELUFunction.apply(x, 0.5), (x,))
    assert torch.autograd.gradgradcheck(lambda x: fastops.ops.SigmoidFunction.apply(x), (x,))
    assert torch.autograd.gradgradcheck(
        lambda x, w: fastops.ops.LinearFunction.apply(x, w, None), (x, w)
    )
    t = torch.randint(0, 5, (4,), device=device)
    assert torch.autograd.gradgradcheck(
        lambda x: fastops.ops.CrossEntropyFunction.apply(x, t, None, 1, -100, 0.1)[0], (x,)
    )


@pytest.mark.parametrize("op", list(fastops.ops.POINTWISE))
def test_double_backward_ops_opcheck_and_values(op, device):
    """NAME_double_backward = grad_grad * grad_output * f''(self), against torch's second
    derivative; registered like every other op (opcheck), on any strides."""
    params = {
        "elu": (0.7,),
        "hardtanh": (-0.8, 0.9),
        "leaky_relu": (0.2,),
        "hardshrink": (0.3,),
    }.get(op, ())
    tf = {
        "relu": F.relu,
        "elu": F.elu,
        "gelu": F.gelu,
        "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
        "hardtanh": F.hardtanh,
        "leaky_relu": F.leaky_relu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "hardshrink": F.hardshrink,
    }[op]
    x = torch.randn(9, 41, device=device, dtype=torch.float64)
    g, gg = torch.randn_like(x), torch.randn_like(x)
    double = getattr(torch.ops.fastops, op + "_double_backward")
    torch.library.opcheck(double, (gg, g, x, *params))
    xt = x.clone().requires_grad_()
    (d1,) = torch.autograd.grad(tf(xt, *params), xt, g, create_graph=True)
    expected = (
        torch.autograd.grad(d1, xt, gg, allow_unused=True, materialize_grads=True)[0]
        if d1.requires_grad
        else torch.zeros_like(x)
    )
    torch.testing.assert_close(double(gg.t().contiguous().t(), g, x, *params), expected)
    if op in fastops.ops.OUTPUT:
        out_double = getattr(torch.ops.fastops, op + "_output_double_backward")
        y = tf(x)
        torch.library.opcheck(out_double, (gg, g, y))
        # d/dx of g * f'(x) through y = f(x): (d/dy of g h(y)) f'(x)
        torch.testing.assert_close(
            out_double(gg, g, y) * (1 - y * y if op == "tanh" else y * (1 - y)), expected
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda x: torch.ops.fastops.gelu_double_backward(torch.ones_like(x), torch.ones_like(x), x),
        lambda x: torch.ops.fastops.tanh_output_double_backward(
            torch.ones_like(x), torch.ones_like(x), x
        ),
        lambda x: torch.ops.fastops.relu_with_mask(x)[0],
        lambda x: torch.ops.fastops.maxout_with_indices(x.view(2, 2), 2)[0],
    ],
)
def test_ops_without_derivative_raise(call, device):
    """Differentiating an op that has no formula raises; it never gives silent zeros."""
    x = torch.randn(4, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(call(x).sum(), x)


ACTIVATIONS = [
    "relu",
    "elu",
    "gelu",
    "hardtanh",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "prelu",
    "maxout",
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_models_under_func(activation, device):
    """Every fastops module (through fastops.models.MLP: fused LinearAct, PReLU, Maxout, Linear)
    under per-sample gradients, an ensemble, a Hessian-vector product and the double backward of a
    gradient penalty, against the same MLP from torch.nn with the same weights."""
    from fastops.models import MLP

    torch.manual_seed(0)
    fo = MLP(3, [8], 2, activation=activation).double().to(device)
    tm = fo.twin("torch")
    x = torch.randn(5, 3, device=device, dtype=torch.float64)
    y = torch.randint(0, 2, (5,), device=device)
    loss_fns = {id(fo): FF.cross_entropy, id(tm): F.cross_entropy}

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xi, yi):
            out = functional_call(model, p, (xi.unsqueeze(0),))
            return loss_fns[id(model)](out, yi.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    def ensemble(model):
        copies = [model, *(model.twin(model.backend) for _ in range(2))]
        for i, m in enumerate(copies[1:], 1):
            for p in m.parameters():
                p.data.mul_(1 + 0.1 * i)
        params, buffers = stack_module_state(copies)
        return vmap(lambda p, b: functional_call(model, (p, b), (x,)))(params, buffers)

    def hvp(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        v = {k: torch.ones_like(p) for k, p in params.items()}

        def loss(p):
            return loss_fns[id(model)](functional_call(model, p, (x,)), y)

        return jvp(grad(loss), (params,), (v,))[1]

    def penalty_grads(model):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        params = list(model.parameters())
        return torch.autograd.grad(
            ((g.norm(dim=1) - 1) ** 2).mean(), params, allow_unused=True, materialize_grads=True
        )

    for check in (per_sample, ensemble, hvp, penalty_grads):
        torch.testing.assert_close(check(fo), check(tm))


@pytest.mark.parametrize("op", list(fastops.ops.POINTWISE))
def test_function_twins_of_every_activation_gradgradcheck(op, device):
    cls = getattr(fastops.ops, fastops.ops.POINTWISE[op][0])
    params = {"elu": (0.7,), "hardtanh": (-0.8, 0.9), "leaky_relu": (0.2,), "hardshrink": (0.3,)}
    x = _randn(4, 5)(torch.Generator().manual_seed(0), device).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: cls.apply(x, *params.get(op, ())), (x,))
