"""The CPU fused MLP's path for thin nets (csrc/cpu/fused_mlp_thin.cpp: one hidden layer of relu
or leaky_relu between 1-4 inputs and 1-4 outputs, no output activation, float32 or float64, AVX2
or AVX-512; with FASTOPS_CPU_ISA=baseline these nets take the layer loops and the same tests hold)
against torch's Sequential and against the layer loops that every other net takes."""

import pytest
import torch
from conftest import tol
from test_fused_mlp import assert_matches, make_mlp, run_with_inputs_padded_to_five

from fastops import functional as F

THIN_ACTIVATIONS = ["relu", "leaky_relu"]
FLOATS = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", THIN_ACTIVATIONS)
@pytest.mark.parametrize("in_features", [1, 2, 3, 4])
@pytest.mark.parametrize("out_features", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_sequential(dtype, activation, in_features, out_features, bias):
    # 1 row, a partial vector, and blocks of 256 rows with a partial last one
    fused, seq = make_mlp(in_features, out_features, 33, 1, activation, "none", bias, dtype,
                          "cpu")
    for rows in (1, 13, 600):
        x = torch.randn(rows, in_features, dtype=dtype)
        g = torch.randn(rows, out_features, dtype=dtype)
        assert_matches(fused, seq, x, g, dtype, slack=4)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("activation", THIN_ACTIVATIONS)
@pytest.mark.parametrize("in_features, hidden, out_features", [(1, 1, 1), (2, 100, 3),
                                                               (3, 64, 1), (4, 7, 4)])
def test_against_the_layer_loops(dtype, activation, in_features, hidden, out_features):
    """Zero inputs added up to 5 make the net take the layer loops. The thin path sums each
    pre-activation, each hidden gradient and the input gradient in the same order as they do, so
    the input gradient agrees bit for bit; the output and the weight gradients (summed over the
    units, and the rows, in another order) to rounding."""
    torch.manual_seed(0)
    rows, k = 1111, in_features
    x = torch.randn(rows, k, dtype=dtype)
    ws = [torch.randn(hidden, k, dtype=dtype), torch.randn(out_features, hidden, dtype=dtype)
          * hidden ** -0.5]
    bs = [torch.randn(hidden, dtype=dtype) / 4, torch.randn(out_features, dtype=dtype)]
    g = torch.randn(rows, out_features, dtype=dtype)
    (out, grads), (out5, grads5) = run_with_inputs_padded_to_five(x, ws, bs, g, activation)
    assert torch.equal(grads[0], grads5[0])
    t = tol(dtype)
    torch.testing.assert_close(out, out5, **t)
    for a, b in zip(grads[1:], grads5[1:]):
        torch.testing.assert_close(a, b, **t)


@pytest.mark.parametrize("activation", THIN_ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(activation, bias):
    torch.manual_seed(0)
    x = torch.randn(11, 2, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(7, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(3, 7, dtype=torch.float64, requires_grad=True)]
    bs = [torch.randn(o, dtype=torch.float64, requires_grad=True) for o in (7, 3)]

    def fn(x, *params):
        return F.fused_mlp(x, params[:2], params[2:] if bias else None, activation)

    params = (x, *ws, *bs) if bias else (x, *ws)
    assert torch.autograd.gradcheck(fn, params, fast_mode=True)


def test_non_finite_values():
    """A padded row of a partial vector computes act(b1): an infinite bias must not turn the
    weight gradients into NaN through 0 * inf. NaN and inf inputs give torch's values."""
    fused, seq = make_mlp(2, 3, 9, 1, "leaky_relu", "none", True, torch.float32, "cpu")
    with torch.no_grad():
        for m in (fused, seq):
            lin = m.linears()[0] if hasattr(m, "linears") else m[0]
            lin.bias[4] = float("-inf")
            lin.bias[5] = float("inf")
    x = torch.randn(13, 2)
    g = torch.randn(13, 3)
    got = forward_backward_all(fused, x, g)
    want = forward_backward_all(seq, x, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True, **tol(torch.float32))
    x[3, 0] = float("nan")
    x[7, 1] = float("inf")
    fused, seq = make_mlp(2, 3, 9, 1, "relu", "none", True, torch.float32, "cpu")
    for a, b in zip(forward_backward_all(fused, x, g), forward_backward_all(seq, x, g)):
        torch.testing.assert_close(a, b, equal_nan=True, **tol(torch.float32))


def forward_backward_all(model, x, g):
    x = x.clone().requires_grad_(True)
    out = model(x)
    return [out.detach(), *torch.autograd.grad(out, [x, *model.parameters()], g)]


def test_strides():
    fused, seq = make_mlp(3, 2, 20, 1, "relu", "none", True, torch.float32, "cpu")
    x = torch.randn(3, 700).t()[::2]  # (350, 3), strides (2, 700)
    g = torch.randn(2, 350).t()
    assert not x.is_contiguous() and not g.is_contiguous()
    assert_matches(fused, seq, x, g, torch.float32, slack=4)
    ws = [m.weight.detach().t().contiguous().t() for m in fused.linears()]
    bs = [torch.stack([m.bias.detach(), m.bias.detach()], 1)[:, 0] for m in fused.linears()]
    assert not ws[0].is_contiguous() and not bs[0].is_contiguous()
    torch.testing.assert_close(F.fused_mlp(x, ws, bs, "relu"), seq(x), **tol(torch.float32))
