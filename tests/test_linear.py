"""linear and the fused linear + activation held against torch: F.linear (followed by the torch
activation, or a maxout built from view + max) in four dtypes, values and gradients, gradcheck
in float64, odd / empty / strided shapes, determinism, bad inputs, opcheck and torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as TF
from conftest import DEVICES, tol

import fastops  # noqa: F401  (registers the ops)
from fastops.ops.linear import (LinearActFunction, LinearFunction, activation_params, linear,
                                linear_act)


def torch_maxout(z, pool_size):
    return z.view(*z.shape[:-1], z.shape[-1] // pool_size, pool_size).max(-1).values


# name -> (linear_act keyword arguments, torch activation of the pre-activation z, act_weight)
# act_weight: None, "shared" (1 slope) or "features" (one slope per output feature).
FUSED = {
    "relu": (dict(activation="relu"), TF.relu, None),
    "elu": (dict(activation="elu", alpha=0.7), lambda z: TF.elu(z, alpha=0.7), None),
    "gelu": (dict(activation="gelu"), TF.gelu, None),
    "gelu_tanh": (dict(activation="gelu", approximate="tanh"),
                  lambda z: TF.gelu(z, approximate="tanh"), None),
    "hardtanh": (dict(activation="hardtanh", min_val=-0.5, max_val=1.5),
                 lambda z: TF.hardtanh(z, -0.5, 1.5), None),
    "leaky_relu": (dict(activation="leaky_relu", negative_slope=0.2),
                   lambda z: TF.leaky_relu(z, 0.2), None),
    "sigmoid": (dict(activation="sigmoid"), torch.sigmoid, None),
    "tanh": (dict(activation="tanh"), torch.tanh, None),
    "hardshrink": (dict(activation="hardshrink", lambd=0.25), lambda z: TF.hardshrink(z, 0.25),
                   None),
    "prelu_shared": (dict(activation="prelu"), None, "shared"),
    "prelu_features": (dict(activation="prelu"), None, "features"),
    "maxout": (dict(activation="maxout", pool_size=3), lambda z: torch_maxout(z, 3), None),
}


def reference_act(name, z, act_weight):
    kwargs, fn, aw = FUSED[name]
    if aw is not None:
        return torch.where(z > 0, z, act_weight * z)  # PReLU over the last dim
    return fn(z)


def make_act_weight(name, out_features, dtype, device, requires_grad=False, gen=None):
    aw = FUSED[name][2]
    if aw is None:
        return None
    n = 1 if aw == "shared" else out_features
    w = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    return w.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def make_linear(in_shape, out_features, dtype, device, bias=True, requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = in_shape[-1]
    x = torch.randn(in_shape, generator=gen, dtype=torch.float64)
    w = torch.randn(out_features, k, generator=gen, dtype=torch.float64) / math.sqrt(max(k, 1))
    b = torch.randn(out_features, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(
        requires_grad)
    return cast(x), cast(w), cast(b)


def leaves(*ts):
    """Detached copies that require grad, for a second (torch) graph."""
    return [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


def grads(out, g, *ts):
    live = [t for t in ts if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, live, g))
    return [next(got) if (t is not None and t.requires_grad) else None for t in ts]


def check(ours, theirs, dtype, k=1):
    """ours against torch's result in the same dtype. 16-bit: the error against a float64
    result is no worse than twice torch's own (plus a K-scaled slack); else tol(dtype)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    if dtype in (torch.float32, torch.float64):
        t = tol(dtype)
        torch.testing.assert_close(ours, theirs, atol=t["atol"] * max(1.0, math.sqrt(k)),
                                   rtol=t["rtol"])
        return
    torch.testing.assert_close(ours.float(), theirs.float(),
                               atol=tol(dtype)["atol"] * 2 * max(1.0, math.sqrt(k)),
                               rtol=tol(dtype)["rtol"] * 2)


def check_vs_ref(ours, theirs, ref, dtype, k=1):
    check(ours, theirs, dtype, k)
    if dtype in (torch.float16, torch.bfloat16) and ours.numel():
        eps = torch.finfo(dtype).eps
        err_ours = (ours.double() - ref).abs().max().item()
        err_torch = (theirs.double() - ref).abs().max().item()
        slack = eps * math.sqrt(max(k, 1)) * max(1.0, ref.abs().max().item()) * 0.1
        assert err_ours <= 2 * err_torch + slack, (err_ours, err_torch)


SHAPES = [  # (input shape, out_features)
    ((9, 41), 37),
    ((3, 7, 41), 37),
    ((41,), 37),
    ((5, 16), 48),
    ((1100, 40), 33),  # the weight gradient sums 1100 rows: several k blocks
    ((3, 1030), 7),  # in_features over one k block
    ((2, 128, 300), 260),  # ~256-sized, in_features over one k block
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}->{s[1]}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_matches_torch(device, dtype, shape, bias):
    in_shape, out = shape
    x, w, b = make_linear(in_shape, out, dtype, device, bias)
    x2, w2, b2 = leaves(x, w, b)
    y = linear(x, w, b)
    y2 = TF.linear(x2, w2, b2)
    xr, wr, br = leaves(*(None if t is None else t.double() for t in (x, w, b)))
    yr = TF.linear(xr, wr, br)
    k = in_shape[-1]
    check_vs_ref(y, y2, yr, dtype, k)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = g.to(device=device, dtype=dtype)
    got = grads(y, g, x, w, b)
    want = grads(y2, g, x2, w2, b2)
    ref = grads(yr, g.double(), xr, wr, br)
    m = y.numel() // out
    for a, e, r, kk in zip(got, want, ref, (out, m, m)):
        if a is not None:
            check_vs_ref(a, e, r, dtype, kk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
def test_linear_act_matches_torch(device, dtype, name):
    in_shape, out = (2, 9, 41), 57
    x, w, b = make_linear(in_shape, out, dtype, device)
    aw = make_act_weight(name, out, dtype, device, requires_grad=True)
    kwargs = FUSED[name][0]
    y = linear_act(x, w, b, act_weight=aw, **kwargs)
    # the output is the torch activation of the pre-activation, which is F.linear
    z_ours, preact = LinearActFunction.apply(x, w, b, *activation_params(**kwargs), aw, True)
    torch.testing.assert_close(y, z_ours, atol=0, rtol=0)
    x2, w2, b2, aw2 = leaves(x, w, b, aw)
    z2 = TF.linear(x2, w2, b2)
    check(preact, z2.detach(), dtype, 41)
    torch.testing.assert_close(y, reference_act(name, preact, aw).detach(), **tol(dtype))
    y2 = reference_act(name, z2, aw2)
    xr, wr, br, awr = leaves(*(None if t is None else t.double() for t in (x, w, b, aw)))
    yr = reference_act(name, TF.linear(xr, wr, br), awr)
    check_vs_ref(y, y2, yr, dtype, 41)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = g.to(device=device, dtype=dtype)
    got = grads(y, g, x, w, b, aw)
    want = grads(y2, g, x2, w2, b2, aw2)
    ref = grads(yr, g.double(), xr, wr, br, awr)
    for a, e, r, kk in zip(got, want, ref, (out, 18, 18, 18 * out)):
        if a is not None:
            check_vs_ref(a, e, r, dtype, kk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_gradcheck(device, bias):
    x, w, b = make_linear((2, 3, 5), 6, torch.float64, device, bias)
    args = (x, w) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(lambda *a: linear(*a), args, fast_mode=True)
    assert torch.autograd.gradgradcheck is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FUSED))
def test_linear_act_gradcheck(device, name):
    x, w, b = make_linear((4, 5), 6, torch.float64, device, seed=3)
    aw = make_act_weight(name, 6, torch.float64, device, requires_grad=True)
    kwargs = FUSED[name][0]
    if aw is None:
        fn = lambda x, w, b: linear_act(x, w, b, **kwargs)
        args = (x, w, b)
    else:
        fn = lambda x, w, b, aw: linear_act(x, w, b, act_weight=aw, **kwargs)
        args = (x, w, b, aw)
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, in_features", [(0, 41), (5, 0), (0, 0)],
                         ids=["no_rows", "no_in_features", "nothing"])
@pytest.mark.parametrize("name", [None, "gelu", "prelu_features", "maxout"])
def test_empty(device, rows, in_features, name):
    x, w, b = make_linear((rows, in_features), 6, torch.float32, device)
    x2, w2, b2 = leaves(x, w, b)
    z2 = TF.linear(x2, w2, b2)
    if name is None:
        y, y2 = linear(x, w, b), z2
        params, params2 = (x, w, b), (x2, w2, b2)
    else:
        aw = make_act_weight(name, 6, torch.float32, device, requires_grad=True)
        aw2 = leaves(aw)[0]
        y = linear_act(x, w, b, act_weight=aw, **FUSED[name][0])
        y2 = reference_act(name, z2, aw2)
        params, params2 = (x, w, b, aw), (x2, w2, b2, aw2)
    torch.testing.assert_close(y, y2)
    g = torch.randn(y.shape, device=device)
    got = grads(y, g, *params)
    want = grads(y2, g, *params2)
    for a, e in zip(got, want):
        if e is None:  # torch gives no gradient to a slope that nothing used
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, e)


def _views(device):
    """(x, w, b) views: transposed, sliced with steps and offset storage."""
    gen = torch.Generator().manual_seed(5)
    xb = torch.randn(50, 30, generator=gen).to(device)
    wb = torch.randn(60, 70, generator=gen).to(device) * 0.2
    bb = torch.randn(40, generator=gen).to(device)
    return [
        ("x_transposed", xb.t()[:, 3:44], torch.randn(37, 41, generator=gen).to(device) * .2,
         bb[:37]),
        ("w_transposed", torch.randn(9, 41, generator=gen).to(device), wb[:41, 1:38].t(), None),
        ("strided", xb[1::2, ::1][:, 2:29], wb[3::1, 5:59:2][:37], bb[::1][1:38]),
        ("both_transposed_3d", torch.randn(41, 3, 4, generator=gen).to(device).permute(1, 2, 0),
         wb[:41, :37].t(), bb[2:39]),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(4))
@pytest.mark.parametrize("name", [None, "elu", "maxout"])
def test_non_contiguous(device, case, name):
    label, x, w, b = _views(device)[case]
    out = w.shape[0]
    if name == "maxout" and out % 3:
        w, b = w[:36], None if b is None else b[:36]
    x, w = x.requires_grad_(), w.requires_grad_()  # non-leaf views would not: they are leaves
    b = None if b is None else b.requires_grad_()
    x2, w2, b2 = leaves(x, w, b)
    if name is None:
        y, y2 = linear(x, w, b), TF.linear(x2, w2, b2)
    else:
        y = linear_act(x, w, b, **FUSED[name][0])
        y2 = FUSED[name][1](TF.linear(x2, w2, b2))
    torch.testing.assert_close(y, y2, **tol(torch.float32))
    g = torch.randn(*y.shape[:-1], y.shape[-1] * 2, device=device)[..., ::2]  # strided grad
    for a, e in zip(grads(y, g, x, w, b), grads(y2, g, x2, w2, b2)):
        if e is not None:
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate(device):
    x = torch.randn(4, 9, device=device)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    w = torch.rand(6, 9, device=device) + 0.1  # positive: inf stays inf
    torch.testing.assert_close(linear(x, w), TF.linear(x, w), equal_nan=True)
    torch.testing.assert_close(linear_act(x, w, activation="relu"), TF.relu(TF.linear(x, w)),
                               equal_nan=True)
    torch.testing.assert_close(linear_act(x, w, activation="maxout", pool_size=3),
                               torch_maxout(TF.linear(x, w), 3), equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [None, "gelu", "prelu_features", "maxout"])
def test_backward_deterministic(device, name):
    x, w, b = make_linear((300, 1100), 60, torch.float32, device)  # in_features: 2 k blocks
    aw = None if name is None else make_act_weight(name, 60, torch.float32, device, True)
    fn = (lambda: linear(x, w, b)) if name is None else (
        lambda: linear_act(x, w, b, act_weight=aw, **FUSED[name][0]))
    params = [t for t in (x, w, b, aw) if t is not None]
    g = torch.randn(fn().shape, device=device)
    threads = torch.get_num_threads()
    runs = []
    try:
        for nt in (threads, threads, 1):
            torch.set_num_threads(nt)
            runs.append([fn()] + list(torch.autograd.grad(fn(), params, g)))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


def test_partial_grads_and_no_grad():
    x, w, b = make_linear((7, 11), 5, torch.float32, "cpu", requires_grad=False)
    w.requires_grad_()
    y = linear_act(x, w, b, activation="tanh")
    (gw,) = torch.autograd.grad(y.sum(), [w])
    w2 = leaves(w)[0]
    (gw2,) = torch.autograd.grad(torch.tanh(TF.linear(x, w2, b)).sum(), [w2])
    torch.testing.assert_close(gw, gw2)
    with torch.no_grad():
        y = linear_act(x, w, b, activation="maxout", pool_size=5)
    assert not y.requires_grad
    torch.testing.assert_close(y, torch_maxout(TF.linear(x, w, b), 5))


def test_backward_without_saved_preact_raises():
    x, w, b = make_linear((3, 4), 5, torch.float32, "cpu")
    y, preact = LinearActFunction.apply(x, w, b, "relu", 0.0, 0.0, None, False)
    assert preact.numel() == 0
    with pytest.raises(RuntimeError, match="save_preact"):
        y.sum().backward()


def test_function_classes_and_none_grads():
    x, w, b = make_linear((3, 4), 6, torch.float64, "cpu")
    y = LinearFunction.apply(x, w, None)
    torch.testing.assert_close(y, TF.linear(x, w))
    out, preact = LinearActFunction.apply(x, w, b, "elu", 1.0, 0.0, None, True)
    assert not preact.requires_grad
    # only part of the outputs reaches the loss: the other incoming gradients are None
    (gx,) = torch.autograd.grad(out[:, :2].sum(), [x])
    x2, w2, b2 = leaves(x, w, b)
    (gx2,) = torch.autograd.grad(TF.elu(TF.linear(x2, w2, b2))[:, :2].sum(), [x2])
    torch.testing.assert_close(gx, gx2)


def test_activation_params():
    assert activation_params("relu") == ("relu", 0.0, 0.0)
    assert activation_params("elu") == ("elu", 1.0, 0.0)
    assert activation_params("elu", alpha=0.5) == ("elu", 0.5, 0.0)
    assert activation_params("gelu", approximate="tanh") == ("gelu_tanh", 0.0, 0.0)
    assert activation_params("hardtanh", max_val=2.0) == ("hardtanh", -1.0, 2.0)
    assert activation_params("leaky_relu") == ("leaky_relu", 0.01, 0.0)
    assert activation_params("hardshrink") == ("hardshrink", 0.5, 0.0)
    assert activation_params("maxout", pool_size=4) == ("maxout", 4.0, 0.0)
    assert activation_params("relu", inplace=False) == ("relu", 0.0, 0.0)
    with pytest.raises(ValueError, match="unknown activation"):
        activation_params("swish")
    with pytest.raises(TypeError, match="alpha"):
        activation_params("relu", alpha=1.0)
    with pytest.raises(ValueError, match="approximate"):
        activation_params("gelu", approximate="erf")
    with pytest.raises(TypeError, match="pool_size"):
        activation_params("maxout")
    with pytest.raises(ValueError, match="pool_size"):
        activation_params("maxout", pool_size=0)


BAD = [
    # (description, call, exception, message)
    ("weight dtype", lambda: torch.ops.fastops.linear(torch.randn(3, 4), torch.randn(5, 4).double(),
                                                      None), TypeError, "weight"),
    ("integer input", lambda: torch.ops.fastops.linear(torch.ones(3, 4, dtype=torch.int64),
                                                       torch.ones(5, 4, dtype=torch.int64), None),
     TypeError, "floating-point"),
    ("in_features", lambda: linear(torch.randn(3, 4), torch.randn(5, 6)), RuntimeError,
     "in_features"),
    ("weight dims", lambda: linear(torch.randn(3, 4), torch.randn(4)), RuntimeError,
     "weight"),
    ("0-d input", lambda: linear(torch.tensor(1.0), torch.randn(5, 1)), RuntimeError, "0-d"),
    ("bias size", lambda: linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)),
     RuntimeError, "bias"),
    ("bias dtype", lambda: linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(5).double()),
     TypeError, "bias"),
    ("prelu act_weight size", lambda: linear_act(torch.randn(3, 4), torch.randn(5, 4),
                                                 activation="prelu", act_weight=torch.rand(3)),
     RuntimeError, "act_weight"),
    ("prelu without act_weight", lambda: torch.ops.fastops.linear_act(
        torch.randn(3, 4), torch.randn(5, 4), None, "prelu", 0.0, 0.0, None, False),
     RuntimeError, "act_weight"),
    ("maxout divisible", lambda: linear_act(torch.randn(3, 4), torch.randn(5, 4),
                                            activation="maxout", pool_size=2), RuntimeError,
     "divisible"),
    ("unknown activation (op)", lambda: torch.ops.fastops.linear_act(
        torch.randn(3, 4), torch.randn(5, 4), None, "swish", 0.0, 0.0, None, False),
     RuntimeError, "unknown activation"),
    ("unknown activation", lambda: linear_act(torch.randn(3, 4), torch.randn(5, 4),
                                              activation="swish"), ValueError,
     "unknown activation"),
    ("grad_output shape", lambda: torch.ops.fastops.linear_backward(
        torch.randn(3, 6), torch.randn(3, 4), torch.randn(5, 4), [True, True, True]),
     RuntimeError, "grad_output"),
    ("preact shape", lambda: torch.ops.fastops.linear_act_backward(
        torch.randn(3, 5), torch.randn(3, 4), torch.randn(5, 4), torch.randn(0), "relu", 0.0,
        0.0, None, [True, True, True, False]), RuntimeError, "preact"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a second device")
def test_device_mismatch():
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastops.linear(torch.randn(3, 4), torch.randn(5, 4, device="cuda"), None)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, w, b = make_linear((2, 3, 7), 6, torch.float32, device, requires_grad=False)
    g = torch.randn(2, 3, 6, device=device)
    aw = torch.rand(6, device=device)
    opcheck = torch.library.opcheck
    opcheck(torch.ops.fastops.linear.default, (x, w, b))
    opcheck(torch.ops.fastops.linear.default, (x, w, None))
    opcheck(torch.ops.fastops.linear_backward.default, (g, x, w, [True, True, True]))
    opcheck(torch.ops.fastops.linear_backward.default, (g, x, w, [False, True, False]))
    for act, a, aw_ in [("gelu", 0.0, None), ("elu", 0.5, None), ("prelu", 0.0, aw),
                        ("maxout", 3.0, None)]:
        for save in (True, False):
            opcheck(torch.ops.fastops.linear_act.default, (x, w, b, act, a, 0.0, aw_, save))
        _, z = torch.ops.fastops.linear_act(x, w, b, act, a, 0.0, aw_, True)
        gy = g if act != "maxout" else g[..., :2].contiguous()
        for mask in ([True, True, True, True], [False, False, True, True]):
            opcheck(torch.ops.fastops.linear_act_backward.default,
                    (gy, x, w, z, act, a, 0.0, aw_, mask))


def test_compile_fullgraph():
    x, w, b = make_linear((4, 8), 6, torch.float32, "cpu")
    aw = torch.rand(6, requires_grad=True)

    def fn(x, w, b, aw):
        h = linear(x, w, b)
        h = linear_act(h, w[:, :6], b, activation="prelu", act_weight=aw)
        return linear_act(h, w[:, :6], None, activation="maxout", pool_size=2).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    params = [x, w, b, aw]
    got = torch.autograd.grad(compiled(*params), params)
    want = torch.autograd.grad(fn(*params), params)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
