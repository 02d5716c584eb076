"""The losses (log_softmax, softmax, nll_loss, cross_entropy, mse_loss, l1_loss) held against
torch: values and gradients in every dtype, gradcheck in float64, every option, odd and empty
shapes, views, extreme values, determinism, bad inputs and torch.library.opcheck. (The binary
cross entropies: test_binary_losses.py.)"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fastops  # noqa: F401  (loads the ops)
from fastops.ops import losses as L
from conftest import tol

REDUCTIONS = ["none", "mean", "sum"]
# (input shape, class dim size): (N, C), odd (N, C), (N, C, d1), (N, C, d1, d2), (C,)
SHAPES = [(9, 341), (5, 7), (9, 41, 7), (3, 5, 17, 3), (341,)]
SHAPE_IDS = ["9x341", "5x7", "9x41x7", "3x5x17x3", "C341"]


def _class_dim(shape):
    return 0 if len(shape) == 1 else 1


def _target(shape, C, gen, ignore=None, frac=0.0):
    tshape = [s for d, s in enumerate(shape) if d != _class_dim(shape)]
    t = torch.randint(0, C, tshape, generator=gen)
    if ignore is not None and frac > 0:
        mask = torch.rand(tshape, generator=gen) < frac
        t = torch.where(mask, torch.full_like(t, ignore), t)
    return t


def _inputs(shape, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return x, gen


def _ref_f64(fn, x, *args, **kwargs):
    """torch in float64 from the same (rounded) inputs: the reference for every dtype."""
    xr = x.detach().double().requires_grad_(True)
    args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kwargs.items()}
    out = fn(xr, *args, **kwargs)
    return out, xr


def _to(device, v):
    return v.to(device) if isinstance(v, torch.Tensor) else v


def _check_vs_torch(fo_fn, torch_fn, x, dtype, *args, device="cpu", **kwargs):
    """Values and gradients against torch in float64 from the same inputs, on device. 16-bit
    dtypes pass within tol(dtype) or within twice torch's own error in that dtype."""
    x = x.to(device)
    args = [_to(device, a) for a in args]
    kwargs = {k: _to(device, v) for k, v in kwargs.items()}
    xf = x.detach().clone().requires_grad_(True)
    out = fo_fn(xf, *args, **kwargs)
    ref, xr = _ref_f64(torch_fn, x, *args, **kwargs)
    assert out.dtype == dtype and out.shape == ref.shape
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.device)
    out.backward(g.to(dtype))
    ref.backward(g)
    assert xf.grad.dtype == dtype
    atol, rtol = tol(dtype)["atol"], tol(dtype)["rtol"]
    out_atol = grad_atol = atol
    if dtype in (torch.float16, torch.bfloat16):
        xt = x.detach().clone().requires_grad_(True)
        theirs = torch_fn(xt, *args, **kwargs)
        theirs.backward(g.to(dtype))
        finite = torch.isfinite(ref.detach()) & torch.isfinite(theirs.detach().double())
        if finite.any():
            err = (theirs.detach().double() - ref.detach())[finite].abs().max().item()
            out_atol = max(atol, 2 * err)
        gfin = torch.isfinite(xr.grad) & torch.isfinite(xt.grad.double())
        if gfin.any():
            grad_atol = max(atol, 2 * (xt.grad.double() - xr.grad)[gfin].abs().max().item())
    torch.testing.assert_close(out.double(), ref.detach(), equal_nan=True, atol=out_atol,
                               rtol=rtol)
    torch.testing.assert_close(xf.grad.double(), xr.grad, equal_nan=True, atol=grad_atol,
                               rtol=rtol)


def check_values_and_grads(fo_fn, torch_fn, args, kwargs, dtype, diff=(0,)):
    """fo_fn(*args, **kwargs) against torch_fn in float64 from the same (rounded) inputs: the
    value and the gradients of args[i] for i in diff, on the args' device. 16-bit dtypes pass
    within tol(dtype) or within twice torch's own error in that dtype, value and each gradient
    apart."""
    def run(fn, cast):
        a = [cast(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args]
        kw = {k: cast(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in kwargs.items()}
        for i in diff:
            a[i] = a[i].detach().clone().requires_grad_(True)
        out = fn(*a, **kw)
        return out, [a[i] for i in diff]

    out, leaves = run(fo_fn, lambda t: t)
    ref, ref_leaves = run(torch_fn, lambda t: t.double())
    assert out.dtype == dtype and out.shape == ref.shape
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.device)
    grads = torch.autograd.grad(out, leaves, g.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    atol, rtol = tol(dtype)["atol"], tol(dtype)["rtol"]
    atols = [atol] * (1 + len(diff))
    if dtype in (torch.float16, torch.bfloat16):
        theirs, their_leaves = run(torch_fn, lambda t: t)
        their_grads = torch.autograd.grad(theirs, their_leaves, g.to(dtype))
        for k, (a, b) in enumerate(zip([theirs, *their_grads], [ref, *ref_grads])):
            a, b = a.detach().double(), b.detach()
            finite = torch.isfinite(a) & torch.isfinite(b)
            if finite.any():
                atols[k] = max(atol, 2 * (a - b)[finite].abs().max().item())
    for k, (a, b) in enumerate(zip([out, *grads], [ref, *ref_grads])):
        assert a.dtype == dtype
        # rounded to the dtype: where the exact value overflows float16, inf is the answer
        torch.testing.assert_close(a.detach().double(), b.detach().to(dtype).double(),
                                   equal_nan=True, atol=atols[k], rtol=rtol)


def opinfo_samples(name, device, dtype):
    """torch's OpInfo sample inputs of nn.functional.NAME: (input, args, kwargs) each."""
    from torch.testing._internal.common_methods_invocations import op_db
    (op,) = [o for o in op_db if o.name == f"nn.functional.{name}" and not o.variant_test_name]
    return op, [(s.input.detach(), [a.detach() if isinstance(a, torch.Tensor) else a
                                    for a in s.args], s.kwargs)
                for s in op.sample_inputs(device, dtype, requires_grad=False)]


# ---- cross_entropy ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15], ids=["ls0", "ls.15"])
def test_cross_entropy_matches_torch(shape, reduction, weighted, smoothing, dtype, device):
    C = shape[_class_dim(shape)]
    x, gen = _inputs(shape, dtype)
    t = _target(shape, C, gen, ignore=-100, frac=0.2)
    w = None
    if weighted:
        w = torch.rand(C, generator=gen, dtype=torch.float64)
        w[::3] = 0  # zero weights too
        w = w.to(dtype)
    _check_vs_torch(L.cross_entropy, F.cross_entropy, x, dtype, t, weight=w,
                    reduction=reduction, label_smoothing=smoothing, device=device)


@pytest.mark.parametrize("shape", [(9, 341), (9, 41, 7), (341,)], ids=["9x341", "9x41x7", "C"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["ls0", "ls.2"])
def test_cross_entropy_soft_targets(shape, reduction, weighted, smoothing, dtype, device):
    C = shape[_class_dim(shape)]
    x, gen = _inputs(shape, dtype)
    y = torch.rand(shape, generator=gen, dtype=torch.float64).softmax(_class_dim(shape))
    y = y.to(dtype)
    w = torch.rand(C, generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    _check_vs_torch(L.cross_entropy, F.cross_entropy, x, dtype, y, weight=w,
                    reduction=reduction, label_smoothing=smoothing, device=device)


# Rows of fewer classes than the kernels' 16 lanes run 16 rows at a time, class-major, the last
# block partial; 40000 x 2 is enough blocks for two threads.
@pytest.mark.parametrize("shape", [(37, 3), (16, 10), (1, 15), (40000, 2)],
                         ids=["37x3", "16x10", "1x15", "40000x2"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
def test_cross_entropy_few_classes(shape, soft, weighted, dtype, device):
    C = shape[1]
    x, gen = _inputs(shape, dtype)
    if soft:
        t = torch.rand(shape, generator=gen, dtype=torch.float64).softmax(1).to(dtype)
    else:
        t = _target(shape, C, gen, ignore=-100, frac=0.2)
    w = torch.rand(C, generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    for reduction, smoothing in [("none", 0.0), ("mean", 0.1)]:
        _check_vs_torch(L.cross_entropy, F.cross_entropy, x, dtype, t, weight=w,
                        reduction=reduction, label_smoothing=smoothing, device=device)


def test_cross_entropy_soft_target_grad():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.rand(4, 6, dtype=torch.float64).softmax(1).requires_grad_(True)
    w = torch.rand(6, dtype=torch.float64)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda a, b: L.cross_entropy(a, b, weight=w, reduction=reduction,
                                         label_smoothing=0.1), (x, y), fast_mode=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_ignore_index(reduction):
    x, gen = _inputs((16, 10), torch.float32)
    t = torch.randint(0, 10, (16,), generator=gen)
    t[::2] = 3  # an ignore_index inside the class range
    w = torch.rand(10, generator=gen)
    _check_vs_torch(L.cross_entropy, F.cross_entropy, x, torch.float32, t, weight=w,
                    ignore_index=3, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_all_ignored(smoothing, weighted):
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.full((4,), -100)
    w = torch.rand(5) if weighted else None
    for reduction in REDUCTIONS:
        ours = L.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
        ref = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
        torch.testing.assert_close(ours, ref, equal_nan=True)
    assert torch.isnan(L.cross_entropy(x, t, weight=w)).item()
    (g,) = torch.autograd.grad(L.cross_entropy(x, t, reduction="sum"), x)
    assert (g == 0).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(4, 5), (4, 5, 3)], ids=str)
def test_cross_entropy_zero_total_weight(shape, smoothing, device):
    """Every target's class weight 0: 'mean' is NaN as in torch (its nll part is 0 / 0), also
    with label smoothing, whose smoothing sum alone would make it inf; 'sum' is finite."""
    x = torch.randn(shape, device=device)
    t = torch.tensor([0, 1, 1, 0], device=device)
    if len(shape) == 3:
        t = t.unsqueeze(1).expand(-1, shape[2]).contiguous()
    w = torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0], device=device)
    for reduction in REDUCTIONS:
        ours = L.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
        ref = F.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
        torch.testing.assert_close(ours, ref, equal_nan=True)


def test_cross_entropy_uint8_target():
    x = torch.randn(6, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 4, 0], dtype=torch.uint8)
    _check_vs_torch(L.cross_entropy, F.cross_entropy, x, torch.float32, t)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_empty_batch(reduction):
    for shape in [(0, 5), (0, 5, 3), (2, 5, 0)]:
        x = torch.randn(shape, requires_grad=True)
        tshape = [s for d, s in enumerate(shape) if d != 1]
        t = torch.zeros(tshape, dtype=torch.long)
        ours = L.cross_entropy(x, t, reduction=reduction)
        ref = F.cross_entropy(x, t, reduction=reduction)
        torch.testing.assert_close(ours, ref, equal_nan=True)
        ours.sum().backward()
        assert x.grad.shape == x.shape
        # soft targets of an empty batch
        y = torch.zeros(shape)
        torch.testing.assert_close(L.cross_entropy(x, y, reduction=reduction),
                                   F.cross_entropy(x, y, reduction=reduction), equal_nan=True)


def test_cross_entropy_views():
    """Non-contiguous (transposed), strided and offset (sliced) inputs and targets."""
    base = torch.randn(40, 30, dtype=torch.float64)
    tbase = torch.randint(0, 30, (80,))
    views = [base.t()[:29, :], base[1:, ::1][:, 1:], base[::2, ::3], base[3:]]
    for x in views:
        C = x.shape[1]
        t = tbase[1::2][:x.shape[0]] % C
        _check_vs_torch(L.cross_entropy, F.cross_entropy, x, torch.float64, t,
                        label_smoothing=0.1)
    x4 = torch.randn(3, 7, 5, 4, dtype=torch.float64).permute(0, 1, 3, 2)  # (3, 7, 4, 5)
    t4 = torch.randint(0, 7, (3, 5, 4)).transpose(1, 2)
    _check_vs_torch(L.cross_entropy, F.cross_entropy, x4, torch.float64, t4)


def test_cross_entropy_large_logits(dtype):
    gen = torch.Generator().manual_seed(3)
    x = ((torch.rand(8, 300, generator=gen) * 2 - 1) * 1e4).to(dtype)
    t = torch.randint(0, 300, (8,), generator=gen)
    for xs in [x, x.view(8, 30, 10)]:
        ts = t if xs.dim() == 2 else torch.randint(0, 30, (8, 10), generator=gen)
        xr = xs.clone().requires_grad_(True)
        out = L.cross_entropy(xr, ts, reduction="none", label_smoothing=0.1)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(xr.grad).all()
        ref = F.cross_entropy(xs.double(), ts, reduction="none", label_smoothing=0.1)
        torch.testing.assert_close(out.double(), ref, rtol=1e-2 if dtype.itemsize == 2 else 1e-5,
                                   atol=1e-2)


def test_cross_entropy_confident_bf16():
    """Softmax near 1 in bf16: our error against a float32 reference is at most ~2x torch's."""
    gen = torch.Generator().manual_seed(4)
    N, C = 64, 1000
    t = torch.randint(0, C, (N,), generator=gen)
    x32 = torch.randn(N, C, generator=gen)
    x32[torch.arange(N), t] += 20.0
    x = x32.bfloat16()
    xf = x.float().requires_grad_(True)
    ref = F.cross_entropy(xf, t, reduction="none")
    (gref,) = torch.autograd.grad(ref.sum(), xf)
    errs = {}
    for name, fn in [("fastops", L.cross_entropy), ("torch", F.cross_entropy)]:
        xb = x.clone().requires_grad_(True)
        out = fn(xb, t, reduction="none")
        (g,) = torch.autograd.grad(out.sum(), xb)
        errs[name] = ((out.float() - ref).abs().max().item(), (g.float() - gref).abs().max().item())
    assert errs["fastops"][0] <= 2 * errs["torch"][0] + 1e-6, errs
    assert errs["fastops"][1] <= 2 * errs["torch"][1] + 1e-6, errs


def test_cross_entropy_nan_inf_like_torch():
    x = torch.randn(6, 9, dtype=torch.float64)
    x[0, 2] = float("nan")
    x[1, 3] = float("inf")
    x[2, 4] = -float("inf")
    x[3, :] = -float("inf")
    x[4, 5] = float("-inf")
    t = torch.tensor([1, 2, 3, 4, 5, 6])
    for xs, ts in [(x, t), (x.t().contiguous().view(9, 6).t().unsqueeze(2).expand(6, 9, 3),
                            t.unsqueeze(1).expand(6, 3))]:
        xs = xs.contiguous()
        a = xs.clone().requires_grad_(True)
        b = xs.clone().requires_grad_(True)
        ours = L.cross_entropy(a, ts, reduction="none")
        ref = F.cross_entropy(b, ts, reduction="none")
        torch.testing.assert_close(ours, ref, equal_nan=True)
        ours.sum().backward()
        ref.sum().backward()
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


def test_cross_entropy_long_row_with_leading_neg_inf():
    """A row whose first chunk is all -inf (C larger than one chunk) stays finite."""
    x = torch.randn(2, 5000, dtype=torch.float64)
    x[:, :3000] = -float("inf")
    t = torch.tensor([4000, 4999])
    _check_vs_torch(L.cross_entropy, F.cross_entropy, x, torch.float64, t, label_smoothing=0.0)


@pytest.mark.parametrize("fn", [L.cross_entropy, L.nll_loss])
@pytest.mark.parametrize("weighted", [False, True])
def test_class_target_out_of_bounds(fn, weighted):
    """The first bad target is named, ignore_index is skipped, and a batch that is all good
    still runs (the check is one branch-free pass, then a second only to name the bad one)."""
    x = torch.randn(5, 3).log_softmax(1)
    w = torch.rand(3) if weighted else None
    for bad in (3, -1):
        t = torch.tensor([0, -100, 2, bad, 7])
        with pytest.raises(IndexError, match=rf"target {bad} \(at flat index 3\) is out of bounds"):
            fn(x, t, weight=w)
    t = torch.tensor([0, -100, 2, 1, -100])
    torch.testing.assert_close(fn(x, t, weight=w), getattr(F, fn.__name__)(x, t, weight=w))


def test_cross_entropy_deterministic():
    x = torch.randn(300, 257, requires_grad=True)
    t = torch.randint(0, 257, (300,))
    xs = torch.randn(4, 33, 50, requires_grad=True)
    ts = torch.randint(0, 33, (4, 50))
    # few classes: rows run 16 at a time in the lanes, several blocks of them per thread task
    xf = torch.randn(3001, 3, requires_grad=True)
    tf = torch.randint(0, 3, (3001,))
    for xi, ti in [(x, t), (xs, ts), (xf, tf)]:
        outs, grads = [], []
        for threads in [1, 2, 1]:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                out = L.cross_entropy(xi, ti, label_smoothing=0.1)
                (g,) = torch.autograd.grad(out, xi)
            finally:
                torch.set_num_threads(prev)
            outs.append(out)
            grads.append(g)
        assert all(torch.equal(outs[0], o) for o in outs)
        assert all(torch.equal(grads[0], g) for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_gradcheck(reduction, smoothing):
    gen = torch.Generator().manual_seed(5)
    for shape in [(4, 7), (3, 5, 4), (6,)]:
        C = shape[_class_dim(shape)]
        x = torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=True)
        t = _target(shape, C, gen, ignore=-100, frac=0.25)
        w = torch.rand(C, dtype=torch.float64, generator=gen)
        for weight in [None, w]:
            assert torch.autograd.gradcheck(
                lambda a: L.cross_entropy(a, t, weight=weight, reduction=reduction,
                                          label_smoothing=smoothing), (x,), fast_mode=True)
            y = torch.rand(shape, dtype=torch.float64, generator=gen)
            assert torch.autograd.gradcheck(
                lambda a: L.cross_entropy(a, y, weight=weight, reduction=reduction,
                                          label_smoothing=smoothing), (x,), fast_mode=True)


def test_cross_entropy_legacy_args():
    x = torch.randn(5, 4)
    t = torch.randint(0, 4, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sa, red in [(False, None), (None, False), (True, True)]:
            torch.testing.assert_close(L.cross_entropy(x, t, size_average=sa, reduce=red),
                                       F.cross_entropy(x, t, size_average=sa, reduce=red))


def test_cross_entropy_none_grad_and_target_not_differentiable():
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    loss, lse, tw = L.CrossEntropyFunction.apply(x, t, None, 1, -100, 0.0)
    assert not lse.requires_grad and not tw.requires_grad
    (g,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g, torch.autograd.grad(F.cross_entropy(x, t), x)[0])
    # None incoming gradients give None gradients
    from types import SimpleNamespace
    ctx = SimpleNamespace(needs_input_grad=(True, True, False, False, False, False))
    for fn in [L.CrossEntropyFunction, L.NLLLossFunction, L.LogSoftmaxFunction,
               L.MSELossFunction, L.L1LossFunction, L.BinaryCrossEntropyWithLogitsFunction]:
        assert all(r is None for r in fn.backward(ctx, None))


# ---- bad inputs ------------------------------------------------------------------------------

def test_cross_entropy_bad_inputs():
    x = torch.randn(4, 5)
    with pytest.raises(IndexError, match=r"target 7 .*\[0, 5\)"):
        L.cross_entropy(x, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(IndexError, match="target -3"):
        L.cross_entropy(x, torch.tensor([0, -3, 1, 2]))
    with pytest.raises(IndexError, match="target 5"):
        L.cross_entropy(torch.randn(2, 5, 3), torch.tensor([[0, 1, 2], [5, 0, 0]]))
    with pytest.raises(TypeError, match="int64"):
        L.cross_entropy(x, torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="weight"):
        L.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=torch.ones(4))
    with pytest.raises(TypeError, match="weight"):
        L.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=torch.ones(5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="target of shape"):
        L.cross_entropy(x, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="shape of self"):
        L.cross_entropy(x, torch.rand(4, 6))
    with pytest.raises(TypeError, match="dtype of self"):
        L.cross_entropy(x, torch.rand(4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        L.cross_entropy(x.long(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="0-d"):
        torch.ops.fastops.cross_entropy(torch.tensor(1.0), torch.tensor(0), None, 1, -100, 0.0)
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.fastops.cross_entropy(x, torch.tensor([0, 1, 2, 3]), None, 5, -100, 0.0)
    with pytest.raises(ValueError):
        L.cross_entropy(x, torch.tensor([0, 1, 2, 3]), reduction="avg")
    # the process is fine afterwards
    assert torch.isfinite(L.cross_entropy(x, torch.tensor([0, 1, 2, 3])))


def test_nll_and_mse_bad_inputs():
    x = torch.randn(4, 5)
    with pytest.raises(IndexError, match="target 9"):
        L.nll_loss(x, torch.tensor([0, 9, 1, 2]))
    with pytest.raises(TypeError, match="int64"):
        L.nll_loss(x, torch.rand(4, 5))
    with pytest.raises(RuntimeError, match="weight"):
        L.nll_loss(x, torch.tensor([0, 1, 1, 2]), weight=torch.ones(3))
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fastops.mse_loss(x, torch.randn(5, 4), 1)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.fastops.mse_loss(x, x.double(), 1)
    with pytest.raises(RuntimeError, match="dim"):
        L.log_softmax(x, dim=2)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.fastops.cross_entropy_backward(torch.ones(3), x, torch.tensor([0, 1, 1, 2]),
                                                 None, 0, -100, 0.0, torch.zeros(4),
                                                 torch.tensor(4.0))


# ---- nll_loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 341), (9, 41, 7), (341,)], ids=["9x341", "9x41x7", "C"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
def test_nll_loss_matches_torch(shape, reduction, weighted, dtype, device):
    C = shape[_class_dim(shape)]
    x, gen = _inputs(shape, dtype)
    t = _target(shape, C, gen, ignore=-100, frac=0.2)
    w = None
    if weighted:
        w = torch.rand(C, generator=gen, dtype=torch.float64)
        w[::4] = 0
        w = w.to(dtype)
    _check_vs_torch(L.nll_loss, F.nll_loss, x, dtype, t, weight=w, reduction=reduction,
                    device=device)



def test_nll_loss_mean_over_weights_that_cancel(device):
    """Class weights of both signs can sum to 0 over the targets while the weighted sum is not
    0: nll_loss's mean is then the plain quotient, +-inf as torch gives (cross entropy's is NaN
    whenever the total weight is 0, as torch's)."""
    x = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.0]], device=device)
    t = torch.tensor([0, 1], device=device)
    w = torch.tensor([1.0, -1.0, 0.0], device=device)
    got = L.nll_loss(x, t, weight=w)
    want = F.nll_loss(x.cpu(), t.cpu(), weight=w.cpu())
    assert got.item() == want.item() == -float("inf")

def test_nll_loss_log_softmax_compose_and_gradcheck():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randint(0, 6, (5, 3), generator=gen)
    t[0, 0] = 2
    w = torch.rand(6, dtype=torch.float64, generator=gen)
    for reduction in REDUCTIONS:
        for weight in [None, w]:
            ours = L.nll_loss(L.log_softmax(x, 1), t, weight=weight, reduction=reduction,
                              ignore_index=2)
            ref = F.nll_loss(F.log_softmax(x, 1), t, weight=weight, reduction=reduction,
                             ignore_index=2)
            torch.testing.assert_close(ours, ref)
            assert torch.autograd.gradcheck(
                lambda a: L.nll_loss(a, t, weight=weight, reduction=reduction, ignore_index=2),
                (x,), fast_mode=True)
    t_all = torch.full((5, 3), -100)
    torch.testing.assert_close(L.nll_loss(x, t_all), F.nll_loss(x, t_all), equal_nan=True)
    torch.testing.assert_close(L.nll_loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
                               F.nll_loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.long)),
                               equal_nan=True)


# ---- log_softmax -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dim", [((9, 341), 1), ((9, 341), 0), ((9, 41, 7), 1),
                                       ((9, 41, 7), -1), ((5000,), 0), ((3, 0, 4), 2),
                                       ((), 0)])
@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_log_softmax_matches_torch(name, shape, dim, dtype, device):
    x, _ = _inputs(shape, dtype)
    _check_vs_torch(getattr(L, name), getattr(F, name), x, dtype, dim, device=device)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_log_softmax_gradcheck_and_options(name):
    ours_fn, torch_fn = getattr(L, name), getattr(F, name)
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    for dim in range(3):
        assert torch.autograd.gradcheck(lambda a: ours_fn(a, dim), (x,), fast_mode=True)
        assert torch.autograd.gradgradcheck(lambda a: ours_fn(a, dim), (x,), fast_mode=True)
    xt = torch.randn(6, 7).t()  # non-contiguous
    torch.testing.assert_close(ours_fn(xt, 1), torch_fn(xt, 1))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        ours = ours_fn(x.detach())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours, torch_fn(x.detach()))
    xh = torch.randn(3, 4).half()
    out = ours_fn(xh, 1, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch_fn(xh, 1, dtype=torch.float32))
    big = torch.tensor([[1e4, -1e4, 0.0], [float("nan"), 0.0, 1.0], [float("inf"), 0.0, 1.0],
                        [-float("inf")] * 3, [-float("inf"), 0.0, -float("inf")]])
    torch.testing.assert_close(ours_fn(big, 1), torch_fn(big, 1), equal_nan=True)
    misaligned = torch.randn(7 * 33 + 1)[1:].view(7, 33)
    torch.testing.assert_close(ours_fn(misaligned, 1), torch_fn(misaligned, 1))


def test_softmax_saves_only_its_output():
    x = torch.randn(8, 100, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = L.softmax(x, 1)
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


# ---- mse_loss --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 341), (9, 41, 7), (100003,), ()], ids=["9x341", "9x41x7",
                                                                            "odd", "0d"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_loss_matches_torch(shape, reduction, dtype, device):
    x, gen = _inputs(shape, dtype, scale=0.3)
    y = (0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    _check_vs_torch(L.mse_loss, F.mse_loss, x, dtype, y, reduction=reduction, device=device)


def test_mse_loss_target_grad_gradcheck_and_options():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda a, b: L.mse_loss(a, b, reduction=reduction),
                                        (x, y), fast_mode=True)
    # broadcasting target: torch's warning and result
    yb = torch.randn(7, dtype=torch.float64)
    with pytest.warns(UserWarning, match="target size"):
        ours = L.mse_loss(x, yb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours, F.mse_loss(x, yb))
    # element weights
    w = torch.rand(5, 7, dtype=torch.float64)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(L.mse_loss(x, y, reduction=reduction, weight=w),
                                   F.mse_loss(x, y, reduction=reduction, weight=w))
    # legacy args, empty, views, nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(L.mse_loss(x, y, size_average=False),
                                   F.mse_loss(x, y, size_average=False))
    e = torch.randn(0, 3)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(L.mse_loss(e, e, reduction=reduction),
                                   F.mse_loss(e, e, reduction=reduction), equal_nan=True)
    a = torch.randn(20, 30)[1:, ::2]
    b = torch.randn(30, 20).t()[1:, ::2]
    torch.testing.assert_close(L.mse_loss(a, b), F.mse_loss(a, b))
    n = torch.tensor([1.0, float("nan"), float("inf")])
    torch.testing.assert_close(L.mse_loss(n, torch.zeros(3), reduction="none"),
                               F.mse_loss(n, torch.zeros(3), reduction="none"), equal_nan=True)


def test_mse_loss_deterministic():
    x = torch.randn(1_000_003)
    y = torch.randn(1_000_003)
    vals = []
    for threads in [1, 2]:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            vals.append(L.mse_loss(x, y))
        finally:
            torch.set_num_threads(prev)
    assert torch.equal(vals[0], vals[1])
    torch.testing.assert_close(vals[0].double(), F.mse_loss(x.double(), y.double()),
                               rtol=1e-6, atol=0)


def test_mse_and_l1_vmap_over_0d_samples():
    """A batch of 0-d inputs (one number per sample) reduces per sample as torch does."""
    from torch.func import vmap
    x, y = torch.randn(5), torch.randn(5)
    for fo, tf in [(L.mse_loss, F.mse_loss), (L.l1_loss, F.l1_loss)]:
        for reduction in REDUCTIONS:
            torch.testing.assert_close(vmap(lambda a, b: fo(a, b, reduction=reduction))(x, y),
                                       vmap(lambda a, b: tf(a, b, reduction=reduction))(x, y))


# ---- l1_loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 341), (9, 41, 7), (100003,), ()], ids=["9x341", "9x41x7",
                                                                            "odd", "0d"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_l1_loss_matches_torch(shape, reduction, dtype, device):
    x, gen = _inputs(shape, dtype, scale=0.3)
    y = (0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if x.dim():
        x[..., ::5] = y[..., ::5]  # equal elements: gradient 0
    check_values_and_grads(L.l1_loss, F.l1_loss, [x.to(device), y.to(device)],
                           dict(reduction=reduction), dtype, diff=(0, 1))


def test_l1_loss_opinfo_samples(dtype, device):
    op, samples = opinfo_samples("l1_loss", device, dtype)
    for x, args, kwargs in samples:
        check_values_and_grads(L.l1_loss, F.l1_loss, [x, *args], kwargs, dtype, diff=(0, 1))
    for e in op.error_inputs(device):
        s = e.sample_input
        with pytest.raises(e.error_type, match=e.error_regex), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the target-size warning before the error
            L.l1_loss(s.input, *s.args, **s.kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_l1_loss_gradcheck_and_gradgradcheck(reduction, device):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 7, dtype=torch.float64, generator=gen).to(device).requires_grad_(True)
    y = torch.randn(5, 7, dtype=torch.float64, generator=gen).to(device).requires_grad_(True)
    w = torch.rand(5, 7, dtype=torch.float64, generator=gen).to(device).requires_grad_(True)
    for fn, inputs in [(lambda a, b: L.l1_loss(a, b, reduction=reduction), (x, y)),
                       (lambda a, b, c: L.l1_loss(a, b, reduction=reduction, weight=c),
                        (x, y, w)),
                       (lambda a, b: L.L1LossFunction.apply(a, b, L._Reduction.get_enum(
                           reduction)), (x, y))]:
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_l1_loss_options_like_torch(device):
    x = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(5, 7, dtype=torch.float64, device=device)
    # a target of another size broadcasts, with torch's warning; gradients sum back
    yb = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    with pytest.warns(UserWarning, match="target size"):
        ours = L.l1_loss(x, yb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.l1_loss(x, yb)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, [x, yb]),
                               torch.autograd.grad(ref, [x, yb]))
    # element weights ('mean' divides by their sum), legacy arguments
    w = torch.rand(5, 7, dtype=torch.float64, device=device)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(L.l1_loss(x, y, reduction=reduction, weight=w),
                                   F.l1_loss(x, y, reduction=reduction, weight=w))
    with pytest.raises(ValueError, match="same size"):
        L.l1_loss(x, y, weight=w[:, :3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sa, red in [(False, None), (None, False), (True, True)]:
            torch.testing.assert_close(L.l1_loss(x, y, size_average=sa, reduce=red),
                                       F.l1_loss(x, y, size_average=sa, reduce=red))


def test_l1_loss_empty_views_and_special_values(dtype, device):
    for reduction in REDUCTIONS:  # empty: 'mean' is NaN as in torch
        e = torch.randn(0, 3, dtype=dtype, device=device, requires_grad=True)
        ours = L.l1_loss(e, e.detach(), reduction=reduction)
        torch.testing.assert_close(ours, F.l1_loss(e, e.detach(), reduction=reduction),
                                   equal_nan=True)
        (g,) = torch.autograd.grad(ours.sum(), e)
        assert g.shape == e.shape
    base = torch.randn(64 * 31 + 1, dtype=torch.float64)
    tbase = torch.randn(64 * 31 + 1, dtype=torch.float64)
    views = [(base[1:].view(64, 31), tbase[:-1].view(64, 31)),  # storage offset by one element
             (base[1:].view(64, 31).t(), tbase[1:].view(31, 64)),  # transposed
             (base[::3][:600].view(20, 30), tbase[1::2][:600].view(30, 20).t())]  # strided
    for x, y in views:
        check_values_and_grads(L.l1_loss, F.l1_loss, [x.to(dtype).to(device),
                                                      y.to(dtype).to(device)],
                               dict(reduction="sum"), dtype, diff=(0, 1))
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([1.0, nan, inf, -inf, inf, 1e4, -1e4, 0.0, -0.0, 3.0], dtype=dtype,
                     device=device)
    y = torch.tensor([1.0, 0.0, inf, inf, 0.0, -1e4, 1e4, -0.0, 0.0, nan], dtype=dtype,
                     device=device)
    check_values_and_grads(L.l1_loss, F.l1_loss, [x, y], dict(reduction="none"), dtype,
                           diff=(0, 1))


def test_l1_loss_deterministic():
    x = torch.randn(1_000_003, requires_grad=True)
    y = torch.randn(1_000_003)
    vals, grads = [], []
    for threads in [1, 2, 1]:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = L.l1_loss(x, y)
            vals.append(out)
            grads.append(torch.autograd.grad(out, x)[0])
        finally:
            torch.set_num_threads(prev)
    assert all(torch.equal(vals[0], v) for v in vals)
    assert all(torch.equal(grads[0], g) for g in grads)
    torch.testing.assert_close(vals[0].double(), F.l1_loss(x.double(), y.double()),
                               rtol=1e-6, atol=0)


def test_l1_loss_bad_inputs():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fastops.l1_loss(x, torch.randn(5, 4), 1)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.fastops.l1_loss(x, x.double(), 1)
    with pytest.raises(TypeError, match="floating-point"):
        torch.ops.fastops.l1_loss(x.long(), x.long(), 1)
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.fastops.l1_loss(x, x, 3)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.fastops.l1_loss_backward(torch.ones(3), x, x, 0, [True, True])
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        L.l1_loss(x, x, reduction="avg")
    assert torch.isfinite(L.l1_loss(x, x * 2))  # the process is fine afterwards


# ---- opcheck and torch.compile ---------------------------------------------------------------

def _opcheck_cases():
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.tensor([0, 5, -100, 2])
    w = torch.rand(6, dtype=torch.float64)
    x3 = torch.randn(2, 5, 3)
    t3 = torch.randint(0, 5, (2, 3))
    lse = torch.logsumexp(x, 1)
    tw = torch.tensor(3.0, dtype=torch.float64)
    ops = torch.ops.fastops
    return [
        (ops.log_softmax, (x, 1)),
        (ops.log_softmax_backward, (torch.randn(4, 6, dtype=torch.float64),
                                    torch.log_softmax(x, 1), 1)),
        (ops.softmax, (x3, 1)),
        (ops.softmax_backward, (torch.randn(4, 6, dtype=torch.float64), torch.softmax(x, 1), 1)),
        (ops.nll_loss, (x, t, w, 1, -100)),
        (ops.nll_loss, (x3, t3, None, 0, -100)),
        (ops.nll_loss_backward, (torch.tensor(1.0, dtype=torch.float64), x, t, w, 1, -100, tw)),
        (ops.cross_entropy, (x, t, w, 1, -100, 0.1)),
        (ops.cross_entropy, (x3, t3, None, 0, -100, 0.0)),
        (ops.cross_entropy, (x, torch.rand(4, 6, dtype=torch.float64), None, 2, -100, 0.0)),
        (ops.cross_entropy_backward, (torch.tensor(1.0, dtype=torch.float64), x, t, w, 1, -100,
                                      0.1, lse, tw)),
        (ops.mse_loss, (x, x * 2, 1)),
        (ops.mse_loss, (x, x * 2, 0)),
        (ops.mse_loss_backward, (torch.tensor(1.0, dtype=torch.float64), x, x * 2, 1,
                                 [True, True])),
        (ops.mse_loss_backward, (torch.tensor(1.0, dtype=torch.float64), x, x * 2, 1,
                                 [True, False])),
        (ops.l1_loss, (x, x * 2, 1)),
        (ops.l1_loss, (x, x * 2, 0)),
        (ops.l1_loss_backward, (torch.tensor(1.0, dtype=torch.float64), x, x * 2, 1,
                                [True, True])),
        (ops.l1_loss_backward, (torch.randn(4, 6, dtype=torch.float64), x, x * 2, 0,
                                [False, True])),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    if not op._qualified_op_name.endswith("_backward"):  # the backward ops have no autograd
        args = tuple(a.clone().requires_grad_(True)
                     if isinstance(a, torch.Tensor) and a.is_floating_point() and i == 0 else a
                     for i, a in enumerate(args))
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    x = torch.randn(8, 10, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    y = torch.randn(8, 10)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a):
        return (L.cross_entropy(a, t, label_smoothing=0.1) + L.mse_loss(a, y)
                + L.nll_loss(L.log_softmax(a, 1), t) + L.softmax(a, 1)[:, 0].sum())

    ref = (F.cross_entropy(x, t, label_smoothing=0.1) + F.mse_loss(x, y)
           + F.nll_loss(F.log_softmax(x, 1), t) + F.softmax(x, 1)[:, 0].sum())
    out = f(x)
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(g, torch.autograd.grad(ref, x)[0])


def test_signatures_match_torch():
    import inspect
    for name in ["log_softmax", "softmax", "nll_loss", "cross_entropy", "mse_loss", "l1_loss",
                 "binary_cross_entropy", "binary_cross_entropy_with_logits"]:
        ours = inspect.signature(getattr(L, name))
        theirs = inspect.signature(getattr(F, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        for p in theirs.parameters.values():
            assert ours.parameters[p.name].default == p.default, (name, p.name)

