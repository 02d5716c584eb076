"""CUDA-only tests: what the device-parametrised suite cannot say on its own. Skipped without a
GPU (or with a build that has no CUDA kernels).

Every other test runs on CUDA too through the `device` fixture of conftest.py."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as TF
from conftest import SUBPROCESS_CWD

import fastops
import fastops.functional as F

pytestmark = pytest.mark.skipif(not fastops.cuda_available(),
                                reason="needs a GPU and a build with the CUDA kernels")


def assert_raises_in_fresh_process(prelude, call, errors="RuntimeError, IndexError"):
    """Runs prelude, then call and a device synchronisation, in a fresh interpreter (a
    device-side assert poisons the CUDA context of the process that hits it), and asserts that
    one of errors reached Python."""
    code = textwrap.dedent(prelude) + textwrap.dedent(f"""
        try:
            out = {call}
            torch.cuda.synchronize()
        except ({errors}) as e:
            print("raised:", e)
            raise SystemExit(3)
        print("no error, got", out)
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd=SUBPROCESS_CWD)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "raised:" in result.stdout


@pytest.mark.parametrize("call", [
    "F.cross_entropy(torch.randn(4, 5, device='cuda'), torch.tensor([0, 1, 7, 2], device='cuda'))",
    "F.cross_entropy(torch.randn(4, 5, device='cuda'), torch.tensor([0, -3, 1, 2], device='cuda'))",
    "F.cross_entropy(torch.randn(2, 5, 3, device='cuda'), "
    "torch.tensor([[0, 1, 2], [5, 0, 0]], device='cuda'))",
    "F.nll_loss(torch.randn(4, 5, device='cuda'), torch.tensor([0, 9, 1, 2], device='cuda'))",
    "F.cross_entropy(torch.randn(4, 5, device='cuda'), torch.tensor([0, 1, 7, 2], "
    "device='cuda'), reduction='none')",
])
def test_out_of_range_target_is_an_error(call):
    """A class target outside [0, C) is reported as an error to Python, not read."""
    assert_raises_in_fresh_process("""
        import torch, fastops
        import fastops.functional as F
        """, call)


def test_wrong_device_arguments():
    x = torch.randn(4, 6, device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        F.prelu(x, torch.full((6,), 0.25))
    with pytest.raises(RuntimeError, match="device"):
        F.linear(x, torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="device"):
        F.linear(x, torch.randn(3, 6, device="cuda"), torch.zeros(3))
    with pytest.raises(RuntimeError, match="device"):
        F.cross_entropy(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="device"):
        F.cross_entropy(x, torch.tensor([0, 1, 2, 3], device="cuda"), weight=torch.ones(6))
    with pytest.raises(RuntimeError, match="device"):
        F.mse_loss(x, torch.randn(4, 6))
    # the process is fine afterwards
    torch.testing.assert_close(F.relu(x), TF.relu(x))


def test_runs_on_the_current_stream():
    """Kernels launch on the current stream: work queued on a side stream is ordered with it."""
    x = torch.randn(1 << 22, device="cuda")
    w = torch.randn(512, 1024, device="cuda")
    logits = torch.randn(256, 1000, device="cuda")
    target = torch.randint(0, 1000, (256,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = F.gelu(x * 2)  # the producer (x * 2) runs on the side stream too
        z = F.linear(x[: 64 * 1024].view(64, 1024) + 1, w)
        loss = F.cross_entropy(logits * 3, target)
    side.synchronize()
    torch.testing.assert_close(y, TF.gelu(x * 2))
    torch.testing.assert_close(z, TF.linear(x[: 64 * 1024].view(64, 1024) + 1, w),
                               atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(loss, TF.cross_entropy(logits * 3, target))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_shapes_off_the_tile_grid(dtype):
    """Shapes that are not multiples of any tile or vector width, and leading dims that break
    16-byte alignment, against torch in float64."""
    gen = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 1, 1), (3, 7, 5), (129, 67, 131), (257, 8, 33), (64, 130, 64),
                    (1000, 1001, 999)]:
        x = torch.randn(m, k, generator=gen).to("cuda", dtype).requires_grad_()
        w = (torch.randn(n, k, generator=gen) * k ** -0.5).to("cuda", dtype).requires_grad_()
        b = torch.randn(n, generator=gen).to("cuda", dtype).requires_grad_()
        y = F.linear(x, w, b)
        ref = TF.linear(x.double(), w.double(), b.double())
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.double(), ref, atol=tol * k ** 0.5, rtol=tol)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, w, b), g)
        refs = torch.autograd.grad(ref, (x, w, b), g.double())
        for got, want in zip(grads, refs):
            torch.testing.assert_close(got.double(), want.to(got.dtype).double(),
                                       atol=tol * max(m, k) ** 0.5, rtol=tol)


@pytest.mark.slow
def test_elementwise_beyond_int32_elements():
    """64-bit indexing on the GPU: more than 2^31 elements, checked at the far end."""
    n = 2**31 + 37
    x = torch.full((n,), -0.5, dtype=torch.bfloat16, device="cuda")
    tail = torch.tensor([1.5, -2.0, 0.25, -0.75, 3.0], dtype=torch.bfloat16, device="cuda")
    x[-5:] = tail
    y = F.elu(x)
    torch.testing.assert_close(y[-5:], TF.elu(tail))
    torch.testing.assert_close(y[:3], TF.elu(x[:3]))
    del y
    g = torch.ops.fastops.elu_backward(x, x, 1.0)
    torch.testing.assert_close(g[-5:], torch.ops.fastops.elu_backward(tail, tail, 1.0))


@pytest.mark.slow
def test_cross_entropy_beyond_int32_elements():
    """N * C beyond 2^31: the last rows' losses and gradients are right."""
    n, c = 2**16 + 3, 32768
    logits = torch.randn(n, c, dtype=torch.bfloat16, device="cuda")
    target = torch.randint(0, c, (n,), device="cuda")
    loss = F.cross_entropy(logits, target, reduction="none")
    tail = slice(n - 4, n)
    torch.testing.assert_close(loss[tail], TF.cross_entropy(logits[tail], target[tail],
                                                            reduction="none"))
    logits.requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), logits)
    last = logits[tail].detach().float().requires_grad_()
    (ref,) = torch.autograd.grad(TF.cross_entropy(last, target[tail], reduction="sum"), last)
    torch.testing.assert_close(g[tail].float(), ref, atol=1e-2, rtol=2e-2)


# ---- GEMM: operands without 16-byte rows or pointers, split-K, determinism ---------------------


def _offset_tensor(shape, dtype, offset, gen, scale=1.0):
    """A contiguous CUDA tensor whose data starts `offset` elements into its storage: its pointer
    is aligned to offset * itemsize bytes only (2 for a 16-bit offset of 1), and the ops use it
    in place."""
    numel = torch.Size(shape).numel()
    data = torch.randn(offset + numel, generator=gen, dtype=torch.float64) * scale
    return data.to("cuda", dtype)[offset:].view(shape)


def _linear_inputs(m, k, n, dtype, offset, seed):
    """x (m, k), w (n, k), b (n,) and an upstream gradient (m, n), all starting `offset` elements
    into their storage, requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    x = _offset_tensor((m, k), dtype, offset, gen).requires_grad_()
    w = _offset_tensor((n, k), dtype, offset, gen, k ** -0.5).requires_grad_()
    b = _offset_tensor((n,), dtype, offset, gen).requires_grad_()
    g = _offset_tensor((m, n), dtype, offset, gen)
    return x, w, b, g


def _check_with_grads(y, params, torch_fn, g, dtype, ks):
    """y (a fastops op of params) and its gradients for the upstream gradient g against torch_fn
    in the same dtype and in float64, by the criterion of the linear tests (check_vs_ref); ks:
    the length of the sums behind y and behind each gradient. Each result is first divided by
    the power of two nearest its root mean square (exact), as check_vs_ref's tolerances are
    made for sums of unit size and a sum over 65536 tokens is some 256 times larger."""
    from test_linear import check_vs_ref

    def check(ours, theirs, ref, k):
        rms = ref.pow(2).mean().sqrt().cpu()
        scale = 2.0 ** int(torch.frexp(rms).exponent) if rms > 0 else 1.0
        check_vs_ref(ours / scale, theirs / scale, ref / scale, dtype, k)

    theirs = [p.detach().clone().requires_grad_() for p in params]
    refs = [p.detach().double().requires_grad_() for p in params]
    y2, yr = torch_fn(*theirs), torch_fn(*refs)
    check(y, y2.detach(), yr.detach(), ks[0])
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(y2, theirs, g)
    ref = torch.autograd.grad(yr, refs, g.double())
    for a, e, r, k in zip(got, want, ref, ks[1:]):
        check(a, e, r, k)


# (m, k, n) with k and n odd, 2 mod 8, 4 mod 8 or multiples of 8, so that the rows of x, w and
# grad_z allow 2-, 4-, 8- or 16-byte access; the last shape has enough tiles for the big
# tensor-core tile, the others take the small one
UNALIGNED_SHAPES = [(1031, 1001, 1003), (1031, 1002, 1010), (1031, 1004, 1012),
                    (1031, 1008, 1000), (2051, 1002, 2100)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", UNALIGNED_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [0, 1, 2, 4], ids=lambda o: f"offset{o}")
def test_linear_rows_and_pointers_off_16_bytes(dtype, shape, offset):
    """Every access width of the GEMM loaders (16, 8, 4 bytes and element by element), with
    partial chunks at the matrix edges: values and gradients against torch."""
    m, k, n = shape
    x, w, b, g = _linear_inputs(m, k, n, dtype, offset, seed=11)
    _check_with_grads(F.linear(x, w, b), (x, w, b), TF.linear, g, dtype, (k, n, m, m))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(257, 1001, 1003), (1031, 1002, 1012)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [1, 2], ids=lambda o: f"offset{o}")
def test_linear_act_rows_and_pointers_off_16_bytes(dtype, shape, offset):
    m, k, n = shape
    x, w, b, g = _linear_inputs(m, k, n, dtype, offset, seed=12)
    y = F.linear_act(x, w, b, activation="gelu")
    _check_with_grads(y, (x, w, b), lambda *a: TF.gelu(TF.linear(*a)), g, dtype, (k, n, m, m))


# (m, k, n) whose output has a few tiles and whose sums are long: a small-M forward (K = 65536),
# the weight gradient over many tokens (k = m), with odd and unaligned leading dimensions and
# a last k tile cut short
SPLIT_K_SHAPES = [(64, 65536, 64), (65536, 64, 64), (61, 40001, 67), (40003, 72, 33)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SPLIT_K_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [0, 1], ids=lambda o: f"offset{o}")
def test_linear_split_k(dtype, shape, offset):
    m, k, n = shape
    x, w, b, g = _linear_inputs(m, k, n, dtype, offset, seed=13)
    _check_with_grads(F.linear(x, w, b), (x, w, b), TF.linear, g, dtype, (k, n, m, m))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 65536, 64), (40003, 72, 33)],
                         ids=lambda s: "x".join(map(str, s)))
def test_linear_act_split_k(dtype, shape):
    m, k, n = shape
    x, w, b, g = _linear_inputs(m, k, n, dtype, 0, seed=14)
    y = F.linear_act(x, w, b, activation="gelu")
    _check_with_grads(y, (x, w, b), lambda *a: TF.gelu(TF.linear(*a)), g, dtype, (k, n, m, m))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 65536, 64), (40003, 72, 33), (61, 40001, 67)],
                         ids=lambda s: "x".join(map(str, s)))
def test_split_k_bitwise_deterministic(dtype, shape):
    """The splits are summed in a fixed order: the same call gives the same bits."""
    m, k, n = shape
    x, w, b, g = _linear_inputs(m, k, n, dtype, 1, seed=15)
    runs = []
    for _ in range(2):
        y = F.linear(x, w, b)
        ya = F.linear_act(x, w, b, activation="gelu")
        runs.append([y, ya, *torch.autograd.grad(y, (x, w, b), g),
                     *torch.autograd.grad(ya, (x, w, b), g)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ---- S > 1 with a small class dim and few positions: several n packed into a block -------------

# (N, C, d1, ...): classes S apart, C and S small enough that a block packs many n
SMALL_SPATIAL = [(65536, 5, 3), (4097, 10, 7), (3, 2, 5), (1, 3, 1, 2)]
SMALL_SPATIAL_IDS = ["65536x5x3", "4097x10x7", "3x2x5", "1x3x1x2"]


def _on_cuda(fn):
    """fn run on the GPU for CPU tensors, its result brought back differentiably: the CPU-side
    comparison of test_losses then checks the CUDA kernels, values and gradients."""
    def run(x, *args, **kwargs):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return fn(x.cuda(), *args, **kwargs).cpu()
    return run


def _skip_float16_sum_overflow(shape, dtype, reduction):
    # Thousands of row losses add up past float16's range (65504), torch's sum included.
    rows = torch.Size(shape).numel() // shape[1]
    if dtype == torch.float16 and reduction == "sum" and rows > 2000:
        pytest.skip("the summed loss overflows float16")


@pytest.mark.parametrize("shape", SMALL_SPATIAL, ids=SMALL_SPATIAL_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15], ids=["ls0", "ls.15"])
def test_small_spatial_cross_entropy(shape, reduction, weighted, smoothing, dtype):
    from test_losses import _check_vs_torch, _inputs, _target
    _skip_float16_sum_overflow(shape, dtype, reduction)
    C = shape[1]
    x, gen = _inputs(shape, dtype)
    t = _target(shape, C, gen, ignore=-100, frac=0.2)
    t.view(-1)[0] = 1  # a class of nonzero weight: 'mean' divides by the targets' total weight
    w = None
    if weighted:
        w = torch.rand(C, generator=gen, dtype=torch.float64)
        w[::3] = 0
        w = w.to(dtype)
    _check_vs_torch(_on_cuda(F.cross_entropy), _on_cuda(TF.cross_entropy), x, dtype, t,
                    weight=w, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("shape", SMALL_SPATIAL, ids=SMALL_SPATIAL_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_small_spatial_cross_entropy_ignore_index_in_range(shape, reduction):
    from test_losses import _check_vs_torch, _inputs, _target
    C = shape[1]
    x, gen = _inputs(shape, torch.float32)
    t = _target(shape, C, gen, ignore=1, frac=0.3)
    w = torch.rand(C, generator=gen)
    _check_vs_torch(_on_cuda(F.cross_entropy), _on_cuda(TF.cross_entropy), x, torch.float32, t,
                    weight=w, ignore_index=1, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("shape", SMALL_SPATIAL, ids=SMALL_SPATIAL_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["ls0", "ls.2"])
def test_small_spatial_cross_entropy_soft_targets(shape, reduction, weighted, smoothing, dtype):
    from test_losses import _check_vs_torch, _inputs
    _skip_float16_sum_overflow(shape, dtype, reduction)
    C = shape[1]
    x, gen = _inputs(shape, dtype)
    y = torch.rand(shape, generator=gen, dtype=torch.float64).softmax(1).to(dtype)
    w = torch.rand(C, generator=gen, dtype=torch.float64).to(dtype) if weighted else None
    _check_vs_torch(_on_cuda(F.cross_entropy), _on_cuda(TF.cross_entropy), x, dtype, y,
                    weight=w, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("shape", SMALL_SPATIAL, ids=SMALL_SPATIAL_IDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True], ids=["now", "weight"])
def test_small_spatial_nll_loss(shape, reduction, weighted, dtype):
    from test_losses import _check_vs_torch, _inputs, _target
    C = shape[1]
    x, gen = _inputs(shape, dtype)
    t = _target(shape, C, gen, ignore=-100, frac=0.2)
    w = None
    if weighted:
        w = torch.rand(C, generator=gen, dtype=torch.float64)
        w[::4] = 0
        w = w.to(dtype)
    _check_vs_torch(_on_cuda(F.nll_loss), _on_cuda(TF.nll_loss), x, dtype, t, weight=w,
                    reduction=reduction)


@pytest.mark.parametrize("shape", SMALL_SPATIAL, ids=SMALL_SPATIAL_IDS)
def test_small_spatial_log_softmax(shape, dtype):
    from test_losses import _check_vs_torch, _inputs
    x, _ = _inputs(shape, dtype)
    _check_vs_torch(_on_cuda(F.log_softmax), _on_cuda(TF.log_softmax), x, dtype, 1)


# (shape, a NaN, a row of -inf, a row of -inf but for its last class), rows given as (n, s)
SPECIAL_ROWS = [
    ((65536, 5, 3), (40000, 4, 2), (65535, 0), (0, 1)),
    ((4097, 10, 7), (4096, 0, 6), (37, 3), (4000, 0)),
    ((3, 2, 5), (1, 1, 0), (2, 4), (0, 3)),
]


def _nan_rows(v, expected):
    """Whether v, of shape (N, S) or (N, C, S), is NaN exactly in the rows of `expected` (an
    (N, S) mask) and there in every element."""
    isnan = v.isnan()
    if v.dim() == 2:
        return torch.equal(isnan, expected)
    return torch.equal(isnan.any(1), expected) and bool(isnan.all(1)[expected].all())


@pytest.mark.parametrize("shape,nan_at,neg_inf_row,leading_neg_inf_row", SPECIAL_ROWS,
                         ids=["65536x5x3", "4097x10x7", "3x2x5"])
def test_small_spatial_nan_in_one_row(shape, nan_at, neg_inf_row, leading_neg_inf_row, dtype):
    """A NaN anywhere in a row makes all of that row's results NaN (loss, log_softmax and each
    of their gradients) and no other row's; a row of -inf gives NaN, as in torch; -inf before
    the first finite class adds 0. Values and gradients as torch's."""
    from test_losses import _check_vs_torch, _inputs
    N, C, S = shape
    x, gen = _inputs(shape, dtype)
    x[nan_at] = float("nan")
    x[neg_inf_row[0], :, neg_inf_row[1]] = -float("inf")
    x[leading_neg_inf_row[0], :C - 1, leading_neg_inf_row[1]] = -float("inf")
    t = torch.randint(0, C, (N, S), generator=gen)
    t[leading_neg_inf_row] = C - 1  # the finite class: a finite loss
    y = torch.rand(shape, generator=gen, dtype=torch.float64).softmax(1).to(dtype)
    expected = torch.zeros(N, S, dtype=torch.bool)
    expected[nan_at[0], nan_at[2]] = True
    expected[neg_inf_row] = True
    expected = expected.cuda()
    cases = [(F.cross_entropy, TF.cross_entropy, (t,), dict(reduction="none")),
             (F.cross_entropy, TF.cross_entropy, (t,),
              dict(reduction="none", label_smoothing=0.1)),
             (F.cross_entropy, TF.cross_entropy, (y,), dict(reduction="none")),
             (F.log_softmax, TF.log_softmax, (1,), {})]
    for ours, theirs, args, kwargs in cases:
        _check_vs_torch(_on_cuda(ours), _on_cuda(theirs), x, dtype, *args, **kwargs)
        xc = x.cuda().requires_grad_(True)
        cuda_args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        out = ours(xc, *cuda_args, **kwargs)
        (grad,) = torch.autograd.grad(out, xc, torch.ones_like(out))
        assert _nan_rows(out, expected), (ours.__name__, kwargs)
        assert _nan_rows(grad, expected), (ours.__name__, kwargs)
        lead = out[leading_neg_inf_row[0], ..., leading_neg_inf_row[1]]
        assert not lead.isnan().any(), (ours.__name__, kwargs)
    # reduced: the NaN reaches the loss, but only the gradients of its own rows
    xc = x.cuda().requires_grad_(True)
    loss = F.cross_entropy(xc, t.cuda(), label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss, xc)
    assert loss.isnan().item()
    assert _nan_rows(grad, expected)


def _small_spatial_results(x, t, y, w, g_rows, g_full, rows):
    """Values and gradients of every S > 1 op on the batch x[rows]: first the per-row ones
    (reduction 'none', log_softmax), then two means."""
    xs = x[rows].detach().requires_grad_(True)
    outs = [(F.cross_entropy(xs, t[rows], weight=w, label_smoothing=0.1, reduction="none"),
             g_rows[rows]),
            (F.cross_entropy(xs, y[rows], weight=w, reduction="none"), g_rows[rows]),
            (F.nll_loss(xs, t[rows], weight=w, reduction="none"), g_rows[rows]),
            (F.log_softmax(xs, 1), g_full[rows])]
    results = []
    for out, g in outs:
        results += [out, torch.autograd.grad(out, xs, g)[0]]
    for target in (t[rows], y[rows]):
        loss = F.cross_entropy(xs, target, weight=w, label_smoothing=0.1)
        results += [loss, torch.autograd.grad(loss, xs)[0]]
    return results


@pytest.mark.parametrize("shape", [(65536, 5, 3), (4097, 10, 7)], ids=["65536x5x3", "4097x10x7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
def test_small_spatial_bitwise_deterministic(shape, dtype):
    """The same bits from two runs; a row's results do not depend on N nor on where the batch
    starts in memory (the S > 1 layout depends on C, S and the dtype only)."""
    N, C, S = shape
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=gen) * 3).to("cuda", dtype)
    t = torch.randint(0, C, (N, S), generator=gen).cuda()
    t[::5, 0] = -100
    y = torch.rand(shape, generator=gen).softmax(1).to("cuda", dtype)
    w = torch.rand(C, generator=gen).to("cuda", dtype)
    g_rows = torch.randn(N, S, generator=gen).to("cuda", dtype)
    g_full = torch.randn(shape, generator=gen).to("cuda", dtype)
    args = (x, t, y, w, g_rows, g_full)
    first = _small_spatial_results(*args, slice(0, N))
    second = _small_spatial_results(*args, slice(0, N))
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), i
    # rows 1..37 alone: a smaller N, at an offset of C * S elements (not 16-byte aligned)
    part = _small_spatial_results(*args, slice(1, 38))
    for i, (a, b) in enumerate(zip(first[:8], part[:8])):
        assert torch.equal(a[1:38], b), i


@pytest.mark.parametrize("call", [
    "F.cross_entropy(x, t, reduction='none')",
    "F.nll_loss(x, t)",
    "torch.ops.fastops.cross_entropy_backward(torch.ones(4097, 7, device='cuda'), x, t, None, 0, "
    "-100, 0.0, torch.zeros(4097, 7, device='cuda'), torch.tensor(1.0, device='cuda'))",
    "torch.ops.fastops.nll_loss_backward(torch.tensor(1.0, device='cuda'), x, t, None, 2, -100, "
    "torch.tensor(1.0, device='cuda'))",
])
def test_small_spatial_out_of_range_target_is_an_error(call):
    """A class target outside [0, C) in the last packed row fails on the device, forward and
    backward, and is not read."""
    assert_raises_in_fresh_process("""
        import torch, fastops
        import fastops.functional as F
        x = torch.randn(4097, 10, 7, device='cuda')
        t = torch.randint(0, 10, (4097, 7), device='cuda')
        t[4096, 6] = 10
        """, call)


# ---- masked activations and maxout with saved indices: every access path of their kernels ----
# Several 16-byte accesses in flight per thread where the storage is 16-byte aligned (and, for
# maxout, inner a multiple of the vector width), one element at a time where it is not
# (x = buf[1:]); sizes off the vector width, a thread's share and a block's, and past one pass
# of the grid. The CPU kernels share the functors and the bit and index layouts: same bytes.

ACTIVATION_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# op: (params, the elements whose gradient passes, as torch's backward decides, torch's op)
MASKED_CUDA_OPS = {
    "relu": ((), lambda x: ~(x <= 0), TF.relu),
    "leaky_relu": ((0.2,), lambda x: x > 0, lambda x: TF.leaky_relu(x, 0.2)),
    "hardtanh": ((-0.5, 2.0), lambda x: ~((x <= -0.5) | (x >= 2.0)),
                 lambda x: TF.hardtanh(x, -0.5, 2.0)),
    "hardshrink": ((0.5,), lambda x: ~((x >= -0.5) & (x <= 0.5)),
                   lambda x: TF.hardshrink(x, 0.5)),
}

# Elements per access: 1 to 8; per thread and grid-stride trip: 8 to 32; per block and trip:
# 2048 to 8192 (scalar, float64, float32, 16-bit types).
MASKED_SIZES = [0, 1, 7, 8, 9, 15, 17, 31, 32, 33, 63, 65, 127, 129, 2047, 2049, 4095, 4097,
                8191, 8193, 3 * 8192 + 13]


def grid_pass_elements(per_thread):
    """What one pass of the largest grid covers with `per_thread` per thread: the kernels' grids
    are capped at 4 blocks of 256 threads per SM."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return sms * 4 * 256 * per_thread


def copy_at_offset(t, offset):
    """t's values in new storage, `offset` elements into it: offset 1 leaves the data without
    the 16-byte alignment the vector paths need (a uint8 tensor without any alignment)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    return buf[offset:].view(t.shape).copy_(t)


def kinked_input(n, dtype, gen):
    """Normal values and, every 5th element, a threshold or special value (NaN, +-inf, +-0,
    -0.5, 0.5, 2): 5 and 8 are coprime, so each lands at every bit position of a mask byte."""
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -0.5, 0.5,
                            2.0], dtype=torch.float64)
    at = torch.arange(0, n, 5)
    x[at] = special[torch.arange(at.numel()) % special.numel()]
    return x.to("cuda", dtype)


def unpacked_mask_bits(mask, n):
    """(the n bits of a mask as bools, element i from bit i % 8 of byte i // 8; the padding bits
    of its last byte)."""
    bits = (mask.long().unsqueeze(1) >> torch.arange(8, device=mask.device)) & 1
    bits = bits.flatten().bool()
    return bits[:n], bits[n:]


def check_masked_op(op, x, g):
    """NAME_with_mask and NAME_mask_backward against the input forms (bit for bit), torch, and
    the CPU kernel's mask."""
    params, passes, torch_op = MASKED_CUDA_OPS[op]
    ops = torch.ops.fastops
    n = x.numel()
    out, mask = getattr(ops, op + "_with_mask")(x, *params)
    torch.testing.assert_close(out, getattr(ops, op)(x, *params), atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(out, torch_op(x), equal_nan=True)
    assert mask.dtype == torch.uint8 and mask.shape == ((n + 7) // 8,)
    bits, padding = unpacked_mask_bits(mask, n)
    assert torch.equal(bits, passes(x))
    assert not padding.any()
    assert torch.equal(mask.cpu(), getattr(ops, op + "_with_mask")(x.cpu(), *params)[1])
    xt = x.detach().requires_grad_(True)
    want = torch.autograd.grad(torch_op(xt), xt, g)[0]
    from_input = getattr(ops, op + "_backward")(g, x, *params)
    number = ~x.isnan()  # torch's gradient at NaN differs between its own kernels
    for saved in (mask, copy_at_offset(mask, 1)):
        grad = getattr(ops, op + "_mask_backward")(g, saved, *params)
        torch.testing.assert_close(grad, from_input, atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(grad[number], want[number])


@pytest.mark.parametrize("x_offset,g_offset", [(0, 0), (1, 1), (0, 1)],
                         ids=["aligned", "offset", "offset_grad"])
@pytest.mark.parametrize("dtype", ACTIVATION_DTYPES, ids=str)
@pytest.mark.parametrize("op", list(MASKED_CUDA_OPS))
def test_masked_ops_every_access_path(op, dtype, x_offset, g_offset):
    gen = torch.Generator().manual_seed(21)
    for n in MASKED_SIZES:
        x = copy_at_offset(kinked_input(n, dtype, gen), x_offset)
        g = copy_at_offset(torch.randn(n, generator=gen).to("cuda", dtype), g_offset)
        try:
            check_masked_op(op, x, g)
        except AssertionError as e:
            raise AssertionError(f"{n} elements: {e}") from e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", list(MASKED_CUDA_OPS))
def test_masked_ops_past_one_grid_pass(op, dtype):
    """More mask bytes than one pass of the grid takes (3 passes at the 16-bit types' 32
    elements per thread): every grid-stride trip."""
    n = 3 * grid_pass_elements(32) + 13
    gen = torch.Generator().manual_seed(22)
    x = kinked_input(n, dtype, gen)
    check_masked_op(op, x, torch.randn(n, generator=gen).to("cuda", dtype))


# (shape, pool size)
MAXOUT_INDEXED_SHAPES = [
    # inner 1: the members of an output side by side, read up to 16 bytes at a time
    ((5, 6), 2), ((7, 12), 3), ((3, 8), 4), ((9, 18), 6), ((2049, 12), 3), ((1031, 24), 4),
    # odd inner: one output at a time along the inner positions
    ((3, 6, 3), 2), ((5, 9, 7), 3), ((2, 8, 5, 7), 4), ((3, 12, 1, 9), 6), ((65, 6, 33), 3),
    # inner a multiple of 8: 16-byte vectors for every dtype (aligned storage)
    ((3, 4, 8), 2), ((5, 9, 16), 3), ((2, 8, 4, 6), 4), ((7, 12, 24), 6), ((33, 6, 1024), 2),
    # inner 2, 4, 6: vectors for float64 (2 per access), float32 at 4 only
    ((3, 4, 2), 2), ((3, 6, 4), 3), ((5, 8, 6), 4),
    # the pool sizes at both ends of a byte index
    ((4, 4, 8), 1), ((2, 512, 8), 256), ((3, 512), 256),
    ((0, 4), 2), ((2, 4, 0), 2), ((2, 0, 3), 3),
]


def tied_maxout_input(shape, dtype, gen):
    """Half-integers in about [-2, 2] (exact ties in most groups) and, every 11th element, NaN
    or an infinity, at every member position."""
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5).round() / 2
    flat = x.view(-1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    at = torch.arange(0, flat.numel(), 11)
    flat[at] = special[torch.arange(at.numel()) % special.numel()]
    return x.to("cuda", dtype)


def check_maxout_indices(x, k, g_offset, gen):
    """maxout_with_indices against torch.max (values, and indices: the first maximum, the first
    NaN), maxout_indices_backward against torch's scatter and maxout_backward (bit for bit),
    with the saved indices at an offset too. Returns the indices."""
    ops = torch.ops.fastops
    out, idx = ops.maxout_with_indices(x, k)
    groups = x.unflatten(1, (-1, k))
    want = groups.max(dim=2)
    assert idx.dtype == torch.uint8 and idx.shape == want.values.shape
    torch.testing.assert_close(out, want.values, atol=0, rtol=0, equal_nan=True)
    assert torch.equal(idx.long(), want.indices)
    torch.testing.assert_close(out, ops.maxout(x, k), atol=0, rtol=0, equal_nan=True)
    g = copy_at_offset(torch.randn(out.shape, generator=gen).to("cuda", x.dtype), g_offset)
    want_grad = torch.zeros_like(groups).scatter_(2, want.indices.unsqueeze(2), g.unsqueeze(2))
    want_grad = want_grad.flatten(1, 2)
    from_input = ops.maxout_backward(g, x, k)
    for saved in (idx, copy_at_offset(idx, 1)):
        grad = ops.maxout_indices_backward(g, saved, k)
        assert grad.shape == x.shape and grad.dtype == x.dtype
        assert torch.equal(grad, want_grad)
        assert torch.equal(grad, from_input)
    return idx


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset"])
@pytest.mark.parametrize("dtype", ACTIVATION_DTYPES, ids=str)
@pytest.mark.parametrize("shape,k", MAXOUT_INDEXED_SHAPES, ids=str)
def test_maxout_indices_every_access_path(shape, k, dtype, offset):
    gen = torch.Generator().manual_seed(23)
    x = copy_at_offset(tied_maxout_input(shape, dtype, gen), offset)
    idx = check_maxout_indices(x, k, offset, gen)
    assert torch.equal(idx.cpu(), torch.ops.fastops.maxout_with_indices(x.cpu(), k)[1])


@pytest.mark.parametrize("inner", [1, 7, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_maxout_indices_past_one_grid_pass(dtype, inner):
    """More outputs than one pass of the grid takes (3 passes of the most per thread, the
    backward's 4 accesses of 8 outputs): every grid-stride trip."""
    n_out = 3 * grid_pass_elements(32) + 5
    rows = -(-n_out // inner)
    shape = (rows, 3) if inner == 1 else (rows, 3, inner)
    gen = torch.Generator().manual_seed(24)
    check_maxout_indices(tied_maxout_input(shape, dtype, gen), 3, 0, gen)


@pytest.mark.slow
def test_maxout_indices_beyond_uint32_elements():
    """An input of more than 2^32 elements (64-bit index division): the last rows against
    torch."""
    rows, k, inner = 2**28 + 3, 2, 8
    gen = torch.Generator(device="cuda").manual_seed(25)
    x = torch.randn((rows, k, inner), generator=gen, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**32
    ops = torch.ops.fastops
    out, idx = ops.maxout_with_indices(x, k)
    tail = slice(rows - 5, rows)
    want = x[tail].unflatten(1, (-1, k)).max(dim=2)
    assert torch.equal(out[tail], want.values) and torch.equal(idx[tail].long(), want.indices)
    grad = ops.maxout_indices_backward(out, idx, k)  # grad_output = out
    assert torch.equal(grad[tail], ops.maxout_indices_backward(out[tail], idx[tail], k))
    assert torch.equal(grad[:3], ops.maxout_indices_backward(out[:3], idx[:3], k))


@pytest.mark.slow
def test_masked_relu_beyond_int32_elements():
    """More than 2^31 elements: the last whole mask byte and the partial one against the same
    elements alone (they start at a byte boundary) and torch."""
    n = 2**31 + 37
    x = torch.full((n,), -0.5, dtype=torch.bfloat16, device="cuda")
    x[-13:] = torch.tensor([1.5, -2.0, 0.0, float("nan"), 3.0, -0.0, 0.25, -1.0, 2.0, -3.0,
                            float("inf"), -float("inf"), 0.5], dtype=torch.bfloat16)
    ops = torch.ops.fastops
    out, mask = ops.relu_with_mask(x)
    end = x[-13:].clone()
    end_out, end_mask = ops.relu_with_mask(end)
    assert torch.equal(mask[-2:], end_mask)
    torch.testing.assert_close(out[-13:], end_out, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(end_out, TF.relu(end), equal_nan=True)
    del out
    grad = ops.relu_mask_backward(x, mask)  # grad_output = x
    torch.testing.assert_close(grad[-13:], ops.relu_mask_backward(end, end_mask), atol=0,
                               rtol=0, equal_nan=True)
    assert torch.equal(grad[:3], torch.zeros(3, dtype=torch.bfloat16, device="cuda"))


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 8), (2, 3, 5)], ids=str)
def test_maxout_saved_index_out_of_range_is_an_error(shape):
    """A saved index past the pool (not from maxout_with_indices) is reported, not followed:
    members side by side, 16-byte vectors and single elements along the inner positions."""
    assert_raises_in_fresh_process(f"""
        import torch, fastops
        g = torch.randn({shape}, device='cuda')
        idx = torch.zeros({shape}, dtype=torch.uint8, device='cuda')
        idx.view(-1)[-1] = 2
        """, 'torch.ops.fastops.maxout_indices_backward(g, idx, 2)', errors="RuntimeError")


# ------------------------------------------------------------------------------------------
# The fully fused MLP: the fused tensor-core kernels (float16 / bfloat16, in and out widths up to
# 128, hidden widths 16..128 in steps of 16) and the layer-by-layer path that takes everything
# else, both against the nn.Sequential they replace. Called through the ops themselves
# (fused_mlp, fused_mlp_backward), so the kernels are checked whatever autograd sits on top.

MLP_ACTS = {
    "relu": TF.relu, "leaky_relu": TF.leaky_relu, "elu": TF.elu, "gelu": TF.gelu,
    "gelu_tanh": lambda x: TF.gelu(x, approximate="tanh"), "hardtanh": TF.hardtanh,
    "hardshrink": TF.hardshrink, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "none": lambda x: x,
}


def _mlp_params(dims, dtype, seed, bias=True):
    """nn.Linear-like weights (uniform in +-1/sqrt(fan_in)) and biases of dims[0] -> dims[-1]."""
    g = torch.Generator().manual_seed(seed)
    ws, bs = [], []
    for fan_in, fan_out in zip(dims[:-1], dims[1:]):
        bound = fan_in ** -0.5
        ws.append(((torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound)
                  .to("cuda", dtype).requires_grad_(True))
        bs.append(((torch.rand(fan_out, generator=g) * 2 - 1) * bound)
                  .to("cuda", dtype).requires_grad_(True) if bias else None)
    return ws, bs


def _mlp_torch(x, ws, bs, act, out_act):
    h = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        h = TF.linear(h, w, b)
        h = MLP_ACTS[act](h) if i < len(ws) - 1 else MLP_ACTS[out_act](h)
    return h


def _mlp_fastops(x, ws, bs, act, out_act, grad_out, mask=(True, True, True)):
    """fastops' output and (grad_input, grad_weights, grad_biases) for grad_out."""
    with torch.no_grad():
        out, hidden, out_preact = torch.ops.fastops.fused_mlp(x, ws, bs, act, out_act, True)
        gi, gws, gbs = torch.ops.fastops.fused_mlp_backward(
            grad_out, x, ws, bs, hidden, out_preact, act, out_act, list(mask))
    return out, gi, gws, gbs


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def _check_mlp(x, ws, bs, act="relu", out_act="none", seed=0):
    """fastops against torch in x's dtype, both judged by their distance to a float64 torch
    reference: fastops' error at most 3x torch's own (plus a floor for values near zero)."""
    dtype = x.dtype
    x = x.detach().requires_grad_(True)
    y = _mlp_torch(x, ws, bs, act, out_act)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to("cuda", dtype)
    params = [x, *ws, *[b for b in bs if b is not None]]
    torch_grads = torch.autograd.grad(y, params, g)
    p64 = [p.detach().double().requires_grad_(True) for p in params]
    x64, ws64 = p64[0], p64[1:1 + len(ws)]
    bs64 = p64[1 + len(ws):] if bs[0] is not None else [None] * len(ws)
    y64 = _mlp_torch(x64, ws64, bs64, act, out_act)
    ref_grads = torch.autograd.grad(y64, p64, g.double())

    out, gi, gws, gbs = _mlp_fastops(x.detach(), ws, bs, act, out_act, g)
    ours = [gi, *gws, *[gb for gb, b in zip(gbs, bs) if b is not None]]
    floor = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3,
             torch.bfloat16: 1.6e-2}[dtype]
    for name, a, t, r in [("output", out, y, y64), *[(f"grad {i}", a, t, r) for i, (a, t, r)
                                                        in enumerate(zip(ours, torch_grads,
                                                                         ref_grads))]]:
        assert a.shape == t.shape and a.dtype == dtype, name
        scale = max(r.abs().max().item(), 1.0)
        assert _max_err(a, r) <= 3 * _max_err(t, r) + floor * scale, (
            f"{name}: fastops error {_max_err(a, r):.3g}, torch {_max_err(t, r):.3g}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", range(16, 129, 16))
def test_fused_mlp_every_fused_width(dtype, width):
    """Every hidden width of the fused kernels, 3 hidden layers, a batch off the 128-row tile."""
    ws, bs = _mlp_params([32, width, width, width, 16], dtype, seed=width)
    x = torch.randn(1000, 32, generator=torch.Generator().manual_seed(width)).to("cuda", dtype)
    _check_mlp(x, ws, bs, seed=width)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [[2, 100, 100, 3], [200, 64, 64, 16], [32, 64, 64, 130],
                                  [32, 72, 72, 16], [130, 144, 144, 20]],
                         ids=lambda d: "-".join(map(str, d)))
def test_fused_mlp_layer_by_layer_path(dtype, dims):
    """Widths the fused kernels do not take (hidden not a multiple of 16, in / out / hidden
    beyond 128) and float32 / float64 run layer by layer, with the same results."""
    ws, bs = _mlp_params(dims, dtype, seed=len(dims))
    x = torch.randn(333, dims[0], generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    _check_mlp(x, ws, bs, act="tanh", out_act="sigmoid")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", [a for a in MLP_ACTS if a != "none"])
@pytest.mark.parametrize("out_act", ["none", "sigmoid", "tanh", "relu"])
def test_fused_mlp_activations(dtype, act, out_act):
    ws, bs = _mlp_params([3, 64, 64, 5], dtype, seed=7)  # odd in / out: padded to 16
    x = torch.randn(257, 3, generator=torch.Generator().manual_seed(7)).to("cuda", dtype)
    _check_mlp(x, ws, bs, act=act, out_act=out_act)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 127, 128, 129, 4097])
def test_fused_mlp_rows_off_the_tile(dtype, rows):
    ws, bs = _mlp_params([24, 48, 48, 10], dtype, seed=rows)
    x = torch.randn(rows, 24, generator=torch.Generator().manual_seed(rows)).to("cuda", dtype)
    _check_mlp(x, ws, bs, act="gelu", seed=rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dims", [[32, 16], [7, 64, 3], [16, 32, 32, 32, 32, 32, 32, 32, 32, 8]],
                         ids=lambda d: f"{len(d) - 1}layers")
def test_fused_mlp_depths_without_bias(dtype, dims):
    """One layer (no hidden layer), two, and nine; no biases."""
    ws, bs = _mlp_params(dims, dtype, seed=5, bias=False)
    x = torch.randn(300, dims[0], generator=torch.Generator().manual_seed(5)).to("cuda", dtype)
    _check_mlp(x, ws, bs, act="leaky_relu", out_act="tanh")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_mlp_strided_and_misaligned_input(dtype):
    ws, bs = _mlp_params([40, 64, 64, 16], dtype, seed=9)
    base = torch.randn(41 * 600 + 1, generator=torch.Generator().manual_seed(9)).to("cuda", dtype)
    _check_mlp(base[1:].view(600, 41)[:, :40], ws, bs)  # rows 41 apart
    _check_mlp(base[1:1 + 600 * 40].view(600, 40), ws, bs)  # contiguous, 2 bytes off 16
    _check_mlp(torch.randn(40, 500, device="cuda", dtype=dtype).t(), ws, bs)  # transposed


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_mlp_empty_batch(dtype):
    ws, bs = _mlp_params([32, 64, 64, 16], dtype, seed=1)
    x = torch.empty(0, 32, device="cuda", dtype=dtype)
    out, gi, gws, gbs = _mlp_fastops(x, ws, bs, "relu", "none",
                                     torch.empty(0, 16, device="cuda", dtype=dtype))
    assert out.shape == (0, 16) and gi.shape == (0, 32)
    for gw, w in zip(gws, ws):
        assert gw.shape == w.shape and not gw.any()
    assert all(gb.shape == b.shape and not gb.any() for gb, b in zip(gbs, bs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fused_mlp_output_mask(dtype):
    ws, bs = _mlp_params([32, 64, 64, 16], dtype, seed=2)
    x = torch.randn(500, 32, device="cuda", dtype=dtype)
    g = torch.randn(500, 16, device="cuda", dtype=dtype)
    _, gi, gws, gbs = _mlp_fastops(x, ws, bs, "relu", "none", g)
    for mask in [(True, False, False), (False, True, False), (False, False, True)]:
        _, gi_m, gws_m, gbs_m = _mlp_fastops(x, ws, bs, "relu", "none", g, mask)
        assert (gi_m.numel() > 0) == mask[0] and all((t.numel() > 0) == mask[1] for t in gws_m)
        assert all((t.numel() > 0) == mask[2] for t in gbs_m)
        if mask[0]:
            assert torch.equal(gi_m, gi)
        if mask[1]:
            assert all(torch.equal(a, b) for a, b in zip(gws_m, gws))
        if mask[2]:
            assert all(torch.equal(a, b) for a, b in zip(gbs_m, gbs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dims", [[32, 64, 64, 64, 64, 16], [2, 100, 100, 3]],
                         ids=["fused", "layered"])
def test_fused_mlp_bitwise_deterministic(dtype, dims):
    ws, bs = _mlp_params(dims, dtype, seed=4)
    x = torch.randn(70001, dims[0], device="cuda", dtype=dtype)
    g = torch.randn(70001, dims[-1], device="cuda", dtype=dtype)
    first = _mlp_fastops(x, ws, bs, "relu", "none", g)
    second = _mlp_fastops(x, ws, bs, "relu", "none", g)
    flat = lambda r: [r[0], r[1], *r[2], *r[3]]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(first), flat(second)))


@pytest.mark.slow  # not under the sanitizers
def test_fused_mlp_two_to_the_twenty_rows_float16():
    """The benchmark's MLP at its batch: 2^20 rows (8192 row tiles over a persistent grid)."""
    ws, bs = _mlp_params([32, 64, 64, 64, 64, 16], torch.float16, seed=20)
    x = torch.randn(1 << 20, 32, device="cuda", dtype=torch.float16)
    _check_mlp(x, ws, bs)


def test_fused_mlp_bad_arguments():
    """Clear errors, whichever of the autograd and the CUDA kernel checks first."""
    ws, bs = _mlp_params([32, 64, 64, 16], torch.float16, seed=0)
    x = torch.randn(8, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="swish"):
        torch.ops.fastops.fused_mlp(x, ws, bs, "swish", "none", False)
    with pytest.raises(RuntimeError, match="softmax"):
        torch.ops.fastops.fused_mlp(x, ws, bs, "relu", "softmax", False)
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastops.fused_mlp(x, [ws[0].cpu(), *ws[1:]], bs, "relu", "none", False)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fastops.fused_mlp(x.float(), ws, bs, "relu", "none", False)
    with pytest.raises(RuntimeError, match="31"):
        torch.ops.fastops.fused_mlp(x[:, :31], ws, bs, "relu", "none", False)
    with pytest.raises(RuntimeError, match="None"):
        torch.ops.fastops.fused_mlp(x, ws, [bs[0], None, bs[2]], "relu", "none", False)


# ---- linear + cross entropy: row chunks, memory, determinism, bad targets ---------------------
# The ops are called through their schemas (torch.ops.fastops), so that these tests say what the
# CUDA kernels do whatever the Python layer above them.

LCE_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _lce(x, w, b, target, cw=None, reduction="mean", ignore_index=-100, smoothing=0.0,
         z_loss=0.0, softcap=0.0, with_grad=True):
    """(loss, lse, grad_input, grad_weight, grad_bias) of the fastops op."""
    return torch.ops.fastops.linear_cross_entropy(
        x, w, b, target, cw, LCE_REDUCTIONS[reduction], ignore_index, smoothing, z_loss, softcap,
        with_grad)


def _lce_reference(x, w, b, target, cw=None, reduction="mean", ignore_index=-100, smoothing=0.0,
                   z_loss=0.0, softcap=0.0):
    """The op's definition in torch ops, in the dtype of its arguments: (loss, lse)."""
    z = TF.linear(x, w, b)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    loss = TF.cross_entropy(z, target, weight=cw, reduction=reduction,
                            ignore_index=ignore_index, label_smoothing=smoothing)
    lse = torch.logsumexp(z.to(torch.float64 if z.dtype == torch.float64 else torch.float32), 1)
    if target.is_floating_point():
        keep = torch.ones_like(lse, dtype=torch.bool)
        divisor = lse.new_tensor(float(x.shape[0]))
    else:
        keep = target != ignore_index
        divisor = (cw[target[keep]].sum() if cw is not None else keep.sum()).to(lse.dtype)
    lse = torch.where(keep, lse, torch.zeros_like(lse))
    if z_loss:
        zl = z_loss * lse ** 2
        extra = {"none": zl, "sum": zl.sum()}.get(reduction, zl.sum() / divisor)
        loss = loss + extra.to(loss.dtype)
    return loss, lse


def _lce_inputs(n, h, v, dtype, seed, soft=False, bias=True, weighted=False, ignore=0):
    """x, w, b (or None), target (the first `ignore` rows set to ignore_index -100) and class
    weights (or None), on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen).to("cuda", dtype)
    w = (torch.randn(v, h, generator=gen) * h ** -0.5 * 3).to("cuda", dtype)
    b = torch.randn(v, generator=gen).to("cuda", dtype) if bias else None
    if soft:
        target = torch.softmax(torch.randn(n, v, generator=gen) * 2, 1).to("cuda", dtype)
    else:
        target = torch.randint(0, v, (n,), generator=gen)
        target[:ignore] = -100
        target = target.cuda()
    cw = (torch.rand(v, generator=gen) + 0.5).to("cuda", dtype) if weighted else None
    return x, w, b, target, cw


def _rel_err(got, ref):
    ref = ref.double()
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# (options, what they exercise); each run at a shape of several chunks of rows
LCE_OPTIONS = [
    dict(reduction="mean"),
    dict(reduction="sum", weighted=True, ignore=37, smoothing=0.1, z_loss=1e-3, softcap=30.0),
    dict(reduction="mean", weighted=True, ignore=5, smoothing=0.2),
    dict(reduction="mean", soft=True, smoothing=0.1, z_loss=1e-4),
    dict(reduction="sum", soft=True, weighted=True, bias=False, softcap=5.0),
]
LCE_FLOORS = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-3}
# a 16-bit loss is rounded once more on output (half an ulp: eps / 2 relative)
LCE_LOSS_FLOORS = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", LCE_OPTIONS,
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_lce_across_row_chunks(dtype, opts):
    """Loss, lse and the gradients computed in the forward, over 2-3 chunks of rows (the last one
    ragged) with an odd vocabulary and hidden size, against the op's definition in float64: error
    no worse than twice torch's own in the same dtype (and a floor for float64 / float32)."""
    opts = dict(opts)
    kw = {k: opts.pop(k) for k in ("soft", "bias", "weighted", "ignore") if k in opts}
    n, h, v = 2178, 72, 32003  # chunks of 2048 rows (1024 in float64)
    x, w, b, target, cw = _lce_inputs(n, h, v, dtype, seed=21, **kw)
    loss, lse, gi, gw, gb = _lce(x, w, b, target, cw, **opts)

    def ref_of(dt):
        params = [t.detach().to(dt).requires_grad_() if t is not None else None for t in (x, w, b)]
        tg = target.to(dt) if target.is_floating_point() else target
        lo, ls = _lce_reference(*params, tg, cw.to(dt) if cw is not None else None, **opts)
        grads = torch.autograd.grad(lo, [p for p in params if p is not None])
        return lo.detach(), ls, grads

    ref_loss, ref_lse, ref_grads = ref_of(torch.float64)
    t_loss, _, t_grads = ref_of(dtype)
    floor = LCE_FLOORS[dtype]
    assert loss.dtype == dtype and loss.dim() == 0
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert abs(loss.double() - ref_loss).item() <= max(
        2 * abs(t_loss.double() - ref_loss).item(), LCE_LOSS_FLOORS[dtype] * abs(ref_loss).item())
    assert _rel_err(lse, ref_lse) <= (1e-12 if dtype == torch.float64 else 2e-6)
    ours = [gi, gw] + ([gb] if b is not None else [])
    assert gb.numel() == (v if b is not None else 0)
    for got, want, theirs in zip(ours, ref_grads, t_grads):
        assert got.dtype == dtype and got.shape == want.shape
        assert _rel_err(got, want) <= max(2 * _rel_err(theirs, want), floor)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lce_none_and_backward_op(dtype):
    """Reduction 'none' (no gradients from the forward) and the backward op's recomputation
    for a per-row grad_loss, every output_mask, across chunks."""
    n, h, v = 2178, 40, 32003
    x, w, b, target, cw = _lce_inputs(n, h, v, dtype, seed=22, weighted=True, ignore=11)
    opts = dict(ignore_index=-100, smoothing=0.05, z_loss=1e-3, softcap=20.0)
    loss, lse, gi, gw, gb = _lce(x, w, b, target, cw, reduction="none", **opts)
    assert loss.shape == (n,) and gi.numel() == gw.numel() == gb.numel() == 0
    assert torch.all(loss[:11] == 0) and torch.all(lse[:11] == 0)
    params = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref_loss, ref_lse = _lce_reference(*params, target, cw.double(), reduction="none", **opts)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel_err(loss, ref_loss) <= tol
    assert _rel_err(lse, ref_lse) <= (1e-12 if dtype == torch.float64 else 2e-6)
    g = torch.randn(n, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    ref_grads = torch.autograd.grad(ref_loss, params, g.double())
    for mask in ([True, True, True], [True, False, False], [False, True, True],
                 [False, False, False]):
        got = torch.ops.fastops.linear_cross_entropy_backward(
            g, x, w, b, target, cw, lse, 0, -100, 0.05, 1e-3, 20.0, mask)
        for m, ours, want in zip(mask, got, ref_grads):
            if not m:
                assert ours.numel() == 0
                continue
            assert ours.dtype == dtype and ours.shape == want.shape
            assert _rel_err(ours, want) <= (1e-10 if dtype == torch.float64 else
                                            1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lce_bitwise_deterministic(dtype):
    """No atomics: the same call gives the same bits, gradients summed over chunks included."""
    x, w, b, target, cw = _lce_inputs(2178, 72, 32003, dtype, seed=23, weighted=True, ignore=3)
    first = _lce(x, w, b, target, cw, smoothing=0.1)
    second = _lce(x, w, b, target, cw, smoothing=0.1)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_lce_runs_on_the_current_stream():
    """Every launch (GEMMs, row kernel, sums) and every scratch buffer on the current stream:
    inputs produced on a side stream and the result read after it are ordered with it."""
    x, w, b, target, cw = _lce_inputs(2178, 72, 32003, torch.float32, seed=27, weighted=True)
    want = _lce(x * 2, w, b, target, cw, smoothing=0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _lce(x * 2, w, b, target, cw, smoothing=0.1)
    side.synchronize()
    for a, c in zip(got, want):
        assert torch.equal(a, c)


def test_lce_no_rows():
    """N = 0: no chunk runs; 'mean' is NaN as in torch, the weight and bias gradients zeros."""
    x, w, b, target, _ = _lce_inputs(0, 8, 11, torch.float32, seed=24)
    loss, lse, gi, gw, gb = _lce(x, w, b, target)
    assert torch.isnan(loss) and lse.shape == (0,) and gi.shape == (0, 8)
    assert torch.equal(gw, torch.zeros(11, 8, device="cuda"))
    assert torch.equal(gb, torch.zeros(11, device="cuda"))
    loss, *_ = _lce(x, w, b, target, reduction="sum")
    assert loss.item() == 0


def test_lce_peak_memory_far_below_the_logits():
    """Extra memory of a forward with gradients (beyond its inputs and outputs) is the chunk of
    logits, far below the N x V float logits of the unfused op."""
    n, h, v = 16384, 1024, 32000
    x, w, b, target, _ = _lce_inputs(n, h, v, torch.float32, seed=25)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _lce(x, w, b, target)
    torch.cuda.synchronize()
    outputs = sum(t.untyped_storage().nbytes() for t in out)
    extra = torch.cuda.max_memory_allocated() - before - outputs
    logits = n * v * 4
    assert extra < logits / 6, f"{extra / 2**20:.0f} MB beyond the outputs"
    assert torch.isfinite(out[0])


@pytest.mark.slow
def test_lce_llm_head_bfloat16():
    """bfloat16 at an LLM head (8192 tokens, 4096 hidden, 128256 classes): loss and gradients
    within twice torch's own bfloat16 error against float32, in less memory than torch's
    unfused forward + backward."""
    n, h, v = 8192, 4096, 128256
    x, w, _, target, _ = _lce_inputs(n, h, v, torch.bfloat16, seed=26, bias=False, ignore=100)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _, gi, gw, _ = _lce(x, w, None, target)
    torch.cuda.synchronize()
    ours_peak = torch.cuda.max_memory_allocated() - before

    def torch_run(dt):
        xs, ws = x.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        lo = TF.cross_entropy(TF.linear(xs, ws), target)
        return (lo.detach(), *torch.autograd.grad(lo, (xs, ws)))

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    theirs = torch_run(torch.bfloat16)
    torch.cuda.synchronize()
    torch_peak = torch.cuda.max_memory_allocated() - before
    ref = torch_run(torch.float32)
    for got, their, want, floor in zip((loss, gi, gw), theirs, ref, (4e-3, 2e-3, 2e-3)):
        assert _rel_err(got, want) <= max(2 * _rel_err(their, want), floor)
    assert ours_peak < torch_peak, (ours_peak / 2**20, torch_peak / 2**20)


@pytest.mark.parametrize("call", [
    "_lce(torch.tensor([0, 1, 7, 2], device='cuda'))",
    "_lce(torch.tensor([0, -3, 1, 2], device='cuda'), reduction=0)",
    "_lce(torch.tensor([0, 1, 5, 2], device='cuda'), with_grad=False)",
    "torch.ops.fastops.linear_cross_entropy_backward(torch.ones(4, device='cuda'), x, w, None, "
    "torch.tensor([0, 9, 1, -100], device='cuda'), None, torch.zeros(4, device='cuda'), 0, -100, "
    "0.0, 0.0, 0.0, [True, True, False])",
])
def test_lce_out_of_range_target_is_an_error(call):
    """A class target outside [0, V) that is not ignore_index is reported as an error to
    Python, not read."""
    assert_raises_in_fresh_process("""
        import torch, fastops
        x = torch.randn(4, 3, device='cuda')
        w = torch.randn(5, 3, device='cuda')
        def _lce(t, reduction=1, with_grad=True):
            return torch.ops.fastops.linear_cross_entropy(x, w, None, t, None, reduction, -100,
                                                          0.0, 0.0, 0.0, with_grad)
        """, call)
