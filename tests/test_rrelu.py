"""RReLU against torch: evaluation mode value for value; training mode by what it must be (the
output is the input times a slope drawn uniformly from [lower, upper] where input <= 0, the
gradient that slope), how it draws (torch.manual_seed, thread counts, vmap's randomness flag,
the Philox known answers) and what it keeps for backward (less than the input)."""

import functools

import pytest
import torch
import torch.nn.functional as TF
from conftest import DEVICES, SUBPROCESS_CWD, tol
from torch.func import grad, vmap
from torch.testing._internal.common_methods_invocations import op_db

import fastops.functional as F
from fastops import nn as fnn
from fastops.ops import RReLUFunction

ops = torch.ops.fastops
OPINFO = next(o for o in op_db if o.name == "nn.functional.rrelu")
DEFAULTS = {"lower": 1.0 / 8, "upper": 1.0 / 3}


def acc_dtype(dtype):
    """The compute type: fastops draws float slopes for float16/bfloat16 data too."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reseeded(fn, seed=0):
    """fn with the default generators re-seeded on every call (and restored after)."""

    def f(*args, **kwargs):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn(*args, **kwargs)

    return f


def slopes_of(shape, dtype, device, lower, upper, seed=0):
    """The slopes a training call draws after torch.manual_seed(seed), element by element: they
    depend on the seed and the element's index only, so -rrelu(-1) gives them, exact in the
    compute type."""
    ones = torch.ones(shape, dtype=acc_dtype(dtype), device=device)
    return -reseeded(F.rrelu, seed)(-ones, lower, upper, training=True)


def opinfo_samples(device, dtype, training):
    for s in OPINFO.sample_inputs(device, dtype):
        kwargs = {**DEFAULTS, **s.kwargs}
        if kwargs.pop("training", False) == training:
            yield s.input, kwargs


def special_input(n, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1e4, 1e4, -1.0],
                           dtype=torch.float64)
    x[: min(n, 8)] = special[: min(n, 8)]
    return x.to(device=device, dtype=dtype)


# ---- evaluation -------------------------------------------------------------------------------


def test_eval_matches_torch(device, dtype):
    """torch's OpInfo samples and special values, against torch in float64 within the dtype's
    tolerance (16-bit types: within their rounding, as tests/test_activations.py), and in
    float32/float64 bit for bit against torch in the same dtype."""
    samples = list(opinfo_samples(device, dtype, training=False))
    samples.append((special_input(1001, dtype, device), {"lower": 0.05, "upper": 0.4}))
    assert len(samples) >= 3
    for x, kwargs in samples:
        x = x.detach().requires_grad_(True)
        out = F.rrelu(x, **kwargs)
        g = torch.linspace(-2, 2, x.numel(), dtype=torch.float64).view(x.shape).to(device)
        (got_grad,) = torch.autograd.grad(out, x, g.to(dtype))
        assert out.dtype == dtype and got_grad.dtype == dtype
        xd = x.detach().double().requires_grad_(True)
        want = TF.rrelu(xd, **kwargs)
        (want_grad,) = torch.autograd.grad(want, xd, g)
        torch.testing.assert_close(out.double(), want, equal_nan=True, **tol(dtype))
        torch.testing.assert_close(got_grad.double(), want_grad, **tol(dtype))
        if dtype in (torch.float32, torch.float64):
            xs = x.detach().clone().requires_grad_(True)
            same = TF.rrelu(xs, **kwargs)
            torch.testing.assert_close(out, same, atol=0, rtol=0, equal_nan=True)
            torch.testing.assert_close(got_grad, torch.autograd.grad(same, xs, g.to(dtype))[0],
                                       atol=0, rtol=0)


def test_signature_and_defaults_are_torchs():
    import inspect

    ours, theirs = inspect.signature(F.rrelu), inspect.signature(TF.rrelu)
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    ours, theirs = inspect.signature(fnn.RReLU), inspect.signature(torch.nn.RReLU)
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]


def test_eval_is_the_default_and_module_follows_training():
    x = torch.randn(50)
    torch.testing.assert_close(F.rrelu(x), TF.leaky_relu(x, (1 / 8 + 1 / 3) / 2), atol=0, rtol=0)
    m = fnn.RReLU(0.1, 0.3)
    assert m.training
    assert not torch.equal(m(-torch.ones(64)), m(-torch.ones(64)))
    m.eval()
    torch.testing.assert_close(m(x), TF.rrelu(x, 0.1, 0.3), atol=0, rtol=0)


# ---- training ---------------------------------------------------------------------------------


def check_training(x, lower, upper, seed=0):
    """Output and gradient of a training call against the slopes it drew."""
    x = x.detach().requires_grad_(True)
    out = reseeded(F.rrelu, seed)(x, lower, upper, training=True)
    slopes = slopes_of(x.shape, x.dtype, x.device, lower, upper, seed)
    assert ((slopes >= lower) & (slopes <= upper)).all()
    if upper > lower and x.numel() >= 16:
        assert slopes.unique().numel() > 1
    negative = x.detach() <= 0
    xa = x.detach().to(slopes.dtype)
    want = torch.where(negative, (xa * slopes).to(x.dtype), x.detach())
    torch.testing.assert_close(out, want, atol=0, rtol=0, equal_nan=True)
    # the slope seen from outside: output / input on the negative elements
    finite = negative & torch.isfinite(xa) & (xa.abs() > 1e-2)  # away from 16-bit subnormals
    ratio = out.detach().to(slopes.dtype)[finite] / xa[finite]
    eps = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(x.dtype, 1e-6)
    assert ((ratio >= lower * (1 - eps)) & (ratio <= upper * (1 + eps))).all()
    g = torch.randn(x.shape, dtype=torch.float64).to(x.device, x.dtype)
    (got,) = torch.autograd.grad(out, x, g)
    want_grad = torch.where(negative, (g.to(slopes.dtype) * slopes).to(x.dtype), g)
    torch.testing.assert_close(got, want_grad, atol=0, rtol=0)


def test_training_opinfo_samples(device, dtype):
    samples = list(opinfo_samples(device, dtype, training=True))
    assert samples
    for x, kwargs in samples:
        check_training(x, kwargs["lower"], kwargs["upper"])


@pytest.mark.parametrize("n", [1, 7, 9, 100_003])  # partial bytes and groups; several threads
def test_training_values_and_grads(n, dtype, device):
    check_training(special_input(n, dtype, device), 0.1, 0.3)


def test_training_special_values_like_torch(device):
    """torch's comparisons: x <= 0 takes a slope (0 and -0.0 too, keeping their sign), NaN and
    +inf pass with gradient 1, -inf stays -inf with the slope as gradient."""
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0], device=device,
                     requires_grad=True)
    out = reseeded(F.rrelu)(x, 0.2, 0.4, training=True)
    ref = reseeded(TF.rrelu)(x, 0.2, 0.4, training=True)  # other slopes, same structure
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert torch.equal(torch.signbit(out[3:5]), torch.tensor([False, True], device=device))
    (g,) = torch.autograd.grad(out, x, torch.ones_like(x))
    slopes = slopes_of(6, torch.float32, device, 0.2, 0.4)
    torch.testing.assert_close(g, torch.cat([torch.ones(2, device=device), slopes[2:5],
                                             torch.ones(1, device=device)]))


def test_lower_equal_upper_is_leaky_relu(device):
    x = special_input(1000, torch.float32, device).requires_grad_(True)
    out = F.rrelu(x, 0.2, 0.2, training=True)
    torch.testing.assert_close(out, TF.leaky_relu(x, 0.2), atol=0, rtol=0, equal_nan=True)
    g = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(TF.rrelu(x, 0.2, 0.2, True), x, g)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_slopes_are_uniform(dtype, device):
    """Mean and variance of 10^6 slopes within 5 standard errors of U(lower, upper)'s, on the
    whole and per position within a Philox group; all inside [lower, upper]."""
    lower, upper, n = -0.25, 0.75, 1_000_000
    s = slopes_of(n, dtype, device, lower, upper).double()
    assert s.min() >= lower and s.max() <= upper
    width = upper - lower
    for part in (s, *s.view(-1, 4).unbind(1)):
        m = part.numel()
        assert abs(part.mean().item() - (lower + upper) / 2) < 5 * width / (12 * m) ** 0.5
        # (u - 1/2)^2 of u ~ U(0, 1) has variance 1/80 - 1/144 = 1/180
        var_se = width ** 2 / (180 * m) ** 0.5
        assert abs(part.var().item() - width ** 2 / 12) < 5 * var_se
    # and no coarse structure: each tenth of the range holds its tenth
    counts = torch.histc(s, bins=10, min=lower, max=upper)
    assert ((counts - n / 10).abs() < 5 * (n / 10) ** 0.5).all()


def test_reproducible_with_manual_seed_and_fresh_otherwise(device):
    x = torch.randn(10_001, device=device)
    torch.manual_seed(5)
    a = F.rrelu(x, training=True)
    b = F.rrelu(x, training=True)
    torch.manual_seed(5)
    assert torch.equal(F.rrelu(x, training=True), a)
    assert torch.equal(F.rrelu(x, training=True), b)
    assert not torch.equal(a, b)
    torch.manual_seed(6)
    assert not torch.equal(F.rrelu(x, training=True), a)


def test_the_same_whatever_the_thread_count():
    x = -torch.rand(300_007) - 0.1
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(reseeded(F.rrelu)(x, training=True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def draws_on_every_path():
    """Outputs that take every path of the CPU Philox: whole blocks of 16 and 8 groups and their
    tails, slices that start inside a group, the mask form; float32, float64 and bfloat16."""
    ops = torch.ops.fastops
    rows = torch.tensor([[1234567890123, 5], [-987654321, 2**40]])
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.linspace(-3, 1, 2 * 4099, dtype=torch.float64).to(dtype).view(2, 4099)
        out += [ops.rrelu_seeded(x, rows[0], 0.1, 0.3), ops.rrelu_seeded(x, rows, -0.2, 0.7),
                *ops.rrelu_seeded_with_mask(x, rows[1], 0.0, 1.0)]
    return out


def test_every_cpu_isa_draws_the_same_slopes(tmp_path):
    """The AVX-512 and AVX2 Philox (intrinsics) and the scalar one give the same words, and the
    slope formula the same bits, whatever the instruction set (FASTOPS_CPU_ISA caps it)."""
    import os
    import subprocess
    import sys

    here = draws_on_every_path()
    script = ("import sys, torch, fastops; sys.path.insert(0, sys.argv[2]); "
              "from test_rrelu import draws_on_every_path; "
              "torch.save((fastops.cpu_isa(), draws_on_every_path()), sys.argv[1])")
    for isa in ("avx2", "baseline"):
        path = tmp_path / f"{isa}.pt"
        subprocess.run([sys.executable, "-c", script, str(path), os.path.dirname(__file__)],
                       env={**os.environ, "FASTOPS_CPU_ISA": isa}, check=True,
                       cwd=SUBPROCESS_CWD)
        ran, there = torch.load(path)
        assert ran in (isa, "baseline")
        assert all(torch.equal(a, b) for a, b in zip(here, there, strict=True))


def philox4x32_10(ctr, key):
    """Philox4x32-10 in Python, the reference the kernels' words are held against."""
    ctr, (k0, k1) = list(ctr), key
    mask = 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = 0xD2511F53 * ctr[0], 0xCD9E8D57 * ctr[2]
        ctr = [(p1 >> 32) ^ ctr[1] ^ k0, p1 & mask, (p0 >> 32) ^ ctr[3] ^ k1, p0 & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return ctr


def test_philox_known_answers_and_counter_layout():
    """The Python Philox gives Random123's known answers; the kernels give its words with the
    documented layout (csrc/rrelu.h): key = the seed row's key, counter = (element // 4, offset),
    element e taking word e % 4, read back from float64 slopes in [0, 1) (slope = word * 2^-32)."""
    kat = [
        ((0, 0, 0, 0), (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, words in kat:
        assert philox4x32_10(ctr, key) == words
    for key, offset in [(0, 0), (0x299F31D0A4093822, 0x0370734413198A2E), (2**64 - 1, 2**64 - 1)]:
        signed = [v - 2**64 if v >= 2**63 else v for v in (key, offset)]
        n = 151  # 38 groups: blocks of 16 and 8 for the intrinsics, and a tail
        got = -ops.rrelu_seeded(-torch.ones(n, dtype=torch.float64), torch.tensor(signed),
                                0.0, 1.0)
        split = [key & 0xFFFFFFFF, key >> 32]
        want = [philox4x32_10((e // 4, 0, offset & 0xFFFFFFFF, offset >> 32), split)[e % 4]
                for e in range(n)]
        assert [int(v * 2**32) for v in got.tolist()] == want


# ---- layouts and shapes -----------------------------------------------------------------------


def test_empty_and_zero_dim(device):
    for shape in [(0,), (3, 0, 2), ()]:
        x = torch.randn(shape, device=device, requires_grad=True)
        for training in (False, True):
            out = F.rrelu(x, training=training)
            assert out.shape == x.shape
            out.sum().backward()
            assert x.grad.shape == x.shape
    x = torch.tensor(-2.0, device=device)
    out = reseeded(F.rrelu)(x, 0.1, 0.3, training=True)
    assert out.shape == () and out == -2.0 * slopes_of((), torch.float32, device, 0.1, 0.3)


@pytest.mark.parametrize("layout", ["transposed", "strided", "offset"])
def test_non_contiguous(layout, device):
    """A view draws the slopes of its contiguous copy (by logical index)."""
    base = torch.randn(41, 62, device=device)
    x = {"transposed": base.t(), "strided": base[:, ::2],
         "offset": base.view(-1)[1:1 + 40 * 61].view(40, 61)}[layout]
    assert not x.is_contiguous() or x.data_ptr() % 16
    x.requires_grad_(True)
    xc = x.detach().contiguous().requires_grad_(True)
    a = reseeded(F.rrelu)(x, training=True)
    b = reseeded(F.rrelu)(xc, training=True)
    assert torch.equal(a, b)
    g = torch.randn(a.shape, device=device).t().contiguous().t()
    assert torch.equal(torch.autograd.grad(a, x, g)[0], torch.autograd.grad(b, xc, g)[0])


def test_inplace_is_accepted_and_computed_out_of_place():
    x = torch.randn(20)
    before = x.clone()
    out = F.rrelu(x, inplace=True)
    assert torch.equal(x, before)
    torch.testing.assert_close(out, TF.rrelu(before), atol=0, rtol=0)
    m = fnn.RReLU(inplace=True)
    out = m(x)
    assert torch.equal(x, before) and out.shape == x.shape


# ---- errors ------------------------------------------------------------------------------------


def test_opinfo_error_inputs(device):
    errors = list(OPINFO.error_inputs(device))
    assert errors
    for e in errors:
        s = e.sample_input
        for training in (False, True):
            kwargs = {**s.kwargs, "training": training}
            with pytest.raises(e.error_type, match=e.error_regex):
                F.rrelu(s.input, *s.args, **kwargs)
            with pytest.raises(e.error_type, match=e.error_regex):
                fnn.RReLU(kwargs["lower"], kwargs["upper"]).train(training)(s.input)


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        F.rrelu(torch.arange(4), training=True)
    with pytest.raises(TypeError, match="floating-point"):
        F.rrelu(torch.arange(4))
    x = torch.randn(3, 4)
    seed = ops.rrelu_seed(x)
    with pytest.raises(TypeError, match="int64"):
        ops.rrelu_seeded(x, seed.float(), 0.1, 0.3)
    with pytest.raises(RuntimeError, match=r"seed of shape \(2,\), or \(S, 2\)"):
        ops.rrelu_seeded(x, torch.zeros(4, 2, dtype=torch.long), 0.1, 0.3)
    with pytest.raises(RuntimeError, match=r"seed of shape \(2,\), or \(S, 2\)"):
        ops.rrelu_seeded(torch.randn(()), torch.zeros(1, 2, dtype=torch.long), 0.1, 0.3)
    with pytest.raises(RuntimeError, match="Lower bound"):
        ops.rrelu_seeded_backward(x, x, seed, 0.5, 0.1)
    with pytest.raises(RuntimeError, match="1-D mask of 2 bytes"):
        ops.rrelu_seeded_mask_backward(x, torch.zeros(3, dtype=torch.uint8), seed, 0.1, 0.3)
    with pytest.raises(RuntimeError, match="samples must be >= 0"):
        ops.rrelu_seed(x, -1)
    # the process survives and keeps working
    torch.testing.assert_close(F.rrelu(torch.tensor([-1.0, 2.0]), 0.5, 0.5, True),
                               torch.tensor([-0.5, 2.0]))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_cuda_draws_the_cpu_slopes(dtype):
    """The same seed rows give the same bits on both devices (one formula, csrc/rrelu.h): 16-byte
    packs, element-wise access (a misaligned view), the partial last octet, rows per slice, and
    the mask forms."""
    rows = torch.tensor([[1234567890123, 5], [-987654321, 2**40], [7, 0]])
    base = torch.linspace(-3, 1, 3 * 1003 + 1, dtype=torch.float64).to(dtype)
    for x in (base[:-1].view(3, 1003), base[1:].view(3, 1003)):
        g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
        for seed in (rows[0], rows):
            results = []
            for xd, gd, sd in ((x, g, seed), (x.cuda(), g.cuda(), seed.cuda())):
                out, mask = ops.rrelu_seeded_with_mask(xd, sd, 0.1, 0.3)
                results.append([ops.rrelu_seeded(xd, sd, 0.1, 0.3), out, mask,
                                ops.rrelu_seeded_backward(gd, xd, sd, 0.1, 0.3),
                                ops.rrelu_seeded_mask_backward(gd, mask, sd, 0.1, 0.3)])
            for a, b in zip(*results):
                assert torch.equal(a, b.cpu())


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_seed_on_another_device():
    x = torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        ops.rrelu_seeded(x, torch.zeros(2, dtype=torch.long), 0.1, 0.3)


# ---- derivatives ------------------------------------------------------------------------------


def away_from_zero(shape, device, gen_seed=1):
    gen = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x + 0.1 * torch.sign(x)).to(device).requires_grad_(True)


@pytest.mark.parametrize("training", [False, True])
def test_gradcheck_and_gradgradcheck(training, device):
    x = away_from_zero((3, 4, 5), device)
    fn = reseeded(functools.partial(F.rrelu, lower=0.1, upper=0.4, training=training))
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)
    # the Python twin, with an explicit seed
    seed = ops.rrelu_seed(x)
    twin = lambda t: RReLUFunction.apply(t, seed, 0.1, 0.4)  # noqa: E731
    assert torch.autograd.gradcheck(twin, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(twin, (x,), fast_mode=True)
    torch.testing.assert_close(twin(x), ops.rrelu_seeded(x, seed, 0.1, 0.4), atol=0, rtol=0)


def test_second_order(device):
    """The gradient is grad * slope: by the input its derivative is zeros, by grad_output the
    slopes again."""
    x = away_from_zero((4, 6), device)
    v = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    out = reseeded(F.rrelu)(x, 0.1, 0.3, training=True)
    (g,) = torch.autograd.grad(out, x, v, create_graph=True)
    assert g.requires_grad
    w = torch.randn_like(g)
    dx, dv = torch.autograd.grad(g, (x, v), w)
    slopes = slopes_of(x.shape, torch.float64, device, 0.1, 0.3)
    noise = torch.where(x.detach() <= 0, slopes, torch.ones_like(slopes))
    assert torch.equal(dx, torch.zeros_like(x))
    torch.testing.assert_close(dv, w * noise)
    torch.testing.assert_close(g, v * noise)


def test_forward_ad_is_tangent_times_noise(device):
    import torch.autograd.forward_ad as fwAD

    x = away_from_zero((3, 5), device).detach()
    t = torch.randn_like(x)
    with fwAD.dual_level():
        y = reseeded(F.rrelu)(fwAD.make_dual(x, t), 0.1, 0.3, training=True)
        primal, tangent = fwAD.unpack_dual(y)
    slopes = slopes_of(x.shape, torch.float64, device, 0.1, 0.3)
    noise = torch.where(x <= 0, slopes, torch.ones_like(slopes))
    torch.testing.assert_close(primal, x * noise)
    torch.testing.assert_close(tangent, t * noise)


def test_vmap_randomness(device):
    """Like torch's random ops: 'error' raises, 'same' gives every sample the slopes of one
    unbatched call, 'different' gives each sample its own, each as valid."""
    batch = -torch.rand(5, 3, 7, device=device) - 0.5
    fn = functools.partial(F.rrelu, lower=0.1, upper=0.3, training=True)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(fn)(batch)
    same = reseeded(vmap(fn, randomness="same"))(batch)
    slopes = slopes_of((3, 7), torch.float32, device, 0.1, 0.3)
    torch.testing.assert_close(same, batch * slopes, atol=0, rtol=0)
    diff = reseeded(vmap(fn, randomness="different"))(batch)
    assert torch.equal(diff, reseeded(vmap(fn, randomness="different"))(batch))
    ratio = diff / batch
    assert ((ratio >= 0.1 - 1e-6) & (ratio <= 0.3 + 1e-6)).all()
    for i in range(1, 5):
        assert not torch.equal(ratio[i], ratio[0])
    # per-sample gradients are each sample's slopes
    grads = reseeded(vmap(grad(lambda t: fn(t).sum()), randomness="different"))(batch)
    torch.testing.assert_close(grads, ratio)


def test_seed_rows_per_slice():
    """rrelu_seeded with a row per slice along dim 0 (what vmap's 'different' passes): slice s
    draws what it would draw alone with row s."""
    x = torch.randn(3, 5, 7)
    rows = ops.rrelu_seed(x, 3)
    assert rows.shape == (3, 2) and rows[:, 1].tolist() == [0, 1, 2]
    out = ops.rrelu_seeded(x, rows, 0.1, 0.3)
    for s in range(3):
        assert torch.equal(out[s], ops.rrelu_seeded(x[s], rows[s], 0.1, 0.3))
    out2, mask = ops.rrelu_seeded_with_mask(x, rows, 0.1, 0.3)
    assert torch.equal(out2, out)
    g = torch.randn_like(x)
    assert torch.equal(ops.rrelu_seeded_mask_backward(g, mask, rows, 0.1, 0.3),
                       ops.rrelu_seeded_backward(g, x, rows, 0.1, 0.3))


# ---- what autograd keeps -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saves_fewer_bytes_than_the_input(dtype, device):
    """The seed rows (16 bytes) and one bit per element, plus the tie of the masked activations
    (one element, see tests/test_activations.py): against torch's noise tensor of the input's
    size and dtype."""
    x = torch.randn(64, 1001, device=device, dtype=dtype, requires_grad=True)

    def saved_bytes(fn):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, training=True)
        return sum(storages.values())

    ours, theirs = saved_bytes(F.rrelu), saved_bytes(TF.rrelu)
    input_bytes = x.numel() * x.element_size()
    assert ours < input_bytes / 8
    assert ours == (x.numel() + 7) // 8 + 16 + x.element_size()
    assert theirs >= input_bytes


# ---- registration: opcheck, torch.compile, modules ---------------------------------------------


def test_opcheck(device):
    x = torch.randn(5, 7, device=device, requires_grad=True)
    for training in (False, True):
        torch.library.opcheck(ops.rrelu.default, (x, 0.1, 0.3, training))
    seed = ops.rrelu_seed(x)
    torch.library.opcheck(ops.rrelu_seed.default, (x,))
    torch.library.opcheck(ops.rrelu_seed.default, (x, 5))
    torch.library.opcheck(ops.rrelu_seeded.default, (x, seed, 0.1, 0.3))
    xd = x.detach()
    out, mask = ops.rrelu_seeded_with_mask(xd, seed, 0.1, 0.3)
    torch.library.opcheck(ops.rrelu_seeded_with_mask.default, (xd, seed, 0.1, 0.3))
    g = torch.randn_like(xd, requires_grad=True)
    torch.library.opcheck(ops.rrelu_seeded_backward.default, (g, xd, seed, 0.1, 0.3))
    torch.library.opcheck(ops.rrelu_seeded_mask_backward.default, (g, mask, seed, 0.1, 0.3))


def test_compile_fullgraph_matches_eager():
    """A model with RReLU under torch.compile(fullgraph=True): the compiled graph draws from the
    default generator like eager, so under the same seed it gives eager's values and gradients,
    in training and evaluation."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(fnn.Linear(6, 16), fnn.RReLU(0.1, 0.3), fnn.Linear(16, 3))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(9, 6, requires_grad=True)
    for training in (True, False):
        model.train(training)
        eager = reseeded(model)(x)
        got = reseeded(compiled)(x)
        torch.testing.assert_close(got, eager, atol=0, rtol=0)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0],
                                   torch.autograd.grad(eager.sum(), x)[0])


def test_module_is_a_drop_in():
    for args in [(), (0.1, 0.3), (0.2, 0.2, True)]:
        ref, ours = torch.nn.RReLU(*args), fnn.RReLU(*args)
        assert repr(ours) == repr(ref)
        assert ours.state_dict() == ref.state_dict() == {}
        ours.load_state_dict(ref.state_dict())
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.RReLU(0.05, 0.25),
                                torch.nn.Linear(8, 2))
    x = torch.randn(5, 4)
    model.eval()
    expected = model(x)
    fnn.convert(model)
    assert type(model[1]) is fnn.RReLU and type(model[0]) is fnn.Linear  # not fused
    assert (model[1].lower, model[1].upper) == (0.05, 0.25)
    torch.testing.assert_close(model(x), expected)
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.slow
def test_beyond_int32_elements():
    """64-bit element indices: elements past 2^31 take the words of their own groups."""
    n = 2**31 + 37
    key, offset = 123456789, 42
    x = torch.full((n,), -0.5, dtype=torch.bfloat16)
    y = ops.rrelu_seeded(x, torch.tensor([key, offset]), 0.0, 1.0)
    for e in [0, 5, 2**31 - 1, 2**31, 2**31 + 6, n - 1]:
        w = philox4x32_10((e // 4 & 0xFFFFFFFF, e // 4 >> 32, offset, 0), (key, 0))[e % 4]
        want = torch.tensor(-0.5 * (w >> 8) / 2**24, dtype=torch.float32).to(torch.bfloat16)
        assert y[e] == want
