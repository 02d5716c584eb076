"""NaN, infinities and the edges of float's exp range against torch, in four dtypes, forward and
backward (and second order for the pointwise activations): every activation in every backward
form (from the input, the bit mask, the output), the fused linear + activation, and the softmax
losses with a NaN in every chunk of a row.

The reference is torch in float64 applied one element at a time. torch's CPU kernels of elu,
hardtanh and hardshrink give a NaN input another gradient in their vectorised body than in
their scalar tail (elu: NaN against g; hardtanh and hardshrink: 0 against g), so a whole-tensor
call answers by the element's position; the scalar comparisons, which torch's CUDA kernels use
too, are the definition fastops follows everywhere."""

import pytest
import torch
import torch.nn.functional as TF
from conftest import DTYPES, tol
from test_activations import ACTIVATIONS, make_args, shape_for

import fastops.functional as F
from fastops.ops.linear import linear_act

NAN, INF = float("nan"), float("inf")
# NaN, the infinities, float's exp range (expf(x) is finite up to 88.7228), the thresholds of
# the piecewise-linear activations, signed zeros and large magnitudes
SPECIAL = [NAN, INF, -INF, 88.6, -88.6, 88.72, -88.72, 88.8, -88.8, 0.0, -0.0, 1e4, -1e4,
           1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.5, -1.5, 0.25, -0.25, 3.0]

POINTWISE = [n for n in ACTIVATIONS if not n.startswith(("prelu", "maxout"))]


def special_input(shape, dtype, device):
    flat = torch.tensor(SPECIAL * (shape.numel() // len(SPECIAL) + 1), dtype=torch.float64)
    return flat[: shape.numel()].reshape(shape).to(device=device, dtype=dtype)


def elementwise(fn):
    """fn applied to one element at a time (torch's scalar comparisons), differentiably."""
    return lambda x, *rest: torch.stack([fn(v.reshape(1), *rest).reshape(())
                                         for v in x.flatten()]).reshape(x.shape)


def upstream(shape, dtype, device, seed=0):
    """A non-zero incoming gradient: random magnitudes in [0.5, 1.5), random signs."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
    g = torch.where(torch.rand(shape, generator=gen) < 0.5, -g, g)
    return g.to(device=device, dtype=dtype)


def assert_matches(got, want, dtype):
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want.to(got.device, torch.float64), equal_nan=True,
                               **tol(dtype))


def reference(name, args, kwargs):
    """torch in float64: element by element for the pointwise activations; whole-tensor for
    prelu and maxout (consistent there)."""
    fn = ACTIVATIONS[name].torch_fn
    exact = tuple(a.detach().double().cpu().requires_grad_(True) for a in args)
    if name in POINTWISE:
        return exact, elementwise(lambda v: fn(v, **kwargs))(exact[0])
    return exact, fn(*exact, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_special_values(name, dtype, device):
    """Forward and gradients (input and weight) through fastops.functional, which takes the
    masked and output-saving forms where they exist."""
    shape = torch.Size(shape_for(name, (2, 24)))
    args, kwargs = make_args(name, shape, dtype, device, True)
    x = special_input(shape, dtype, device).requires_grad_(True)
    args = (x, *args[1:])
    out = ACTIVATIONS[name].fastops_fn(*args, **kwargs)
    exact, want = reference(name, args, kwargs)
    assert_matches(out, want, dtype)
    g = upstream(out.shape, dtype, device)
    got = torch.autograd.grad(out, args, g)
    wanted = torch.autograd.grad(want, exact, g.double().cpu())
    for a, b in zip(got, wanted):
        if a.shape == x.shape:
            assert_matches(a, b, dtype)
        else:  # a weight gradient: a sum over the elements, NaN wherever torch's is
            assert torch.equal(a.isnan().cpu(), b.isnan())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", POINTWISE)
def test_every_backward_form_special_values(name, dtype, device):
    """NAME_backward (from the input), NAME_mask_backward (from the bits) and
    NAME_output_backward (from the output), and NAME_double_backward, against torch."""
    row = ACTIVATIONS[name]
    ops, params = torch.ops.fastops, row.op_params
    x = special_input(torch.Size((48,)), dtype, device)
    g = upstream(x.shape, dtype, device, seed=1)
    gg = upstream(x.shape, dtype, device, seed=2)
    xe = x.double().cpu().requires_grad_(True)
    ye = elementwise(lambda v: row.torch_fn(v, **row.kwargs))(xe)
    ge = g.double().cpu().requires_grad_(True)
    grad_e = torch.autograd.grad(ye, xe, ge, create_graph=True)[0]
    assert_matches(getattr(ops, row.op + "_backward")(g, x, *params), grad_e.detach(), dtype)
    if hasattr(ops, row.op + "_with_mask"):
        y, mask = getattr(ops, row.op + "_with_mask")(x, *params)
        assert_matches(y, ye.detach(), dtype)
        assert_matches(getattr(ops, row.op + "_mask_backward")(g, mask, *params),
                       grad_e.detach(), dtype)
    if hasattr(ops, row.op + "_output_backward"):
        # from the output rounded to the dtype: against torch's own backward in that dtype
        y = getattr(ops, row.op)(x, *params)
        xt = x.clone().requires_grad_(True)
        want = torch.autograd.grad(row.torch_fn(xt, **row.kwargs), xt, g)[0]
        got = getattr(ops, row.op + "_output_backward")(g, y)
        torch.testing.assert_close(got, want, equal_nan=True, **tol(dtype))
    # second order: d(grad . gg)/dx
    want2 = torch.autograd.grad(grad_e, xe, gg.double().cpu(), allow_unused=True)[0]
    if want2 is None:
        want2 = torch.zeros_like(xe)
    got2 = getattr(ops, row.op + "_double_backward")(gg, g, x, *params)
    assert_matches(got2, want2.detach(), dtype)


FUSED = {  # linear_act keyword arguments -> the torch activation of the pre-activation
    "relu": (dict(activation="relu"), TF.relu),
    "elu": (dict(activation="elu", alpha=0.7), lambda z: TF.elu(z, alpha=0.7)),
    "gelu": (dict(activation="gelu"), TF.gelu),
    "gelu_tanh": (dict(activation="gelu", approximate="tanh"),
                  lambda z: TF.gelu(z, approximate="tanh")),
    "hardtanh": (dict(activation="hardtanh", min_val=-0.5, max_val=1.5),
                 lambda z: TF.hardtanh(z, -0.5, 1.5)),
    "leaky_relu": (dict(activation="leaky_relu", negative_slope=0.2),
                   lambda z: TF.leaky_relu(z, 0.2)),
    "sigmoid": (dict(activation="sigmoid"), torch.sigmoid),
    "tanh": (dict(activation="tanh"), torch.tanh),
    "hardshrink": (dict(activation="hardshrink", lambd=0.25), lambda z: TF.hardshrink(z, 0.25)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(FUSED))
def test_linear_act_special_values(name, dtype, device):
    """The fused linear + activation with special pre-activations: one input feature and
    weights +-1, so z = +-x exactly, and the activation's epilogue and backward see them."""
    kwargs, act = FUSED[name]
    x = special_input(torch.Size((len(SPECIAL), 1)), dtype, device).requires_grad_(True)
    w = torch.tensor([[1.0], [-1.0]], dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(2, dtype=dtype, device=device, requires_grad=True)
    y = linear_act(x, w, b, **kwargs)
    exact = [t.detach().double().cpu().requires_grad_(True) for t in (x, w, b)]
    want = elementwise(act)(TF.linear(*exact))
    assert_matches(y, want.detach(), dtype)
    g = upstream(y.shape, dtype, device)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    wx, ww, wb = torch.autograd.grad(want, exact, g.double().cpu())
    assert_matches(gx, wx, dtype)
    for a, e in ((gw, ww), (gb, wb)):  # sums over the rows: their NaN pattern
        assert torch.equal(a.isnan().cpu(), e.isnan())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_act_hardshrink_rounds_lambd_like_torch(dtype, device):
    """lambd rounded to the dtype before comparing, as fastops.hardshrink and torch do: inputs
    at the rounded threshold are zeroed by all three (not passed by a float comparison)."""
    lambd = 0.3  # 0.30004883 in float16, 0.30078125 in bfloat16
    at = torch.tensor(lambd, dtype=dtype).item()
    x = torch.tensor([[at], [-at], [0.29], [0.31], [lambd]], dtype=dtype, device=device)
    w = torch.ones(1, 1, dtype=dtype, device=device)
    fused = linear_act(x, w, activation="hardshrink", lambd=lambd)
    torch.testing.assert_close(fused, F.hardshrink(x, lambd), atol=0, rtol=0)
    torch.testing.assert_close(fused, TF.hardshrink(x, lambd), atol=0, rtol=0)
    xg = x.clone().requires_grad_(True)
    g = torch.autograd.grad(linear_act(xg, w, activation="hardshrink", lambd=lambd), xg,
                            torch.ones_like(x))[0]
    want = torch.autograd.grad(TF.hardshrink(xg, lambd), xg, torch.ones_like(x))[0]
    torch.testing.assert_close(g, want, atol=0, rtol=0)


def test_exp_is_finite_up_to_floats_limit(device):
    """exp(x) in float is finite up to 88.7228: sigmoid(-x) = 1 / (1 + exp(x)) is a subnormal
    there, not the 0 of an exp saturating early (it did from 88.5); and tanh and elu stay
    exact near the limit."""
    x = torch.linspace(88.3, 88.8, 2001, dtype=torch.float32, device=device)
    x = torch.cat([x, torch.tensor([88.7228317, 88.7228394], device=device)])
    torch.testing.assert_close(F.sigmoid(-x), torch.sigmoid(-x), atol=0, rtol=1e-5)
    torch.testing.assert_close(F.sigmoid(x), torch.sigmoid(x), atol=0, rtol=0)
    # 0 exactly where exp(x) overflows, as in torch
    assert torch.equal(F.sigmoid(-x) > 0, x <= torch.tensor(88.7228317, device=device))
    torch.testing.assert_close(F.tanh(x / 2), torch.tanh(x / 2), atol=0, rtol=0)
    torch.testing.assert_close(F.elu(-x), TF.elu(-x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elu_is_exact_near_zero(dtype, device):
    """elu(x) = alpha * expm1(x) for x <= 0, as torch computes it: near 0 the value keeps its
    relative precision (exp(x) - 1 gave 0 for |x| < 3e-8 in float, and 1e-4 relative error at
    1e-5), and across the switch to exp(x) - 1 at ln 2 / 2 it stays within float's rounding."""
    tiny = torch.logspace(-30, 0, 301, dtype=torch.float64)
    x = torch.cat([-tiny, -torch.linspace(0.3, 0.4, 1001, dtype=torch.float64)])
    x = x.to(device=device, dtype=dtype)
    want = TF.elu(x.double(), alpha=1.5).to(dtype)
    rtol = {torch.float64: 1e-15}.get(dtype, 2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(F.elu(x, alpha=1.5), want, atol=0, rtol=rtol)


# ---- softmax losses: a NaN must reach its row, whichever chunk holds it -----------------------
# Contiguous rows are processed in chunks of 2048 classes, strided rows (S > 1) in blocks of 64
# classes, rows of fewer than 16 classes 16 rows at a time: rows of -inf with one finite value
# and one NaN, each in any chunk.

def nan_rows(C, dtype, device, S=1):
    """(rows, C, S): row r holds a finite value at fin[r] and a NaN at nan[r], -inf elsewhere;
    the (fin, nan) pairs visit every combination of chunk positions, plus rows without a NaN."""
    block = 2048 if S == 1 else 64
    spots = sorted({0, 1, block - 1, block, block + 1, C // 2, C - 1}
                   | {c for c in range(0, C, block)})
    spots = [c for c in spots if 0 <= c < C]
    pairs = [(f, n) for f in spots for n in spots if f != n] + [(f, None) for f in spots]
    x = torch.full((len(pairs), C, S), -INF, dtype=torch.float64)
    for r, (f, n) in enumerate(pairs):
        x[r, f] = 1.5
        if n is not None:
            x[r, n] = NAN
    target = torch.tensor([f for f, _ in pairs]).unsqueeze(1).expand(-1, S)
    x = x.to(device=device, dtype=dtype)
    return (x, target.to(device)) if S > 1 else (x.squeeze(2), target[:, 0].to(device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C,S", [(4500, 1), (2049, 1), (3, 1), (300, 3), (150, 17)])
def test_softmax_losses_nan_in_every_chunk(C, S, dtype, device):
    x, target = nan_rows(C, dtype, device, S)
    xe = x.double()
    ls = F.log_softmax(x, dim=1)
    assert torch.equal(ls.isnan(), TF.log_softmax(xe, dim=1).isnan())
    loss = F.cross_entropy(x, target, reduction="none")
    want = TF.cross_entropy(xe, target, reduction="none")
    assert torch.equal(loss.isnan(), want.isnan())
    assert_matches(loss, want, dtype)
    assert F.cross_entropy(x, target).isnan()
    # and the gradient: NaN over the rows that hold one, torch's elsewhere
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(xg, target, reduction="sum"), xg)[0]
    xeg = xe.clone().requires_grad_(True)
    want_grad = torch.autograd.grad(TF.cross_entropy(xeg, target, reduction="sum"), xeg)[0]
    assert_matches(grad, want_grad, dtype)


LOSSES = {  # name -> (fastops, torch) taking (input, class target, float target)
    "log_softmax": (lambda x, t, y: F.log_softmax(x, dim=1),
                    lambda x, t, y: TF.log_softmax(x, dim=1)),
    "cross_entropy": (lambda x, t, y: F.cross_entropy(x, t, reduction="none"),
                      lambda x, t, y: TF.cross_entropy(x, t, reduction="none")),
    "cross_entropy_smoothing": (
        lambda x, t, y: F.cross_entropy(x, t, reduction="none", label_smoothing=0.2),
        lambda x, t, y: TF.cross_entropy(x, t, reduction="none", label_smoothing=0.2)),
    "cross_entropy_probs": (lambda x, t, y: F.cross_entropy(x, y.softmax(1), reduction="none"),
                            lambda x, t, y: TF.cross_entropy(x, y.softmax(1), reduction="none")),
    "nll_loss": (lambda x, t, y: F.nll_loss(x, t, reduction="none"),
                 lambda x, t, y: TF.nll_loss(x, t, reduction="none")),
    "mse_loss": (lambda x, t, y: F.mse_loss(x, y, reduction="none"),
                 lambda x, t, y: TF.mse_loss(x, y, reduction="none")),
    "l1_loss": (lambda x, t, y: F.l1_loss(x, y, reduction="none"),
                lambda x, t, y: TF.l1_loss(x, y, reduction="none")),
    "bce_with_logits": (
        lambda x, t, y: F.binary_cross_entropy_with_logits(x, y, reduction="none"),
        lambda x, t, y: TF.binary_cross_entropy_with_logits(x, y, reduction="none")),
    "bce_with_logits_pos_weight": (
        lambda x, t, y: F.binary_cross_entropy_with_logits(x, y, reduction="none",
                                                           pos_weight=y[0] * 3),
        lambda x, t, y: TF.binary_cross_entropy_with_logits(x, y, reduction="none",
                                                            pos_weight=y[0] * 3)),
    "linear": (lambda x, t, y: F.linear(x, y[:5]), lambda x, t, y: TF.linear(x, y[:5])),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_and_linear_special_values(name, dtype, device):
    """Rows of special values (one per row, among ordinary ones, and some rows all special):
    values and input gradients against torch in float64, NaN where torch's are."""
    C = 6
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(len(SPECIAL), C, dtype=torch.float64, generator=gen)
    x[:, 2] = torch.tensor(SPECIAL, dtype=torch.float64)
    x[-3:] = torch.tensor(SPECIAL[:C], dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    t = torch.arange(len(SPECIAL), device=device) % C
    y = torch.rand(len(SPECIAL), C, dtype=dtype, device=device)
    fo, ref = LOSSES[name]
    xg = x.clone().requires_grad_(True)
    out = fo(xg, t, y)
    xe = x.double().requires_grad_(True)
    want = ref(xe, t, y.double())
    # rounded to the dtype: float16 overflows to inf where float64 does not (mse of 1e4)
    assert_matches(out, want.detach().to(dtype), dtype)
    g = upstream(out.shape, dtype, device)
    got = torch.autograd.grad(out, xg, g)[0]
    wanted = torch.autograd.grad(want, xe, g.double())[0]
    assert_matches(got, wanted.to(dtype), dtype)
