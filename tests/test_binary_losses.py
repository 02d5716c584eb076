"""The binary cross entropies (binary_cross_entropy on probabilities, and
binary_cross_entropy_with_logits) held against torch: torch's OpInfo samples and our own shapes
in every dtype, every weight and pos_weight broadcast, gradcheck and gradgradcheck in float64,
extremes (logits of +-1e4, probabilities of exactly 0 and 1, inf, NaN), empty tensors, views,
determinism, bad inputs, torch.func, opcheck, torch.compile and the nn modules."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_losses import check_values_and_grads, opinfo_samples
from torch.func import grad, jacfwd, jvp, vmap

import fastops  # noqa: F401  (loads the ops)
from fastops import nn as fnn
from fastops.ops import losses as L

REDUCTIONS = ["none", "mean", "sum"]
NAN, INF = float("nan"), float("inf")
FUNCTIONS = {  # name -> (fastops, torch)
    "binary_cross_entropy": (L.binary_cross_entropy, F.binary_cross_entropy),
    "binary_cross_entropy_with_logits": (L.binary_cross_entropy_with_logits,
                                         F.binary_cross_entropy_with_logits),
}
SHAPE = (9, 41, 7)  # odd sizes: no multiple of a vector width
# weight / pos_weight shapes broadcast to SHAPE: none, per class (last dim), full, inner
# singleton, leading singleton dims, 0-d
BROADCASTS = [None, (7,), SHAPE, (9, 1, 7), (1, 41, 1), ()]
BROADCAST_IDS = ["none", "C", "full", "9x1x7", "1x41x1", "0d"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _probs(shape, gen, low=0.02):
    return torch.rand(shape, generator=gen, dtype=torch.float64) * (1 - 2 * low) + low


def _weights(shape, gen):
    return None if shape is None else torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5


# ---- against torch ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_opinfo_samples(name, dtype, device):
    """torch's OpInfo sample inputs: values and the gradients of input and target."""
    fo, tf = FUNCTIONS[name]
    _, samples = opinfo_samples(name, device, dtype)
    assert samples
    for x, args, kwargs in samples:
        check_values_and_grads(fo, tf, [x, *args], kwargs, dtype, diff=(0, 1))


@pytest.mark.parametrize("weight", BROADCASTS, ids=BROADCAST_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_matches_torch(reduction, weight, dtype, device):
    gen = _gen(1)
    x, y = _probs(SHAPE, gen), _probs(SHAPE, gen, low=0.0)
    y[0] = torch.randint(0, 2, SHAPE[1:], generator=gen)  # hard labels too
    w = _weights(weight, gen)
    args = [t.to(device, dtype) for t in (x, y)]
    kwargs = dict(weight=None if w is None else w.to(device, dtype), reduction=reduction)
    check_values_and_grads(L.binary_cross_entropy, F.binary_cross_entropy, args, kwargs, dtype,
                           diff=(0, 1))


@pytest.mark.parametrize("pos_weight", BROADCASTS, ids=BROADCAST_IDS)
@pytest.mark.parametrize("weight", [None, (7,), SHAPE], ids=["now", "wC", "wfull"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_with_logits_matches_torch(reduction, weight, pos_weight, dtype,
                                                         device):
    gen = _gen(2)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 4
    y = _probs(SHAPE, gen, low=0.0)
    w, p = _weights(weight, gen), _weights(pos_weight, gen)
    kwargs = dict(weight=None if w is None else w.to(device, dtype),
                  pos_weight=None if p is None else (3 * p).to(device, dtype),
                  reduction=reduction)
    check_values_and_grads(L.binary_cross_entropy_with_logits,
                           F.binary_cross_entropy_with_logits,
                           [x.to(device, dtype), y.to(device, dtype)], kwargs, dtype, diff=(0, 1))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100003])
def test_sizes_around_the_vector_width(n, device):
    gen = _gen(3)
    x, y = _probs((n,), gen), _probs((n,), gen)
    for reduction in REDUCTIONS:
        for name, (fo, tf) in FUNCTIONS.items():
            check_values_and_grads(fo, tf, [x.float().to(device), y.float().to(device)],
                                   dict(reduction=reduction), torch.float32, diff=(0, 1))


# ---- gradcheck, gradgradcheck ----------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
def test_binary_cross_entropy_gradcheck(reduction, weighted, device):
    gen = _gen(4)
    x = _probs((4, 5), gen, low=0.1).to(device).requires_grad_(True)
    y = _probs((4, 5), gen, low=0.1).to(device).requires_grad_(True)
    w = _weights((5,), gen).to(device) if weighted else None
    for fn in [lambda a, b: L.binary_cross_entropy(a, b, w, reduction=reduction),
               lambda a, b: L.BinaryCrossEntropyFunction.apply(
                   a, b, w, L._Reduction.get_enum(reduction))]:
        assert torch.autograd.gradcheck(fn, (x, y), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, y), fast_mode=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight", [None, (5,), (4, 5)], ids=["now", "wC", "wfull"])
@pytest.mark.parametrize("pos_weight", [None, (5,), (4, 1), ()], ids=["nop", "pC", "p4x1", "p0d"])
def test_binary_cross_entropy_with_logits_gradcheck(reduction, weight, pos_weight, device):
    gen = _gen(5)
    x = (torch.randn(4, 5, generator=gen, dtype=torch.float64) * 2).to(device)
    y = _probs((4, 5), gen).to(device)
    w = _weights(weight, gen)
    p = _weights(pos_weight, gen)
    w = None if w is None else w.to(device)
    p = None if p is None else (2 * p).to(device)
    x.requires_grad_(True)
    y.requires_grad_(True)
    for fn in [lambda a, b: L.binary_cross_entropy_with_logits(a, b, w, reduction=reduction,
                                                               pos_weight=p),
               lambda a, b: L.BinaryCrossEntropyWithLogitsFunction.apply(
                   a, b, w, p, L._Reduction.get_enum(reduction))]:
        assert torch.autograd.gradcheck(fn, (x, y), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, y), fast_mode=True)
    # the Function twin also differentiates weight and pos_weight (as torch.func does torch's)
    if w is not None and p is not None:
        assert torch.autograd.gradcheck(
            lambda a, b, c, d: L.BinaryCrossEntropyWithLogitsFunction.apply(
                a, b, c, d, L._Reduction.get_enum(reduction)),
            (x, y, w.requires_grad_(True), p.requires_grad_(True)), fast_mode=True)


# ---- extremes --------------------------------------------------------------------------------

def test_binary_cross_entropy_probabilities_at_the_edges(dtype, device):
    """Probabilities of exactly 0 and 1 (each log clamped at -100: losses of 0 or 100,
    gradients of +-1e12 (EPSILON), target gradients of +-inf), subnormal and near-edge ones,
    against torch, in the value and in both gradients."""
    tiny = 1e-40 if dtype in (torch.float32, torch.float64, torch.bfloat16) else 1e-7
    xs = [0.0, 1.0, 0.0, 1.0, tiny, 1e-8, 1 - 1e-7, 0.5, 0.25, 1.0, 0.0]
    ys = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0.3, 0.7]
    x = torch.tensor(xs * 3, dtype=dtype, device=device)
    y = torch.tensor(ys * 3, dtype=dtype, device=device)
    for reduction in REDUCTIONS:
        check_values_and_grads(L.binary_cross_entropy, F.binary_cross_entropy, [x, y],
                               dict(reduction=reduction), dtype, diff=(0, 1))
    out = L.binary_cross_entropy(x, y, reduction="none")
    assert out[2].item() == 100 and out[3].item() == 100 and out[0].item() == 0


def test_binary_cross_entropy_with_logits_extremes(dtype, device):
    """Logits of +-1e4, +-inf, NaN, the edges of exp's range, and NaN targets: values and both
    gradients against torch (NaN where torch's are)."""
    xs = [1e4, -1e4, 1e4, -1e4, INF, -INF, INF, NAN, 88.7, -88.7, 20.0, -20.0, 0.0, 3.0]
    ys = [0.0, 0.0, 0.3, 0.999, 0.3, 0.0, 1.0, 0.5, 1.0, 0.0, 0.01, 0.99, NAN, 0.5]
    x = torch.tensor(xs * 2, dtype=dtype, device=device)
    y = torch.tensor(ys * 2, dtype=dtype, device=device)
    for kwargs in [{}, dict(pos_weight=torch.full((), 2.5, dtype=dtype, device=device)),
                   dict(weight=torch.full((len(xs) * 2,), 0.5, dtype=dtype, device=device))]:
        check_values_and_grads(L.binary_cross_entropy_with_logits,
                               F.binary_cross_entropy_with_logits, [x, y],
                               dict(reduction="none", **kwargs), dtype, diff=(0, 1))


def test_binary_cross_entropy_with_logits_large_logits_keep_digits(device):
    """Large logits with targets near 0 or 1: the loss is a small difference of large terms;
    float32 stays within 1e-6 relative of the float64 answer."""
    gen = _gen(6)
    x = ((torch.rand(4096, generator=gen, dtype=torch.float64) * 2 - 1) * 1e4)
    y = torch.where(torch.rand(4096, generator=gen) < 0.5, 1e-3, 1 - 1e-3).double()
    for p in [None, torch.tensor(3.0, dtype=torch.float64)]:
        xf, yf = x.float(), y.float()
        ours = L.binary_cross_entropy_with_logits(
            xf.to(device), yf.to(device), reduction="none",
            pos_weight=None if p is None else p.float().to(device))
        ref = F.binary_cross_entropy_with_logits(xf.double(), yf.double(), reduction="none",
                                                 pos_weight=p)
        torch.testing.assert_close(ours.double().cpu(), ref, rtol=1e-6, atol=0)


# ---- empty, views ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_empty_tensors(name, device):
    fo, tf = FUNCTIONS[name]
    for shape in [(0,), (0, 3), (2, 0, 4)]:
        for reduction in REDUCTIONS:
            x = torch.rand(shape, device=device, requires_grad=True)
            y = torch.rand(shape, device=device, requires_grad=True)
            w = torch.rand(shape[-1:], device=device)
            ours = fo(x, y, w, reduction=reduction)
            torch.testing.assert_close(ours, tf(x, y, w, reduction=reduction), equal_nan=True)
            if reduction == "mean":
                assert ours.isnan()  # mean of nothing, as torch
            gx, gy = torch.autograd.grad(ours.sum(), [x, y])
            assert gx.shape == x.shape and gy.shape == y.shape


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_views_and_misaligned_storage(name, device):
    """Transposed, strided and one-element-offset inputs, targets and weights."""
    fo, tf = FUNCTIONS[name]
    gen = _gen(7)
    base = _probs((64 * 33 + 1,), gen).to(device)
    tbase = _probs((64 * 33 + 1,), gen).to(device)
    wbase = _weights((200,), gen).to(device)
    views = [(base[1:].view(64, 33), tbase[:-1].view(64, 33), wbase[1:34]),
             (base[1:].view(64, 33).t(), tbase[1:].view(33, 64), wbase[::2][:64]),
             (base[::3][:600].view(20, 30), tbase[1::2][:600].view(30, 20).t(), None)]
    for x, y, w in views:
        for reduction in REDUCTIONS:
            kwargs = dict(weight=w, reduction=reduction)
            if name.endswith("logits"):
                kwargs["pos_weight"] = None if w is None else w.flip(0)
            check_values_and_grads(fo, tf, [x, y], kwargs, torch.float64, diff=(0, 1))


# ---- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_deterministic(name):
    """Two backward passes give the same bits; the reduced forward does not depend on the
    number of threads."""
    fo, _ = FUNCTIONS[name]
    gen = _gen(8)
    x = _probs((1_000_003,), gen).float().requires_grad_(True)
    y = _probs((1_000_003,), gen).float()
    outs, grads = [], []
    for threads in [1, 2, 1]:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = fo(x, y)
            outs.append(out)
            grads.append(torch.autograd.grad(out, x)[0])
        finally:
            torch.set_num_threads(prev)
    assert all(torch.equal(outs[0], o) for o in outs)
    assert all(torch.equal(grads[0], g) for g in grads)


# ---- bad inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [1.5, -0.25, NAN, INF])
def test_binary_cross_entropy_input_outside_unit_range_raises(bad):
    x = torch.rand(5, 40)
    x[3, 17] = bad
    y = torch.rand(5, 40)
    for reduction in REDUCTIONS:
        with pytest.raises(RuntimeError, match=r"fastops.binary_cross_entropy: all elements of "
                           r"input should be between 0 and 1, got self\[3, 17\] = "):
            L.binary_cross_entropy(x, y, reduction=reduction)
    with pytest.raises(RuntimeError, match=r"all elements of target .*target\[3, 17\]"):
        L.binary_cross_entropy(y, x)
    with pytest.raises(RuntimeError, match=r"got self = "):
        L.binary_cross_entropy(x[3, 17], y[3, 17])  # 0-d
    # the process is fine afterwards
    torch.testing.assert_close(L.binary_cross_entropy(y, y), F.binary_cross_entropy(y, y))


@pytest.mark.parametrize("call", [
    "F.binary_cross_entropy(x, y)",
    "F.binary_cross_entropy(y, x, reduction='none')",
    "F.binary_cross_entropy(x.double(), y.double(), reduction='sum')",
])
def test_cuda_outside_unit_range_is_an_error(call):
    """On CUDA the range check is a device-side assertion: an error in Python (in a fresh
    process, whose CUDA context it poisons), never a silent NaN."""
    if not fastops.cuda_available():
        pytest.skip("needs a GPU")
    from test_cuda import run_python
    result = run_python(f"""
        import torch, fastops
        import fastops.functional as F
        x = torch.rand(1000, device="cuda")
        x[637] = 1.5
        y = torch.rand(1000, device="cuda")
        try:
            out = {call}
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("raised:", e)
            raise SystemExit(3)
        print("no error, got", out)
        """)
    assert result.returncode == 3, result.stdout + result.stderr


def test_bad_inputs_raise_clear_errors():
    x, y = torch.rand(4, 5), torch.rand(4, 5)
    ops = torch.ops.fastops
    for name, fo in [("binary_cross_entropy", L.binary_cross_entropy),
                     ("binary_cross_entropy_with_logits", L.binary_cross_entropy_with_logits)]:
        with pytest.raises(ValueError, match="size"):
            fo(x, y[:, :3])
        with pytest.raises(ValueError, match="not a valid value for reduction"):
            fo(x, y, reduction="avg")
        with pytest.raises(TypeError, match="floating-point"):
            fo(x.long(), y.long())
        with pytest.raises(RuntimeError, match="broadcastable to the shape of self"):
            fo(x, y, torch.rand(3))
        with pytest.raises(RuntimeError, match="broadcastable to the shape of self"):
            fo(x, y, torch.rand(2, 4, 5))
    with pytest.raises(TypeError, match="dtype"):
        ops.binary_cross_entropy(x, y.double(), None, 1)
    with pytest.raises(TypeError, match="weight"):
        ops.binary_cross_entropy_with_logits(x, y, torch.rand(5).double(), None, 1)
    with pytest.raises(TypeError, match="pos_weight"):
        ops.binary_cross_entropy_with_logits(x, y, None, torch.rand(5).half(), 1)
    with pytest.raises(RuntimeError, match="pos_weight"):
        L.binary_cross_entropy_with_logits(x, y, pos_weight=torch.rand(4))
    with pytest.raises(RuntimeError, match="shape"):
        ops.binary_cross_entropy_with_logits(x, y[:3], None, None, 1)
    with pytest.raises(RuntimeError, match="reduction"):
        ops.binary_cross_entropy(x, y, None, 7)
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.binary_cross_entropy_backward(torch.ones(3), x, y, None, 0, [True, True])
    with pytest.raises(RuntimeError, match="grad_output"):
        ops.binary_cross_entropy_with_logits_backward(torch.ones(2), x, y, None, None, 1,
                                                      [True, False])
    assert torch.isfinite(L.binary_cross_entropy_with_logits(x, y))


def test_weight_requiring_grad_raises_as_in_torch():
    """torch does not differentiate weight or pos_weight (its autograd raises when they require
    a gradient): neither does fastops, with the same kind of error, never a silent zero."""
    x = torch.rand(3, 4, requires_grad=True)
    y = torch.rand(3, 4)
    w = torch.rand(4, requires_grad=True)
    for fo, tf, kwargs in [(L.binary_cross_entropy, F.binary_cross_entropy, dict(weight=w)),
                           (L.binary_cross_entropy_with_logits,
                            F.binary_cross_entropy_with_logits, dict(weight=w)),
                           (L.binary_cross_entropy_with_logits,
                            F.binary_cross_entropy_with_logits, dict(pos_weight=w))]:
        arg = next(iter(kwargs))
        with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument "
                                               f"'{arg}'"):
            tf(x, y, **kwargs)
        with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument "
                                               f"'{arg}'"):
            fo(x, y, **kwargs)
        with torch.no_grad():  # no graph: fine, as in torch
            torch.testing.assert_close(fo(x, y, **kwargs), tf(x, y, **kwargs))
    with pytest.raises(RuntimeError, match="not differentiable"):  # the Function twin too
        L.BinaryCrossEntropyFunction.apply(x, y, w, 1).backward()


def test_wrong_device():
    if not fastops.cuda_available():
        pytest.skip("needs a GPU")
    x = torch.rand(4, 5, device="cuda")
    for fo in [L.binary_cross_entropy, L.binary_cross_entropy_with_logits]:
        with pytest.raises(RuntimeError, match="device"):
            fo(x, torch.rand(4, 5))
        with pytest.raises(RuntimeError, match="device"):
            fo(x, x, torch.rand(5))
    with pytest.raises(RuntimeError, match="device"):
        L.binary_cross_entropy_with_logits(x, x, pos_weight=torch.rand(5))
    with pytest.raises(RuntimeError, match="device"):
        L.l1_loss(x, torch.rand(4, 5))
    torch.testing.assert_close(L.binary_cross_entropy(x, x), F.binary_cross_entropy(x, x))


# ---- functional options ----------------------------------------------------------------------

def test_legacy_arguments_and_dtype_rules():
    gen = _gen(9)
    x, y = _probs((6, 5), gen).float(), _probs((6, 5), gen).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sa, red in [(False, None), (None, False), (True, True), (False, False)]:
            for fo, tf in FUNCTIONS.values():
                torch.testing.assert_close(fo(x, y, size_average=sa, reduce=red),
                                           tf(x, y, size_average=sa, reduce=red))
    # mixed dtypes: the logits form computes in the target's dtype, as torch's; a weight of
    # another dtype is cast
    w64 = torch.rand(5, dtype=torch.float64)
    for kwargs in [dict(weight=w64), dict(pos_weight=w64.half()), dict()]:
        for xi, target in [(x, y), (x, y.double()), (x.double(), y), (x.half(), y)]:
            xi = xi.clone().requires_grad_(True)
            ours = L.binary_cross_entropy_with_logits(xi, target, **kwargs)
            ref = F.binary_cross_entropy_with_logits(xi, target, **kwargs)
            assert ours.dtype == ref.dtype
            torch.testing.assert_close(ours, ref)
            (g,) = torch.autograd.grad(ours, xi)
            assert g.dtype == xi.dtype
            torch.testing.assert_close(g, torch.autograd.grad(ref, xi)[0])
    ours = L.binary_cross_entropy(x, y, w64)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, F.binary_cross_entropy(x, y, w64))


def test_function_twins_and_none_gradients():
    gen = _gen(15)
    x, y = _probs((3, 4), gen), _probs((3, 4), gen)
    p = _weights((4,), gen)
    torch.testing.assert_close(
        L.BinaryCrossEntropyWithLogitsFunction.apply(x, y, None, p, 2),
        F.binary_cross_entropy_with_logits(x, y, reduction="sum", pos_weight=p))
    torch.testing.assert_close(L.BinaryCrossEntropyFunction.apply(x, y, p, 0),
                               F.binary_cross_entropy(x, y, p, reduction="none"))
    from types import SimpleNamespace
    ctx = SimpleNamespace(needs_input_grad=(True, True, False, False, False))
    assert all(r is None for r in L.BinaryCrossEntropyFunction.backward(ctx, None))
    assert all(r is None for r in L.BinaryCrossEntropyWithLogitsFunction.backward(ctx, None))


# ---- torch.func ------------------------------------------------------------------------------

def test_func_weight_and_pos_weight_gradients_as_torch_func():
    """torch.func differentiates the weight and pos_weight of torch's
    binary_cross_entropy_with_logits (its eager autograd does not): fastops too, under grad,
    jacfwd and jvp; binary_cross_entropy's weight raises under both."""
    gen = _gen(10)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    y = _probs((3, 4), gen)
    w = _weights((4,), gen)
    p = 2 * _weights((3, 1), gen)
    for reduction in REDUCTIONS:
        for fo, tf in [(L.binary_cross_entropy_with_logits,
                        F.binary_cross_entropy_with_logits)]:
            def loss(fn):
                return lambda w_, p_: fn(x, y, w_, reduction=reduction, pos_weight=p_).sum()
            torch.testing.assert_close(grad(loss(fo), argnums=(0, 1))(w, p),
                                       grad(loss(tf), argnums=(0, 1))(w, p))
            torch.testing.assert_close(jacfwd(loss(fo), argnums=(0, 1))(w, p),
                                       jacfwd(loss(tf), argnums=(0, 1))(w, p))
            tangents = (torch.ones_like(w), torch.ones_like(p))
            torch.testing.assert_close(jvp(loss(fo), (w, p), tangents),
                                       jvp(loss(tf), (w, p), tangents))
    with pytest.raises(RuntimeError, match="not differentiable"):
        grad(lambda w_: L.binary_cross_entropy(torch.sigmoid(x), y, w_))(w)


def test_vmap_with_batched_weights():
    """Per-sample weight and pos_weight (ensembles) fold into one call, as torch's vmap."""
    gen = _gen(11)
    x = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    y = _probs((5, 3, 4), gen)
    w = _weights((5, 4), gen)
    p = _weights((5, 3, 1), gen)
    for reduction in REDUCTIONS:
        for in_dims, args in [((0, 0, 0, 0), (x, y, w, p)),
                              ((None, 0, 0, None), (x[0], y, w, p[0])),
                              ((0, None, None, 0), (x, y[0], w[0], p))]:
            def f(fn):
                return vmap(lambda a, b, c, d: fn(a, b, c, reduction=reduction, pos_weight=d),
                            in_dims=in_dims)
            torch.testing.assert_close(f(L.binary_cross_entropy_with_logits)(*args),
                                       f(F.binary_cross_entropy_with_logits)(*args))
        probs = torch.sigmoid(x)
        torch.testing.assert_close(
            vmap(lambda a, b, c: L.binary_cross_entropy(a, b, c, reduction=reduction))(
                probs, y, w),
            vmap(lambda a, b, c: F.binary_cross_entropy(a, b, c, reduction=reduction))(
                probs, y, w))


def test_forward_ad_dual_tensors():
    import torch.autograd.forward_ad as fwAD
    gen = _gen(12)
    x, y = _probs((3, 4), gen), _probs((3, 4), gen)
    tx, ty = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(
        3, 4, generator=gen, dtype=torch.float64)
    w = _weights((4,), gen)
    for fo, tf in FUNCTIONS.values():
        out = []
        for fn in (fo, tf):
            with fwAD.dual_level():
                r = fn(fwAD.make_dual(x, tx), fwAD.make_dual(y, ty), w)
                out.append(fwAD.unpack_dual(r))
        torch.testing.assert_close(out[0].primal, out[1].primal)
        torch.testing.assert_close(out[0].tangent, out[1].tangent)


# ---- opcheck, compile, modules ---------------------------------------------------------------

def _opcheck_cases():
    gen = _gen(13)
    x, y = _probs((4, 6), gen), _probs((4, 6), gen)
    w, p = _weights((6,), gen), _weights((4, 1), gen)
    g0, g = torch.tensor(1.0, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    ops = torch.ops.fastops
    return [
        (ops.binary_cross_entropy, (x, y, None, 1)),
        (ops.binary_cross_entropy, (x, y, w, 0)),
        (ops.binary_cross_entropy_backward, (g0, x, y, w, 1, [True, True])),
        (ops.binary_cross_entropy_backward, (g, x, y, None, 0, [True, False])),
        (ops.binary_cross_entropy_with_logits, (x, y, None, None, 1)),
        (ops.binary_cross_entropy_with_logits, (x, y, w, p, 0)),
        (ops.binary_cross_entropy_with_logits, (x, y, None, p, 2)),
        (ops.binary_cross_entropy_with_logits_backward, (g0, x, y, w, p, 1, [True, True])),
        (ops.binary_cross_entropy_with_logits_backward, (g, x, y, None, None, 0, [False, True])),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    if not op._qualified_op_name.endswith("_backward"):  # the backward ops have no autograd
        args = tuple(a.clone().requires_grad_(True) if i < 2 else a for i, a in enumerate(args))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("loss", ["L1Loss", "BCELoss", "BCEWithLogitsLoss"])
def test_compile_fullgraph_module(loss):
    torch._dynamo.reset()
    kwargs = {"BCELoss": dict(weight=torch.rand(3)),
              "BCEWithLogitsLoss": dict(weight=torch.rand(3), pos_weight=torch.rand(3) + 1)}
    kwargs = kwargs.get(loss, {})
    torch.manual_seed(0)
    model = torch.nn.Sequential(fnn.Linear(8, 3), *([fnn.Sigmoid()] if loss == "BCELoss" else []))
    ours, ref = getattr(fnn, loss)(**kwargs), getattr(torch.nn, loss)(**kwargs)
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.rand(16, 3)

    def step(loss_fn):
        return lambda a: loss_fn(model(a), y)

    compiled = torch.compile(step(ours), fullgraph=True, backend="aot_eager")
    got, want = compiled(x), step(ref)(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, x), torch.autograd.grad(want, x))


def test_modules_match_torch_and_convert():
    w, p = torch.rand(5), torch.rand(5) + 0.5
    pairs = [(fnn.L1Loss(reduction="sum"), torch.nn.L1Loss(reduction="sum")),
             (fnn.BCELoss(w), torch.nn.BCELoss(w)),
             (fnn.BCEWithLogitsLoss(w, reduction="none", pos_weight=p),
              torch.nn.BCEWithLogitsLoss(w, reduction="none", pos_weight=p)),
             (fnn.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss())]
    gen = _gen(14)
    x, y = _probs((4, 5), gen).float(), _probs((4, 5), gen).float()
    for ours, ref in pairs:
        assert repr(ours) == repr(ref)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
        ours.load_state_dict(ref.state_dict())
        torch.testing.assert_close(ours(x, y), ref(x, y))
    assert list(fnn.BCEWithLogitsLoss(w, pos_weight=p).state_dict()) == ["weight", "pos_weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = fnn.L1Loss(size_average=False)
    assert legacy.reduction == "sum"
    # convert swaps the torch modules in place; buffers stay the same objects
    model = torch.nn.ModuleDict({"l1": torch.nn.L1Loss(), "bce": torch.nn.BCELoss(w),
                                 "logits": torch.nn.BCEWithLogitsLoss(pos_weight=p)})
    buffers = [id(b) for b in model.buffers()]
    fnn.convert(model)
    assert type(model["l1"]) is fnn.L1Loss and type(model["bce"]) is fnn.BCELoss
    assert type(model["logits"]) is fnn.BCEWithLogitsLoss
    assert [id(b) for b in model.buffers()] == buffers
    torch.testing.assert_close(model["logits"](x, y),
                               F.binary_cross_entropy_with_logits(x, y, pos_weight=p))
