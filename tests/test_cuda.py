"""CUDA-only tests: what the device-parametrised suite cannot say on its own. Skipped without a
GPU (or with a build that has no CUDA kernels).

Every other test runs on CUDA too through the `device` fixture of conftest.py."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as TF

import fastops
import fastops.functional as F

pytestmark = pytest.mark.skipif(not fastops.cuda_available(),
                                reason="needs a GPU and a build with the CUDA kernels")


def run_python(code):
    """Runs code in a fresh interpreter (a device-side assert poisons the CUDA context of the
    process that hits it) and returns the completed process."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


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
    result = run_python(f"""
        import torch, fastops
        import fastops.functional as F
        try:
            out = {call}
            torch.cuda.synchronize()
        except (RuntimeError, IndexError) as e:
            print("raised:", e)
            raise SystemExit(3)
        print("no error, got", out)
        """)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "raised:" in result.stdout


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
