"""Every activation held against its torch.nn.functional twin: values and gradients in four
dtypes, gradcheck in float64, awkward shapes and layouts, NaN/inf, determinism, bad inputs."""

from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as TF
from conftest import DEVICES, tol

import fastops
import fastops.functional as F


def torch_maxout(x, pool_size):
    n, c = x.shape[:2]
    return x.reshape(n, c // pool_size, pool_size, *x.shape[2:]).max(dim=2).values


class Row(NamedTuple):
    fastops_fn: Callable
    torch_fn: Callable
    kwargs: dict
    op: str  # the op in torch.ops.fastops
    op_params: tuple  # its parameters after the tensors


# One row per activation and option.
ACTIVATIONS = {
    "relu": Row(F.relu, TF.relu, {}, "relu", ()),
    "elu": Row(F.elu, TF.elu, {}, "elu", (1.0,)),
    "elu_alpha": Row(F.elu, TF.elu, {"alpha": 0.3}, "elu", (0.3,)),
    "gelu": Row(F.gelu, TF.gelu, {}, "gelu", ()),
    "gelu_tanh": Row(F.gelu, TF.gelu, {"approximate": "tanh"}, "gelu_tanh", ()),
    "hardtanh": Row(F.hardtanh, TF.hardtanh, {}, "hardtanh", (-1.0, 1.0)),
    "hardtanh_range": Row(F.hardtanh, TF.hardtanh, {"min_val": -0.5, "max_val": 2.0},
                          "hardtanh", (-0.5, 2.0)),
    "leaky_relu": Row(F.leaky_relu, TF.leaky_relu, {}, "leaky_relu", (0.01,)),
    "leaky_relu_slope": Row(F.leaky_relu, TF.leaky_relu, {"negative_slope": 0.2},
                            "leaky_relu", (0.2,)),
    "sigmoid": Row(F.sigmoid, torch.sigmoid, {}, "sigmoid", ()),
    "tanh": Row(F.tanh, torch.tanh, {}, "tanh", ()),
    "hardshrink": Row(F.hardshrink, TF.hardshrink, {}, "hardshrink", (0.5,)),
    "hardshrink_lambd": Row(F.hardshrink, TF.hardshrink, {"lambd": 1.5}, "hardshrink", (1.5,)),
    "prelu_shared": Row(F.prelu, TF.prelu, {"weight": "shared"}, "prelu", ()),
    "prelu_channels": Row(F.prelu, TF.prelu, {"weight": "channels"}, "prelu", ()),
    "maxout": Row(F.maxout, torch_maxout, {"pool_size": 3}, "maxout", (3,)),
}
NAMES = list(ACTIVATIONS)


def make_args(name, shape, dtype, device, requires_grad=False, gen=None):
    """(fastops args, torch args): input first, then the weight or the options."""
    kwargs = ACTIVATIONS[name].kwargs
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    x = x.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    kwargs = dict(kwargs)
    if "weight" in kwargs:
        n = 1 if kwargs.pop("weight") == "shared" or len(shape) < 2 else shape[1]
        w = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 + 0.1)
        w = w.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        return (x, w), {}
    return (x,), kwargs


def shape_for(name, shape):
    """Maxout needs dim 1 divisible by its pool size."""
    if name == "maxout":
        return (shape[0], 3 * shape[1], *shape[2:]) if len(shape) >= 2 else (2, 6)
    return shape


def run_both(name, args, kwargs):
    row = ACTIVATIONS[name]
    return row.fastops_fn(*args, **kwargs), row.torch_fn(*args, **kwargs)


def check_values_and_grads(name, shape, dtype, device):
    """Against torch run in float64 on the same (rounded) inputs: fastops computes 16-bit types
    in float32 and rounds once, so it must sit within the dtype's tolerance of the exact value
    (torch itself is compared in test_bf16_error_close_to_torch)."""
    gen = torch.Generator().manual_seed(0)
    args, kwargs = make_args(name, shape_for(name, shape), dtype, device, True, gen)
    exact_args = tuple(a.detach().double().requires_grad_(True) for a in args)
    out, _ = run_both(name, args, kwargs)
    exact = ACTIVATIONS[name].torch_fn(*exact_args, **kwargs)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), exact, **tol(dtype))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    got = torch.autograd.grad(out, args, grad)
    want = torch.autograd.grad(exact, exact_args, grad.double())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        t = tol(dtype)
        if g.shape != args[0].shape:  # a weight gradient summed over many elements
            t = dict(atol=t["atol"] * 10, rtol=t["rtol"] * 10)
        torch.testing.assert_close(g.double(), w, **t)


@pytest.mark.parametrize("name", NAMES)
def test_values_and_grads(name, device, dtype):
    check_values_and_grads(name, (9, 41, 34), dtype, device)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 2, 3), (1, 1), (4, 1000)], ids=str)
def test_odd_shapes(name, shape, device):
    check_values_and_grads(name, shape, torch.float32, device)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name, device):
    gen = torch.Generator().manual_seed(1)
    args, kwargs = make_args(name, shape_for(name, (3, 4, 5)), torch.float64, device, True, gen)
    fo = ACTIVATIONS[name].fastops_fn
    # keep inputs away from the kinks, where finite differences are meaningless
    with torch.no_grad():
        x = args[0]
        x.add_(torch.where(x.abs() < 0.05, 0.1, 0.0))
        for k in (-1.0, 1.0, -0.5, 2.0, -1.5, 1.5):
            x.add_(torch.where((x - k).abs() < 0.05, 0.1, 0.0))
    assert torch.autograd.gradcheck(lambda *a: fo(*a, **kwargs), args, fast_mode=True)


@pytest.mark.parametrize("name", NAMES)
def test_empty(name, device):
    args, kwargs = make_args(name, shape_for(name, (0, 4)), torch.float32, device, True)
    out, ref = run_both(name, args, kwargs)
    assert out.shape == ref.shape
    out.sum().backward()
    assert args[0].grad.shape == args[0].shape


@pytest.mark.parametrize("name", [n for n in NAMES if n != "maxout" and "channels" not in n])
def test_zero_dim(name, device):
    args, kwargs = make_args(name, (), torch.float32, device, True)
    out, ref = run_both(name, args, kwargs)
    torch.testing.assert_close(out, ref)
    assert out.shape == ()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_non_contiguous(name, layout, device):
    gen = torch.Generator().manual_seed(2)
    (x, *rest), kwargs = make_args(name, shape_for(name, (6, 40)), torch.float32, device,
                                   False, gen)
    if layout == "transposed":
        base = torch.randn(x.shape[1], x.shape[0], generator=gen).to(device)
        x = base.t()
    elif layout == "strided":
        base = torch.randn(x.shape[0], x.shape[1] * 2, generator=gen).to(device)
        x = base[:, ::2]
    else:  # a view whose storage starts at an odd offset (misaligned for vector loads)
        base = torch.randn(x.numel() + 1, generator=gen).to(device)
        x = base[1:].view(x.shape)
    x.requires_grad_(True)
    args = (x, *rest)
    check = [a.detach().clone().requires_grad_(True) for a in args]
    out, _ = run_both(name, args, kwargs)
    ref = ACTIVATIONS[name].torch_fn(*check, **kwargs)
    torch.testing.assert_close(out, ref)
    g = torch.randn(out.shape, generator=gen).to(device).t().contiguous().t()  # strided grad
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(ref, check[0], g)[0])


@pytest.mark.parametrize("name", NAMES)
def test_nan_inf(name, device):
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e4, -1e4],
                           device=device)
    x = special.repeat(3, 3).reshape(3, 18)
    args, kwargs = make_args(name, x.shape, torch.float32, device)
    args = (x, *args[1:])
    out, _ = run_both(name, args, kwargs)
    # float64 torch as the reference: float32 torch gives NaN for gelu(+inf), float64 gives inf
    ref = ACTIVATIONS[name].torch_fn(*(a.double() for a in args), **kwargs)
    torch.testing.assert_close(out.double(), ref, equal_nan=True)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_error_close_to_torch(name, device):
    """bf16 error against a float32 reference no worse than about twice torch's own."""
    gen = torch.Generator().manual_seed(3)
    args, kwargs = make_args(name, shape_for(name, (64, 96)), torch.bfloat16, device, False, gen)
    out, ref = run_both(name, args, kwargs)
    exact = ACTIVATIONS[name].torch_fn(*(a.float() for a in args), **kwargs)
    ours = (out.float() - exact).abs().max().item()
    theirs = (ref.float() - exact).abs().max().item()
    assert ours <= 2 * theirs + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_backward(name, device):
    gen = torch.Generator().manual_seed(4)
    args, kwargs = make_args(name, shape_for(name, (300, 257)), torch.float32, device, True, gen)
    fo = ACTIVATIONS[name].fastops_fn
    grads = [torch.autograd.grad(fo(*args, **kwargs).sum(), args) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name, device):
    gen = torch.Generator().manual_seed(5)
    args, kwargs = make_args(name, shape_for(name, (5, 6)), torch.float32, device, True, gen)
    row = ACTIVATIONS[name]
    op = getattr(torch.ops.fastops, row.op)
    torch.library.opcheck(op, (*args, *row.op_params))


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        F.relu(torch.arange(4))
    with pytest.raises(RuntimeError, match="num_parameters must be 1 or the number of channels"):
        F.prelu(torch.randn(2, 3, 4), torch.ones(4))
    with pytest.raises(TypeError, match="dtype"):
        F.prelu(torch.randn(2, 3), torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="divisible by pool_size"):
        F.maxout(torch.randn(2, 5), 2)
    with pytest.raises(RuntimeError, match="pool_size must be positive"):
        F.maxout(torch.randn(2, 4), 0)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        F.maxout(torch.randn(4), 2)
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(torch.randn(3), approximate="fast")
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fastops.relu_backward(torch.randn(3), torch.randn(4))
    # the process survives and keeps working
    torch.testing.assert_close(F.relu(torch.tensor([-1.0, 2.0])), torch.tensor([0.0, 2.0]))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_wrong_device():
    with pytest.raises(RuntimeError, match="device"):
        F.prelu(torch.randn(2, 3, device="cuda"), torch.ones(3))


@pytest.mark.parametrize("name", ["relu", "gelu", "sigmoid", "maxout", "prelu_channels"])
def test_outputs_past_the_mmap_threshold(name, device):
    """Outputs of 32 MB and more are allocated differently (advised for huge pages on Linux):
    values and gradients are still torch's."""
    gen = torch.Generator().manual_seed(1)
    args, kwargs = make_args(name, shape_for(name, (1024, 3000)), torch.float32, device, True,
                             gen)
    out, want = run_both(name, args, kwargs)
    torch.testing.assert_close(out, want)
    g = torch.randn(out.shape, generator=gen).to(device)
    for a, b in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(want, args, g)):
        # PReLU's weight gradient sums 1024 rows per channel, in another order than torch's
        torch.testing.assert_close(a, b, **(dict(atol=1e-4, rtol=1e-3) if a.dim() == 1 else {}))


def test_isa_reported():
    assert fastops.cpu_isa() in ("avx512", "avx2", "baseline")


@pytest.mark.slow
def test_beyond_int32_elements():
    """64-bit indexing: a tensor of more than 2^31 elements, checked at its far end."""
    n = 2**31 + 37
    x = torch.full((n,), -0.5, dtype=torch.bfloat16)
    tail = torch.tensor([1.5, -2.0, 0.25, -0.75, 3.0], dtype=torch.bfloat16)
    x[-5:] = tail
    y = F.elu(x)
    torch.testing.assert_close(y[-5:], TF.elu(tail))
    torch.testing.assert_close(y[:3], TF.elu(x[:3]))
    del y
    g = torch.ops.fastops.elu_backward(x, x, 1.0)  # grad_output = x
    torch.testing.assert_close(g[-5:], torch.ops.fastops.elu_backward(tail, tail, 1.0))


@pytest.mark.parametrize("name", NAMES)
def test_autograd_function_classes(name):
    """The public autograd.Function classes give what the functional forms give."""
    from fastops import ops
    gen = torch.Generator().manual_seed(6)
    args, kwargs = make_args(name, shape_for(name, (4, 6)), torch.float64, "cpu", True, gen)
    row = ACTIVATIONS[name]
    cls = {"relu": ops.ReLUFunction, "elu": ops.ELUFunction, "gelu": ops.GELUFunction,
           "gelu_tanh": ops.GELUTanhFunction, "hardtanh": ops.HardtanhFunction,
           "leaky_relu": ops.LeakyReLUFunction, "sigmoid": ops.SigmoidFunction,
           "tanh": ops.TanhFunction, "hardshrink": ops.HardshrinkFunction,
           "prelu": ops.PReLUFunction, "maxout": ops.MaxoutFunction}[row.op]
    out = cls.apply(*args, *row.op_params)
    torch.testing.assert_close(out, row.fastops_fn(*args, **kwargs))
    assert torch.autograd.gradcheck(lambda *a: cls.apply(*a, *row.op_params), args,
                                    fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_hardshrink_threshold_in_input_dtype(dtype, device):
    """Like torch, lambd is rounded to the input's dtype before the comparison."""
    x = torch.tensor([0.30078, -0.30078, 0.29, 0.31, 0.3], dtype=dtype, device=device)
    torch.testing.assert_close(F.hardshrink(x, 0.3), TF.hardshrink(x, 0.3), atol=0, rtol=0)


# ---- the masked forms of the piecewise-linear activations ------------------------------------
# (op, params, the predicate their bit mask holds, from torch)
MASKED = {
    "relu": ((), lambda x: ~(x <= 0)),
    "leaky_relu": ((0.2,), lambda x: x > 0),
    "hardtanh": ((-0.5, 2.0), lambda x: ~((x <= -0.5) | (x >= 2.0))),
    "hardshrink": ((0.5,), lambda x: ~((x >= -0.5) & (x <= 0.5))),
}


def pack_bits(pred):
    """Element i at bit i % 8 of byte i // 8."""
    flat = pred.flatten()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8).to(torch.int32)
    return (flat << torch.arange(8, device=flat.device)).sum(1).to(torch.uint8)


def masked_input(n, dtype, device, gen):
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.5, 0.5, 2.0])
    x[: min(n, 7)] = special[: min(n, 7)].double()
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 100_003])  # partial bytes; several threads' blocks
@pytest.mark.parametrize("op", list(MASKED))
def test_masked_ops_match_the_input_forms(op, n, dtype, device):
    """NAME_with_mask gives NAME's output and the bits of its predicate; NAME_mask_backward
    gives, from those bits alone, exactly what NAME_backward gives from the input."""
    params, predicate = MASKED[op]
    gen = torch.Generator().manual_seed(7)
    x = masked_input(n, dtype, device, gen)
    g = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    ops = torch.ops.fastops
    out, mask = getattr(ops, op + "_with_mask")(x, *params)
    torch.testing.assert_close(out, getattr(ops, op)(x, *params), atol=0, rtol=0, equal_nan=True)
    assert mask.dtype == torch.uint8 and mask.shape == ((n + 7) // 8,)
    assert torch.equal(mask, pack_bits(predicate(x)))
    grad = getattr(ops, op + "_mask_backward")(g, mask, *params)
    torch.testing.assert_close(grad, getattr(ops, op + "_backward")(g, x, *params),
                               atol=0, rtol=0, equal_nan=True)


def without_tie(saved):
    """The saved tensors but the tie of the masked and indexed nodes (csrc/autograd.cpp): a zero
    broadcast to the input's shape, one element of memory, which second order needs."""
    ties = [t for t in saved if t.untyped_storage().nbytes() == t.element_size() and t.numel() > 1]
    assert len(ties) <= 1 and all(t.stride() == (0,) * t.dim() for t in ties)
    return [t for t in saved if not any(t is u for u in ties)]


@pytest.mark.parametrize("op", list(MASKED))
def test_masked_autograd_saves_only_the_bits(op, device):
    """Under autograd the masked activations keep one bit per element for backward, not the
    input, and their gradient is still torch's."""
    params, _ = MASKED[op]
    x = torch.randn(3, 1001, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = getattr(torch.ops.fastops, op)(x, *params)
    assert [(t.dtype, t.numel()) for t in without_tie(saved)] == [(torch.uint8, (3 * 1001 + 7) // 8)]
    torch_fn = {"relu": lambda t: TF.relu(t), "leaky_relu": lambda t: TF.leaky_relu(t, *params),
                "hardtanh": lambda t: TF.hardtanh(t, *params),
                "hardshrink": lambda t: TF.hardshrink(t, *params)}[op]
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(torch_fn(x), x, g)[0])


@pytest.mark.parametrize("op", list(MASKED))
def test_masked_opcheck(op, device):
    params, _ = MASKED[op]
    x = torch.randn(5, 7, device=device)
    out, mask = getattr(torch.ops.fastops, op + "_with_mask")(x, *params)
    torch.library.opcheck(getattr(torch.ops.fastops, op + "_with_mask"), (x, *params))
    torch.library.opcheck(getattr(torch.ops.fastops, op + "_mask_backward"),
                          (torch.randn_like(out), mask, *params))


def test_masked_backward_bad_inputs():
    g = torch.randn(10)
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.fastops.relu_mask_backward(g, torch.ones(10, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="1-D mask of 2 bytes"):
        torch.ops.fastops.relu_mask_backward(g, torch.zeros(3, dtype=torch.uint8))


def test_relu_gradient_passes_nan_like_torch():
    x = torch.tensor([float("nan"), -1.0, 2.0], requires_grad=True)
    got = torch.autograd.grad(F.relu(x), x, torch.ones(3))[0]
    want = torch.autograd.grad(TF.relu(x), x, torch.ones(3))[0]
    torch.testing.assert_close(got, want)


def test_masked_ops_compile_fullgraph():
    """The masked forms (and their fake kernels) trace under torch.compile without graph breaks,
    and the compiled gradient is torch's."""
    def fo(x):
        return (F.hardtanh(F.relu(x) * 2 - 1, -0.5, 0.5).sum() + F.leaky_relu(x, 0.1).sum()
                + F.hardshrink(x).sum())

    def ref(x):
        return (TF.hardtanh(TF.relu(x) * 2 - 1, -0.5, 0.5).sum() + TF.leaky_relu(x, 0.1).sum()
                + TF.hardshrink(x).sum())

    x = torch.randn(37, 53, requires_grad=True)
    compiled = torch.compile(fo, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0],
                               torch.autograd.grad(ref(x), x)[0])


# ---- the output forms of Sigmoid and Tanh -----------------------------------------------------
OUTPUT = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", list(OUTPUT))
def test_output_backward_matches_torch(op, dtype, device):
    """NAME_output_backward(grad, output) is torch's backward from the output: in float32 and
    float64 bit for bit NAME_backward(grad, input) (which recomputes that output); in 16-bit
    types within the rounding of the saved output, as torch's own."""
    gen = torch.Generator().manual_seed(5)
    x = masked_input(100_003, dtype, device, gen)
    g = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    ops = torch.ops.fastops
    y = getattr(ops, op)(x)
    got = getattr(ops, op + "_output_backward")(g, y)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got, getattr(ops, op + "_backward")(g, x), atol=0, rtol=0,
                                   equal_nan=True)
    xt = x.detach().requires_grad_(True)
    want = torch.autograd.grad(OUTPUT[op](xt), xt, g)[0]
    torch.testing.assert_close(got, want, equal_nan=True, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", list(OUTPUT))
def test_output_autograd_saves_the_output(op, dtype, device):
    """Under autograd Sigmoid and Tanh keep their output for backward (as torch does) in float32
    and float64, their input in 16-bit types (whose rounded output would lose the derivative
    near saturation), and their gradient is torch's."""
    x = torch.randn(3, 1001, device=device, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = getattr(torch.ops.fastops, op)(x)
    keeps = out if dtype in (torch.float32, torch.float64) else x
    assert len(saved) == 1 and saved[0].data_ptr() == keeps.data_ptr()
    if dtype not in (torch.float32, torch.float64):
        return
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(OUTPUT[op](x), x, g)[0])
    # like torch's: changing the saved output in place is caught, not silently differentiated
    out = getattr(torch.ops.fastops, op)(x)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("op", list(OUTPUT))
def test_output_backward_opcheck(op, device):
    y = getattr(torch.ops.fastops, op)(torch.randn(5, 7, device=device))
    torch.library.opcheck(getattr(torch.ops.fastops, op + "_output_backward"),
                          (torch.randn_like(y), y))


def test_output_forms_compile_fullgraph():
    x = torch.randn(37, 53, requires_grad=True)
    compiled = torch.compile(lambda t: (F.sigmoid(t) * F.tanh(t)).sum(), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0],
                               torch.autograd.grad((torch.sigmoid(x) * torch.tanh(x)).sum(), x)[0])


# ---- Maxout with saved indices ----------------------------------------------------------------
# (shape, pool size): members side by side (2-D) and along inner positions (N, C, ...), pool
# sizes 1 to 256, runs longer than one block of the CPU kernels.
MAXOUT_INDEXED = [((7, 12), 2), ((5, 12), 3), ((2049, 20), 4), ((5, 12), 6), ((3, 8, 5), 4),
                  ((3, 6, 1, 7), 3), ((2, 1000, 1100), 5), ((4, 4), 1), ((3, 512), 256),
                  ((0, 4), 2), ((2, 4, 0), 2)]


def tied_input(shape, dtype, device, gen):
    """Half-integers (many exact ties inside a group) with NaN and infinities sprinkled in."""
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).round() / 2
    flat = x.view(-1)
    for i, v in zip(range(0, flat.numel(), 7), [float("nan"), float("inf"), -float("inf")] * 9):
        flat[i] = v
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,k", MAXOUT_INDEXED, ids=str)
def test_maxout_indices_match_the_input_forms(shape, k, dtype, device):
    """maxout_with_indices gives maxout's output and torch.max's indices (the first maximum, NaN
    winning); maxout_indices_backward gives, from those bytes alone, exactly what
    maxout_backward gives from the input."""
    gen = torch.Generator().manual_seed(3)
    x = tied_input(shape, dtype, device, gen)
    ops = torch.ops.fastops
    out, idx = ops.maxout_with_indices(x, k)
    torch.testing.assert_close(out, ops.maxout(x, k), atol=0, rtol=0, equal_nan=True)
    assert idx.dtype == torch.uint8 and idx.shape == out.shape
    if x.numel() and dtype != torch.float16:  # torch.max has no Half kernel on every device
        groups = x.reshape(shape[0], shape[1] // k, k, *shape[2:])
        assert torch.equal(idx.long(), groups.max(dim=2).indices)
    g = torch.randn(out.shape, generator=gen).to(device=device, dtype=dtype)
    grad = ops.maxout_indices_backward(g, idx, k)
    torch.testing.assert_close(grad, ops.maxout_backward(g, x, k), atol=0, rtol=0)


@pytest.mark.parametrize("k,saved", [(4, [(torch.uint8, 3 * 25 * 5)]),
                                     (300, [(torch.float32, 3 * 300 * 5)])])
def test_maxout_autograd_saves_indices(k, saved, device):
    """Under autograd maxout keeps one byte per output for backward (the input only for pool
    sizes past 256), and its gradient is torch's."""
    x = torch.randn(3, 100 if k == 4 else 300, 5, device=device, requires_grad=True)
    got = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: got.append(t) or t, lambda t: t):
        out = F.maxout(x, k)
    assert [(t.dtype, t.numel()) for t in without_tie(got)] == saved
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(torch_maxout(x, k), x, g)[0])


def test_maxout_indices_opcheck(device):
    x = torch.randn(5, 12, 3, device=device)
    out, idx = torch.ops.fastops.maxout_with_indices(x, 4)
    torch.library.opcheck(torch.ops.fastops.maxout_with_indices, (x, 4))
    torch.library.opcheck(torch.ops.fastops.maxout_indices_backward,
                          (torch.randn_like(out), idx, 4))


def test_maxout_indices_bad_inputs():
    ops = torch.ops.fastops
    with pytest.raises(RuntimeError, match=r"pool_size must be in \[1, 256\]"):
        ops.maxout_with_indices(torch.randn(2, 514), 257)
    g = torch.randn(2, 3)
    with pytest.raises(TypeError, match="uint8"):
        ops.maxout_indices_backward(g, torch.zeros(2, 3, dtype=torch.int64), 2)
    with pytest.raises(RuntimeError, match="shape"):
        ops.maxout_indices_backward(g, torch.zeros(2, 4, dtype=torch.uint8), 2)
    with pytest.raises(RuntimeError, match=r"pool_size must be in \[1, 256\]"):
        ops.maxout_indices_backward(g, torch.zeros(2, 3, dtype=torch.uint8), 0)
    with pytest.raises(RuntimeError, match="at least 2 dims"):
        ops.maxout_indices_backward(torch.randn(3), torch.zeros(3, dtype=torch.uint8), 2)
    bad = torch.zeros(2, 3, dtype=torch.uint8)
    bad[1, 2] = 2  # pool size 2: members 0 and 1 only
    with pytest.raises(IndexError, match="below pool_size"):
        ops.maxout_indices_backward(g, bad, 2)
    with pytest.raises(IndexError, match="below pool_size"):
        ops.maxout_indices_backward(torch.randn(2, 3, 4),
                                    torch.full((2, 3, 4), 255, dtype=torch.uint8), 3)


def test_maxout_compile_fullgraph():
    """maxout_with_indices and its backward (and their fake kernels) trace under torch.compile
    without graph breaks, and the compiled gradient is torch's."""
    x = torch.randn(6, 12, 5, requires_grad=True)
    compiled = torch.compile(lambda t: (F.maxout(t, 3) ** 2).sum(), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0],
                               torch.autograd.grad((torch_maxout(x, 3) ** 2).sum(), x)[0])
