"""The margin losses (hinge_embedding_loss, multi_margin_loss) held against torch: torch's OpInfo
samples and error inputs in every dtype, gradcheck and gradgradcheck in float64 for every
option, extreme values and ties at the hinge, empty tensors, views, bad inputs, determinism,
the modules, torch.library.opcheck and torch.compile."""

import inspect
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db

import fastops.functional as FF
from fastops import nn as fnn
from fastops.ops import HingeEmbeddingLossFunction, MultiMarginLossFunction
from conftest import DTYPES, SUBPROCESS_CWD, tol

REDUCTIONS = ["none", "mean", "sum"]
HALF = (torch.float16, torch.bfloat16)
OPINFO = {o.name: o for o in op_db if o.name in ("nn.functional.hinge_embedding_loss",
                                                  "nn.functional.multi_margin_loss")}
OURS = {"nn.functional.hinge_embedding_loss": FF.hinge_embedding_loss,
        "nn.functional.multi_margin_loss": FF.multi_margin_loss}
THEIRS = {"nn.functional.hinge_embedding_loss": F.hinge_embedding_loss,
          "nn.functional.multi_margin_loss": F.multi_margin_loss}


def _f64(v):
    return v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _torch_error(torch_fn, x, args, kwargs, g, ref, ref_grad):
    """Torch's own error in x's dtype against the float64 reference (values, gradients), or
    None where torch has no kernel for the dtype (multi_margin_loss in 16 bits on the CPU)."""
    xt = x.detach().clone().requires_grad_(True)
    try:
        out = torch_fn(xt, *args, **kwargs)
    except (NotImplementedError, RuntimeError):
        return None
    (grad,) = torch.autograd.grad(out, xt, g.to(out.dtype))
    errs = []
    for a, b in ((out, ref), (grad, ref_grad)):
        a = a.detach().double()
        fin = torch.isfinite(a) & torch.isfinite(b)
        errs.append((a - b)[fin].abs().max().item() if fin.any() else 0.0)
    return errs


def check_vs_torch(fo_fn, torch_fn, x, *args, **kwargs):
    """Values and input gradients against torch in float64 from the same (rounded) inputs.
    16-bit results pass within tol(dtype), or within twice torch's own error in that dtype."""
    dtype = x.dtype
    xf = x.detach().clone().requires_grad_(True)
    out = fo_fn(xf, *args, **kwargs)
    xr = x.detach().double().requires_grad_(True)
    ref = torch_fn(xr, *[_f64(a) for a in args], **{k: _f64(v) for k, v in kwargs.items()})
    assert out.dtype == dtype and out.shape == ref.shape
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.device)
    (grad,) = torch.autograd.grad(out, xf, g.to(dtype))
    (ref_grad,) = torch.autograd.grad(ref, xr, g)
    assert grad.dtype == dtype and grad.shape == x.shape
    atol, rtol = tol(dtype)["atol"], tol(dtype)["rtol"]
    out_atol = grad_atol = atol
    if dtype in HALF:
        theirs = _torch_error(torch_fn, x, args, kwargs, g, ref.detach(), ref_grad)
        if theirs is not None:
            out_atol, grad_atol = max(atol, 2 * theirs[0]), max(atol, 2 * theirs[1])
    torch.testing.assert_close(out.double(), ref.detach(), equal_nan=True, atol=out_atol,
                               rtol=rtol)
    torch.testing.assert_close(grad.double(), ref_grad, equal_nan=True, atol=grad_atol,
                               rtol=rtol)


def signs(*shape, gen=None, device="cpu", dtype=torch.float64):
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(device=device, dtype=dtype)


def off_the_kinks(x, t, margin):
    """x with every z = margin - x[y] + x[i] at least 0.02 from the hinge (finite differences
    straddle a kink otherwise)."""
    rows = x.reshape(-1, x.shape[-1] if x.dim() else 1)
    z = margin - rows.gather(1, t.reshape(-1, 1)) + rows
    near = z.abs() < 0.02
    return (rows + 0.05 * near).reshape(x.shape)


def torch_multi_margin(x, t, p=1, margin=1.0, weight=None, reduction="mean"):
    """multi_margin_loss composed of differentiable torch ops: the reference where torch's own
    has no formula (double backward, forward mode)."""
    classes = x.shape[-1] if x.dim() else 1
    rows = x.reshape(-1, classes)
    tt = t.reshape(-1, 1)
    z = margin - rows.gather(1, tt) + rows
    active = (z > 0) & (torch.arange(classes, device=x.device) != tt)
    loss = torch.where(active, z if p == 1 else z * z, torch.zeros_like(z)).sum(1) / classes
    if weight is not None:
        loss = loss * weight[tt.squeeze(1)]
    if reduction == "none":
        return loss.reshape(t.shape if t.dim() else ())
    return loss.sum() if reduction == "sum" else loss.mean()


# ---- torch's OpInfo samples and error inputs ---------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPINFO))
def test_opinfo_samples_match_torch(name, dtype, device):
    """Every reference input of torch's OpInfo (its samples, NaN, inf, broadcasting, every p,
    margin, weight and reduction), values and input gradients."""
    count = 0
    for sample in OPINFO[name].reference_inputs(device, dtype, requires_grad=True):
        check_vs_torch(OURS[name], THEIRS[name], sample.input, *sample.args, **sample.kwargs)
        count += 1
    assert count > 10


@pytest.mark.parametrize("name", sorted(OPINFO))
def test_opinfo_error_inputs_raise(name, device):
    count = 0
    for err in OPINFO[name].error_inputs(device):
        s = err.sample_input
        with pytest.raises(err.error_type, match=err.error_regex):
            OURS[name](s.input, *s.args, **s.kwargs)
        count += 1
    assert count >= 1


# ---- gradcheck and gradgradcheck, every option -------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", [1.0, 0.3, -0.5])
def test_hinge_gradcheck(reduction, margin, device):
    gen = torch.Generator().manual_seed(2)
    for shape in [(4, 7), (3, 2, 5), ()]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        x = torch.where((margin - x).abs() < 0.02, x + 0.05, x).requires_grad_(True)
        t = signs(*shape, gen=gen, device=device)
        t.view(-1)[0] = 0.0  # a target other than +-1 follows the formula too
        for fn in (lambda a: FF.hinge_embedding_loss(a, t, margin, reduction=reduction),
                   lambda a: HingeEmbeddingLossFunction.apply(a, t, margin,
                                                              REDUCTIONS.index(reduction))):
            assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
            assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
@pytest.mark.parametrize("margin", [1.0, -0.4])
def test_multi_margin_gradcheck(reduction, p, weighted, margin, device):
    gen = torch.Generator().manual_seed(3)
    for shape, tshape in [((5, 6), (5,)), ((6,), ()), ((6,), (1,)), ((), ())]:
        classes = shape[-1] if shape else 1
        t = torch.randint(0, classes, tshape, generator=gen).to(device)
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
        x = off_the_kinks(x, t, margin).requires_grad_(True)
        w = torch.rand(classes, generator=gen, dtype=torch.float64).to(device) if weighted else None
        red = REDUCTIONS.index(reduction)
        for fn in (lambda a: FF.multi_margin_loss(a, t, p, margin, w, reduction=reduction),
                   lambda a: MultiMarginLossFunction.apply(a, t, p, margin, w, red)):
            assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
            assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


def test_multi_margin_second_derivative_matches_composite(device):
    """p = 2 has a second derivative (2 w_y / C on the active pairs); torch's own op has none,
    so the reference is the composite of torch ops."""
    gen = torch.Generator().manual_seed(4)
    t = torch.randint(0, 7, (5,), generator=gen).to(device)
    x = off_the_kinks(torch.randn(5, 7, generator=gen, dtype=torch.float64).to(device), t, 0.8)
    w = torch.rand(7, generator=gen, dtype=torch.float64).to(device)
    for p in (1, 2):
        hs = [torch.func.hessian(lambda a: fn(a, t, p=p, margin=0.8, weight=w,
                                              reduction="sum"))(x)
              for fn in (FF.multi_margin_loss, torch_multi_margin)]
        torch.testing.assert_close(hs[0], hs[1])
        assert (hs[0] != 0).any() == (p == 2)


# ---- extremes, ties, other targets ---------------------------------------------------------

def test_hinge_extremes_and_ties(dtype, device):
    x = torch.tensor([1e4, -1e4, float("inf"), -float("inf"), float("nan"), 1.0, 0.5, 1.0, 0.5,
                      0.0, 2.0, -3.0], dtype=dtype, device=device)
    for t_values in ([1, -1, 1, -1, -1, -1, -1, 1, 0, 0, 1, -1],
                     [-1, 1, -1, 1, 1, 0, 1, -1, -1, 1, -1, 1]):
        t = torch.tensor(t_values, dtype=dtype, device=device)
        for reduction in REDUCTIONS:
            # margin 1.0 and 0.5: ties at the hinge (margin - x == 0 is not active, as torch)
            for margin in (1.0, 0.5):
                check_vs_torch(FF.hinge_embedding_loss, F.hinge_embedding_loss, x, t,
                               margin=margin, reduction=reduction)


def test_hinge_targets_of_other_dtypes_and_values(device):
    """torch reads a target only through target != 1 and target != -1: every dtype and value
    does what it does (0, 2, 0.5, NaN among them), and the shapes broadcast."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, generator=gen).to(device)
    t = torch.tensor([1, -1, 0, 2, -1, 1], device=device)
    targets = [t, t.int(), t.to(torch.int8), t.double(), t.half(), t == 1,
               torch.tensor([1.0, -1.0, 0.5, float("nan"), -1.0, 1.0], device=device),
               signs(4, 1, gen=gen, device=device, dtype=torch.float32),
               signs(3, 4, 6, gen=gen, device=device, dtype=torch.float32)]
    for target in targets:
        for reduction in REDUCTIONS:
            check_vs_torch(FF.hinge_embedding_loss, F.hinge_embedding_loss, x, target,
                           margin=0.7, reduction=reduction)
    # the input broadcast against a larger target: its gradient sums over the new dims
    check_vs_torch(FF.hinge_embedding_loss, F.hinge_embedding_loss, x[0], targets[-1],
                   reduction="sum")


def test_multi_margin_extremes_and_ties(dtype, device):
    x = torch.tensor([[1e4, -1e4, 0.0, 1.0],
                      [float("inf"), 0.0, 1.0, 2.0],
                      [0.0, float("inf"), 1.0, 2.0],
                      [-float("inf"), 0.0, 1.0, 2.0],
                      [float("nan"), 0.0, 1.0, 2.0],
                      [0.0, float("nan"), 1.0, 2.0],
                      [2.0, 1.0, 1.0, 3.0],     # ties: z = (1 - 2) + 1 == 0, not active
                      [2.0, 1.5, 2.0, 0.5]], dtype=dtype, device=device)
    t = torch.tensor([0, 0, 0, 0, 0, 0, 0, 2], device=device)
    for p in (1, 2):
        for reduction in REDUCTIONS:
            for weight in (None, torch.tensor([0.5, 2.0, 0.0, 1.0], dtype=dtype, device=device)):
                check_vs_torch(FF.multi_margin_loss, F.multi_margin_loss, x, t, p=p,
                               margin=1.0, weight=weight, reduction=reduction)


@pytest.mark.parametrize("shape", [(9, 341), (5, 7), (5, 100), (33, 200), (3, 1000), (341,),
                                   (1, 2)], ids=str)
def test_multi_margin_shapes_match_torch(shape, dtype, device):
    """Odd class counts (off the SIMD width; on CUDA, thread groups of 1 to 32 lanes of a warp
    and whole blocks) and long rows."""
    gen = torch.Generator().manual_seed(6)
    classes = shape[-1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(device, dtype)
    t = torch.randint(0, classes, shape[:-1], generator=gen).to(device)
    w = torch.rand(classes, generator=gen, dtype=torch.float64).to(device, dtype)
    for p, margin, weight in [(1, 1.0, None), (2, 0.5, w)]:
        for reduction in REDUCTIONS:
            check_vs_torch(FF.multi_margin_loss, F.multi_margin_loss, x, t, p=p, margin=margin,
                           weight=weight, reduction=reduction)


def test_hinge_sizes_match_torch(dtype, device):
    """Sizes off the vector width and past one block of the sum."""
    gen = torch.Generator().manual_seed(7)
    for n in (1, 17, 16385, 40009):  # sums within float16
        x = (torch.randn(n, generator=gen, dtype=torch.float64) * 2).to(device, dtype)
        t = signs(n, gen=gen, device=device, dtype=dtype)
        for reduction in REDUCTIONS:
            check_vs_torch(FF.hinge_embedding_loss, F.hinge_embedding_loss, x, t,
                           reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_past_one_grid_pass(dtype, device):
    """Enough rows and elements for the CUDA grid-stride loops to go round more than once (and
    for many blocks of the ordered sums)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(600_001, 3, generator=gen).to(device, dtype)
    t = torch.randint(0, 3, (600_001,), generator=gen).to(device)
    y = signs(600_001, 3, gen=gen, device=device, dtype=dtype)
    for reduction in ("none", "mean"):
        check_vs_torch(FF.multi_margin_loss, F.multi_margin_loss, x, t, p=2,
                       reduction=reduction)
        check_vs_torch(FF.hinge_embedding_loss, F.hinge_embedding_loss, x, y,
                       reduction=reduction)


# ---- empty, views ----------------------------------------------------------------------------

def test_empty(device):
    for shape in [(0,), (3, 0), (0, 4, 2)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        t = torch.ones(shape, device=device)
        for reduction in REDUCTIONS:
            ours = FF.hinge_embedding_loss(x, t, reduction=reduction)
            torch.testing.assert_close(ours, F.hinge_embedding_loss(x, t, reduction=reduction),
                                       equal_nan=True)
            (g,) = torch.autograd.grad(ours.sum(), x)
            assert g.shape == x.shape
    assert torch.isnan(FF.hinge_embedding_loss(torch.randn(0, device=device),
                                               torch.ones(0, device=device)))
    # multi_margin_loss over no rows: 'mean' is NaN (torch's kernel leaves it unwritten)
    x = torch.randn(0, 5, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    assert FF.multi_margin_loss(x, t, reduction="none").shape == (0,)
    assert FF.multi_margin_loss(x, t, reduction="sum").item() == 0
    loss = FF.multi_margin_loss(x, t)
    assert torch.isnan(loss)
    (g,) = torch.autograd.grad(FF.multi_margin_loss(x, t, reduction="sum"), x)
    assert g.shape == (0, 5)


def test_views_and_misaligned_storage(dtype, device):
    """Transposed, strided and offset (one element off the vector alignment) inputs and
    targets."""
    gen = torch.Generator().manual_seed(8)
    buf = torch.randn(2 * 40 * 30 + 4, generator=gen, dtype=torch.float64).to(device, dtype)
    tbuf = signs(40 * 30 + 1, gen=gen, device=device, dtype=dtype)
    views = [buf[1:1 + 40 * 30].view(40, 30), buf[:1200].view(30, 40).t(),
             buf[3:].view(-1)[:2400].view(40, 60)[:, ::2]]
    tviews = [tbuf[1:].view(40, 30), tbuf[:1200].view(30, 40).t(), tbuf[:1200].view(40, 30)]
    cls = torch.randint(0, 30, (81,), generator=gen).to(device)
    for x in views:
        for t in tviews:
            check_vs_torch(FF.hinge_embedding_loss, F.hinge_embedding_loss, x, t)
        for target in (cls[1:41], cls[::2][:40]):
            check_vs_torch(FF.multi_margin_loss, F.multi_margin_loss, x, target, p=2)


# ---- bad inputs --------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(device):
    x = torch.randn(4, 5, device=device)
    t = torch.tensor([0, 1, 4, 2], device=device)
    with pytest.raises(ValueError, match="only p == 1 and p == 2"):
        FF.multi_margin_loss(x, t, p=3)
    with pytest.raises(RuntimeError, match="only p == 1 and p == 2"):
        torch.ops.fastops.multi_margin_loss(x, t, 0, 1.0, None, 1)
    with pytest.raises(RuntimeError, match=r"Expected target size \[4\]"):
        FF.multi_margin_loss(x, t[:3])
    with pytest.raises(RuntimeError, match="Expected non-empty vector or matrix"):
        FF.multi_margin_loss(torch.randn(2, 3, 4, device=device), t[:2])
    with pytest.raises(RuntimeError, match="expected scalar type Long but found Int"):
        FF.multi_margin_loss(x, t.int())
    with pytest.raises(RuntimeError, match="inconsistent weight size, expected 5"):
        FF.multi_margin_loss(x, t, weight=torch.ones(4, device=device))
    with pytest.raises(TypeError, match="dtype"):
        FF.multi_margin_loss(x, t, weight=torch.ones(5, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        FF.multi_margin_loss(x.long(), t)
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.fastops.multi_margin_loss(x, t, 1, 1.0, None, 3)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.fastops.multi_margin_loss_backward(torch.ones(3, device=device), x, t, 1, 1.0,
                                                     None, 0)
    w = torch.ones(5, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        FF.multi_margin_loss(x, t, weight=w)
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        MultiMarginLossFunction.apply(x.requires_grad_(), t, 1, 1.0, w, 1).backward()
    with torch.no_grad():  # as torch: only a graph needs the weight's gradient
        FF.multi_margin_loss(x, t, weight=w)
    x = x.detach()
    with pytest.raises(RuntimeError, match="must match the size"):  # torch's broadcast error
        FF.hinge_embedding_loss(x, torch.ones(4, 4, device=device))
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fastops.hinge_embedding_loss(x, torch.ones(5, 4, device=device), 1.0, 1)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.fastops.hinge_embedding_loss(x, torch.ones(4, 5, dtype=torch.int32,
                                                             device=device), 1.0, 1)
    with pytest.raises(TypeError, match="floating-point"):
        FF.hinge_embedding_loss(x.long(), torch.ones(4, 5, device=device))
    with pytest.raises(ValueError, match="not a valid value"):
        FF.hinge_embedding_loss(x, torch.ones(4, 5, device=device), reduction="avg")
    # the process is fine afterwards
    torch.testing.assert_close(FF.multi_margin_loss(x, t), F.multi_margin_loss(x, t))


def test_wrong_device(device):
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    other = "cpu" if device == "cuda" else "cuda"
    x = torch.randn(4, 5, device=device)
    with pytest.raises(RuntimeError, match="device"):
        FF.multi_margin_loss(x, torch.tensor([0, 1, 2, 3], device=other))
    with pytest.raises(RuntimeError, match="device"):
        FF.multi_margin_loss(x, torch.tensor([0, 1, 2, 3], device=device),
                             weight=torch.ones(5, device=other))
    with pytest.raises(RuntimeError, match="device"):
        FF.hinge_embedding_loss(x, torch.ones(4, 5, device=other))


def _run_python(code):
    """A fresh interpreter (a device-side assert poisons the CUDA context of its process)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=SUBPROCESS_CWD)


@pytest.mark.parametrize("call", [
    "F.multi_margin_loss(x, torch.tensor([0, 1, 5, 2], device=d))",
    "F.multi_margin_loss(x, torch.tensor([0, -1, 3, 2], device=d), reduction='none')",
    "torch.ops.fastops.multi_margin_loss_backward(torch.tensor(1.0, device=d), x, "
    "torch.tensor([0, 1, 2, 9], device=d), 2, 1.0, None, 1)",
])
def test_target_out_of_range(call, device):
    """A class target outside [0, C): a clear error on the CPU, a device assertion on CUDA
    (never read), reported to Python either way."""
    result = _run_python(f"""
        import torch, fastops
        import fastops.functional as F
        d = {device!r}
        x = torch.randn(4, 5, device=d)
        try:
            out = {call}
            if d == "cuda":
                torch.cuda.synchronize()
        except RuntimeError as e:
            print("raised:", e)
            raise SystemExit(3)
        print("no error, got", out)
        """)
    assert result.returncode == 3, result.stdout + result.stderr
    if device == "cpu":
        assert "target out of range" in result.stdout


# ---- determinism -------------------------------------------------------------------------------

def test_deterministic(device):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(777, 301, generator=gen).to(device).requires_grad_(True)
    t = torch.randint(0, 301, (777,), generator=gen).to(device)
    y = signs(777, 301, gen=gen, device=device, dtype=torch.float32)
    calls = [lambda: FF.multi_margin_loss(x, t, p=2, margin=0.5),
             lambda: FF.multi_margin_loss(x, t, reduction="sum"),
             lambda: FF.hinge_embedding_loss(x, y, margin=0.3)]
    for call in calls:
        results = []
        for threads in [1, 2, 1]:
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                out = call()
                (g,) = torch.autograd.grad(out, x)
            finally:
                torch.set_num_threads(prev)
            results.append((out, g))
        for out, g in results[1:]:
            assert torch.equal(out, results[0][0]) and torch.equal(g, results[0][1])


# ---- modules, signatures -----------------------------------------------------------------------

def test_modules_match_torch(device):
    w = torch.rand(5, device=device)
    pairs = [(torch.nn.HingeEmbeddingLoss(margin=0.5, reduction="sum"),
              fnn.HingeEmbeddingLoss(margin=0.5, reduction="sum")),
             (torch.nn.MultiMarginLoss(p=2, margin=0.7, weight=w),
              fnn.MultiMarginLoss(p=2, margin=0.7, weight=w.clone())),
             (torch.nn.MultiMarginLoss(), fnn.MultiMarginLoss())]
    x = torch.randn(4, 5, device=device)
    targets = [signs(4, 5, device=device, dtype=torch.float32),
               torch.tensor([0, 4, 2, 1], device=device)]
    for ref, ours in pairs:
        assert repr(ours) == repr(ref)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
        ours.load_state_dict(ref.state_dict())
        t = targets[isinstance(ref, torch.nn.MultiMarginLoss)]
        torch.testing.assert_close(ours(x, t), ref(x, t))
    assert list(pairs[1][1].state_dict()) == ["weight"]  # a buffer, as torch's
    with pytest.raises(ValueError):
        fnn.MultiMarginLoss(p=3)


def test_convert_swaps_the_torch_modules(device):
    model = torch.nn.ModuleDict({"hinge": torch.nn.HingeEmbeddingLoss(margin=2.0),
                                 "mm": torch.nn.MultiMarginLoss(weight=torch.rand(3))}).to(device)
    weight = model["mm"].weight
    fnn.convert(model)
    assert type(model["hinge"]) is fnn.HingeEmbeddingLoss and model["hinge"].margin == 2.0
    assert type(model["mm"]) is fnn.MultiMarginLoss and model["mm"].weight is weight


def test_signatures_and_legacy_arguments(device):
    for name in ["hinge_embedding_loss", "multi_margin_loss"]:
        ours, theirs = (inspect.signature(getattr(m, name)) for m in (FF, F))
        assert list(ours.parameters) == list(theirs.parameters), name
        for p in theirs.parameters.values():
            assert ours.parameters[p.name].default == p.default, (name, p.name)
    x = torch.randn(5, 4, device=device)
    t = torch.tensor([0, 1, 2, 3, 0], device=device)
    y = signs(5, 4, device=device, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sa, red in [(False, None), (None, False), (True, True)]:
            torch.testing.assert_close(FF.multi_margin_loss(x, t, size_average=sa, reduce=red),
                                       F.multi_margin_loss(x, t, size_average=sa, reduce=red))
            torch.testing.assert_close(
                FF.hinge_embedding_loss(x, y, size_average=sa, reduce=red),
                F.hinge_embedding_loss(x, y, size_average=sa, reduce=red))


def test_function_twins_none_gradient(device):
    from types import SimpleNamespace
    ctx = SimpleNamespace(needs_input_grad=(True, False, False, False, False, False))
    for fn in (HingeEmbeddingLossFunction, MultiMarginLossFunction):
        assert all(r is None for r in fn.backward(ctx, None))


def test_forward_ad_dual_tensors(device):
    import torch.autograd.forward_ad as fwAD
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64).to(device)
    v = torch.randn(4, 6, generator=gen, dtype=torch.float64).to(device)
    t = torch.randint(0, 6, (4,), generator=gen).to(device)
    y = signs(4, 6, gen=gen, device=device)
    w = torch.rand(6, generator=gen, dtype=torch.float64).to(device)
    cases = [(lambda a: FF.hinge_embedding_loss(a, y, 0.2, reduction="none"),
              lambda a: F.hinge_embedding_loss(a, y, 0.2, reduction="none")),
             (lambda a: FF.multi_margin_loss(a, t, 2, 0.5, w),
              lambda a: torch_multi_margin(a, t, 2, 0.5, w))]
    for ours, ref in cases:
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(ours(fwAD.make_dual(x, v))).tangent
        _, expected = torch.func.jvp(ref, (x,), (v,))
        torch.testing.assert_close(tangent, expected)


# ---- opcheck and torch.compile ---------------------------------------------------------------

def _opcheck_cases(device):
    x = torch.randn(4, 6, dtype=torch.float64, device=device)
    y = signs(4, 6, device=device)
    t = torch.tensor([0, 5, 3, 2], device=device)
    w = torch.rand(6, dtype=torch.float64, device=device)
    one = torch.tensor(1.0, dtype=torch.float64, device=device)
    ops = torch.ops.fastops
    return [
        (ops.hinge_embedding_loss, (x, y, 0.5, 1)),
        (ops.hinge_embedding_loss, (x, y.long(), 1.0, 0)),
        (ops.hinge_embedding_loss_backward, (one, x, y, 0.5, 1)),
        (ops.hinge_embedding_loss_backward, (torch.randn_like(x), x, y, 0.5, 0)),
        (ops.multi_margin_loss, (x, t, 1, 1.0, None, 1)),
        (ops.multi_margin_loss, (x, t, 2, 0.5, w, 0)),
        (ops.multi_margin_loss, (x[0], t[:1], 2, 0.5, w, 0)),
        (ops.multi_margin_loss_backward, (one, x, t, 2, 0.5, w, 2)),
        (ops.multi_margin_loss_backward, (torch.randn(4, dtype=torch.float64, device=device), x,
                                          t, 1, 1.0, None, 0)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(case, device):
    op, args = _opcheck_cases(device)[case]
    if not op._qualified_op_name.endswith("_backward"):
        args = (args[0].clone().requires_grad_(True), *args[1:])
    torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    model = torch.nn.Linear(6, 4).to(device)
    hinge = fnn.HingeEmbeddingLoss(margin=0.5)
    multi = fnn.MultiMarginLoss(p=2, weight=torch.rand(4, device=device))
    x = torch.randn(8, 6, device=device)
    t = torch.randint(0, 4, (8,), device=device)
    y = signs(8, 4, device=device, dtype=torch.float32)

    def step(x):
        out = model(x)
        return hinge(out, y) + multi(out, t)

    eager = step(x)
    (g_eager,) = torch.autograd.grad(eager, model.weight)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (g_got,) = torch.autograd.grad(got, model.weight)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(g_got, g_eager)
    ref = (F.hinge_embedding_loss(model(x), y, margin=0.5)
           + F.multi_margin_loss(model(x), t, p=2, weight=multi.weight))
    torch.testing.assert_close(got, ref)


def test_dtypes_cover_every_dtype():
    assert set(DTYPES) == {torch.float32, torch.float64, torch.float16, torch.bfloat16}
