"""The fully fused MLP (fastops.functional.fused_mlp, fastops.nn.FusedMLP) against the
equivalent nn.Sequential of Linear and activation modules: values and gradients in every dtype,
gradcheck in float64, odd / empty / large batches, non-contiguous views, determinism, bad
inputs, opcheck, torch.compile, and the module conversions."""

import copy

import pytest
import torch
from conftest import DEVICES, tol
from torch import nn

import fastops
from fastops import functional as F
from fastops.models import MLP
from fastops.nn import FusedMLP, convert
from fastops.ops.fused_mlp import FUSED_MLP_ACTIVATIONS


def make_mlp(in_features, out_features, hidden, layers, activation, output_activation, bias,
             dtype, device, seed=0):
    """(FusedMLP, the torch Sequential with the same weights)."""
    torch.manual_seed(seed)
    fused = FusedMLP(in_features, out_features, hidden, layers, activation, output_activation,
                     bias=bias).to(device=device, dtype=dtype)
    with torch.no_grad():  # weights of order one, so every activation sees both sides
        for p in fused.parameters():
            p.uniform_(-1.0, 1.0)
            if p.dim() == 2:
                p.mul_(1.5 / max(p.shape[1], 1) ** 0.5)
    return fused, fused.to_sequential()


def forward_backward(model, x, g):
    """(output, grad of input, grads of the parameters in order)."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    params = list(model.parameters())
    grads = torch.autograd.grad(out, [x, *params], g)
    return out.detach(), grads[0], grads[1:]


def assert_matches(fused, seq, x, g, dtype, slack=1.0):
    """slack widens the float32/float64 tolerances, for gradients summed over many rows in
    another order than torch's."""
    got = forward_backward(fused, x, g)
    want = forward_backward(seq, x, g)
    got_flat = [got[0], got[1], *got[2]]
    want_flat = [want[0], want[1], *want[2]]
    assert len(got_flat) == len(want_flat)
    if dtype in (torch.float32, torch.float64):
        atol, rtol = tol(dtype).values()
        for a, e in zip(got_flat, want_flat):
            torch.testing.assert_close(a, e, atol=atol * slack, rtol=rtol * slack)
        return
    # 16-bit: no further from a float64 reference than twice torch's own error
    ref = forward_backward(copy.deepcopy(seq).double(), x.double(), g.double())
    ref_flat = [ref[0], ref[1], *ref[2]]
    for i, (a, e, r) in enumerate(zip(got_flat, want_flat, ref_flat)):
        err_fastops = (a.double() - r).abs().max().item() if r.numel() else 0.0
        err_torch = (e.double() - r).abs().max().item() if r.numel() else 0.0
        scale = r.abs().max().item() if r.numel() else 0.0
        eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
        assert err_fastops <= 2 * err_torch + 2 * eps * scale + 1e-6, (i, err_fastops, err_torch)


@pytest.mark.parametrize("activation", FUSED_MLP_ACTIVATIONS)
@pytest.mark.parametrize("output_activation", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_sequential(device, dtype, activation, output_activation, bias):
    fused, seq = make_mlp(5, 7, 19, 2, activation, output_activation, bias, dtype, device)
    x = torch.randn(37, 5, device=device, dtype=dtype)
    g = torch.randn(37, 7, device=device, dtype=dtype)
    assert_matches(fused, seq, x, g, dtype)


@pytest.mark.parametrize("output_activation", FUSED_MLP_ACTIVATIONS)
def test_output_activations(device, output_activation):
    fused, seq = make_mlp(6, 9, 11, 1, "gelu", output_activation, True, torch.float32, device)
    x = torch.randn(29, 6, device=device)
    assert_matches(fused, seq, x, torch.randn(29, 9, device=device), torch.float32)


@pytest.mark.parametrize("rows", [0, 1, 2, 13, 121, 250, 1000, 3001])
@pytest.mark.parametrize("layers", [0, 1, 3])
@pytest.mark.parametrize("in_features", [5, 17])
def test_batch_sizes_and_depths(device, rows, layers, in_features):
    # 1000 and 3001 rows run in parallel, in several row blocks and gradient chunks; on the CPU
    # the first layer's pre-activation is recomputed by the backward at 5 inputs, saved at 17
    fused, seq = make_mlp(in_features, 3, 33, layers, "relu", "none", True, torch.float32,
                          device)
    x = torch.randn(rows, in_features, device=device)
    assert_matches(fused, seq, x, torch.randn(rows, 3, device=device), torch.float32, slack=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_recomputed_first_layer_is_bitwise_the_saved_one(dtype, activation):
    """On the CPU the backward recomputes z_0 of a first layer of <= 16 inputs instead of
    saving it. The same net with a 17th input that is zero (and a zero weight column) saves
    z_0, and every value and gradient must agree bit for bit."""
    torch.manual_seed(0)
    rows, hidden = 1000, 40
    x16 = torch.randn(rows, 16, dtype=dtype)
    ws16 = [torch.randn(hidden, 16, dtype=dtype) / 4, torch.randn(hidden, hidden, dtype=dtype) / 6,
            torch.randn(3, hidden, dtype=dtype) / 6]
    bs = [torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype),
          torch.randn(3, dtype=dtype)]
    x17 = torch.cat([x16, x16.new_zeros(rows, 1)], 1)
    ws17 = [torch.cat([ws16[0], ws16[0].new_zeros(hidden, 1)], 1), *ws16[1:]]
    g = torch.randn(rows, 3, dtype=dtype)

    def run(x, ws):
        x = x.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in ws]
        b = [t.clone().requires_grad_(True) for t in bs]
        out, hid, _ = torch.ops.fastops.fused_mlp(x, ws, b, activation, "none", True)
        grads = torch.autograd.grad(out, [x, *ws, *b], g)
        return out, hid, grads

    out16, hid16, g16 = run(x16, ws16)
    out17, hid17, g17 = run(x17, ws17)
    assert hid16[0].numel() == 0 and hid17[0].shape == (rows, hidden)  # recomputed, saved
    assert torch.equal(out16, out17)
    assert torch.equal(g16[0], g17[0][:, :16])
    assert torch.equal(g16[1], g17[1][:, :16])
    for a, b in zip(g16[2:], g17[2:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("in_features", [1, 2, 3, 4])
@pytest.mark.parametrize("hidden_layers", [1, 2])
def test_few_inputs_are_bitwise_the_tile_path(dtype, activation, in_features, hidden_layers):
    """On the CPU a layer of <= 4 inputs computes its sums in the epilogue (no tile), whole
    panels at a time (100 units: the last panel of 4 computed 32 wide, sigmoid(0) = 0.5 in the
    padding), and so does the backward product by a layer of <= 4 outputs. The same net with
    zero inputs added up to 5 runs the tile path, and every value and gradient must agree bit
    for bit. (A thin net, float32 relu with one hidden layer, takes another path on the CPU:
    test_fused_mlp_thin.py.)"""
    if dtype == torch.float32 and activation == "relu" and hidden_layers == 1:
        pytest.skip("a thin net")
    torch.manual_seed(0)
    rows, hidden, k = 999, 100, in_features
    dims = [k] + [hidden] * hidden_layers + [3]
    x = torch.randn(rows, k, dtype=dtype)
    ws = [torch.randn(o, i, dtype=dtype) * i ** -0.5 for i, o in zip(dims[:-1], dims[1:])]
    bs = [torch.randn(o, dtype=dtype) / 4 for o in dims[1:]]
    g = torch.randn(rows, 3, dtype=dtype)
    (out, grads), (out5, grads5) = run_with_inputs_padded_to_five(x, ws, bs, g, activation)
    assert torch.equal(out, out5)
    for a, b in zip(grads, grads5):
        assert torch.equal(a, b)


def run_with_inputs_padded_to_five(x, ws, bs, g, activation):
    """(output, gradients of input, weights and biases) of the fused MLP, for x and for the same
    net with zero inputs added up to 5 (which takes the layer loops' tile path on the CPU); the
    padded net's input and first weight gradients cut back to x's width."""
    rows, k = x.shape
    x5 = torch.cat([x, x.new_zeros(rows, 5 - k)], 1)
    ws5 = [torch.cat([ws[0], ws[0].new_zeros(ws[0].shape[0], 5 - k)], 1), *ws[1:]]

    def run(x, ws):
        x = x.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in ws]
        b = [t.clone().requires_grad_(True) for t in bs]
        out = F.fused_mlp(x, ws, b, activation)
        return out, list(torch.autograd.grad(out, [x, *ws, *b], g))

    out, grads = run(x, ws)
    out5, grads5 = run(x5, ws5)
    grads5[0], grads5[1] = grads5[0][:, :k], grads5[1][:, :k]
    return (out, grads), (out5, grads5)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dims", [(0, 100, 3), (2, 100, 0), (3, 40, 40, 0), (20, 40, 0),
                                  (2, 0, 3), (0, 0, 0), (0, 16)])
def test_zero_features(device, dtype, dims):
    """A layer with no inputs gives its bias, one with no outputs an empty tensor (a 0-wide
    output layer once crashed the CPU forward, a 0-input layer must not take the small-K
    path's K = 4)."""
    fused, seq = make_mlp(dims[0], dims[-1], dims[1] if len(dims) > 2 else 8, len(dims) - 2,
                          "sigmoid", "none", True, dtype, device)
    x = torch.randn(37, dims[0], device=device, dtype=dtype)
    assert_matches(fused, seq, x, torch.randn(37, dims[-1], device=device, dtype=dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bench_shape(device, dtype):
    """The 64-wide, 4-hidden-layer net of the benchmark (in 32, out 16)."""
    fused, seq = make_mlp(32, 16, 64, 4, "relu", "none", True, dtype, device)
    x = torch.randn(4099, 32, device=device, dtype=dtype)
    assert_matches(fused, seq, x, torch.randn(4099, 16, device=device, dtype=dtype), dtype,
                   slack=10)


@pytest.mark.parametrize("width", [1, 31, 32, 33, 100, 128, 129])
def test_widths(device, width):
    """Widths around the tile sizes (12 x 32 with AVX-512 float)."""
    fused, seq = make_mlp(width, width, width, 2, "tanh", "none", True, torch.float32, device)
    x = torch.randn(25, width, device=device)
    assert_matches(fused, seq, x, torch.randn(25, width, device=device), torch.float32)


@pytest.mark.parametrize("out_features", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("hidden", [16, 37])
def test_narrow_output_layers(device, dtype, out_features, hidden):
    """On the CPU an output layer of at most a quarter of a vector's lanes (and at least a vector
    of inputs) runs as dot products along its inputs."""
    fused, seq = make_mlp(3, out_features, hidden, 2, "gelu", "sigmoid", True, dtype, device)
    x = torch.randn(203, 3, device=device, dtype=dtype)
    g = torch.randn(203, out_features, device=device, dtype=dtype)
    assert_matches(fused, seq, x, g, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("features", [1, 2, 3, 4])
@pytest.mark.parametrize("hidden", [5, 16, 24, 40, 57, 100])
def test_narrow_weight_gradients(dtype, features, hidden):
    """On the CPU the weight gradient of a layer with at most 4 outputs (or inputs: stored
    transposed) runs tiles of exactly that many rows and up to 4 vectors, the last tile 1 to 4
    vectors wide: hidden widths that end each of these tiles, in both layers of a k-h-k net."""
    fused, seq = make_mlp(features, features, hidden, 1, "elu", "none", True, dtype, "cpu")
    x = torch.randn(301, features, dtype=dtype)
    assert_matches(fused, seq, x, torch.randn(301, features, dtype=dtype), dtype)


def test_narrow_layer_after_a_wider_net():
    """A narrow layer's dot products read whole vectors of the activation buffer, past the
    hidden width: what an earlier call of a wider net left there (inf here) must not leak in."""
    torch.manual_seed(0)
    wide = [torch.randn(40, 20), torch.randn(40, 40), torch.randn(1, 40)]
    F.fused_mlp(torch.full((50, 20), float("inf")), wide, None, "relu")
    fused, seq = make_mlp(20, 1, 33, 1, "relu", "none", True, torch.float32, "cpu")
    x = torch.randn(50, 20)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seq(x), **tol(torch.float32))


@pytest.mark.parametrize("activation", FUSED_MLP_ACTIVATIONS)
def test_gradcheck(device, activation):
    torch.manual_seed(0)
    x = torch.randn(9, 3, device=device, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(o, i, device=device, dtype=torch.float64, requires_grad=True)
          for o, i in [(6, 3), (6, 6), (4, 6)]]
    bs = [torch.randn(o, device=device, dtype=torch.float64, requires_grad=True)
          for o in (6, 6, 4)]

    def fn(x, *params):
        return F.fused_mlp(x, params[:3], params[3:], activation, "tanh")

    assert torch.autograd.gradcheck(fn, (x, *ws, *bs), fast_mode=True)

    def no_bias(x, *ws):
        return F.fused_mlp(x, ws, None, activation, "none")

    assert torch.autograd.gradcheck(no_bias, (x, *ws), fast_mode=True)


def test_non_contiguous(device):
    fused, seq = make_mlp(7, 5, 16, 2, "elu", "none", True, torch.float32, device)
    base = torch.randn(7, 90, device=device)
    x = base.t()[::2]  # (45, 7), strides (2, 90)
    assert not x.is_contiguous()
    g = torch.randn(5, 45, device=device).t()
    assert_matches(fused, seq, x, g, torch.float32)
    # transposed weights and strided biases
    ws = [m.weight.detach().t().contiguous().t() for m in fused.linears()]
    bs = [torch.stack([m.bias.detach(), m.bias.detach()], 1)[:, 0] for m in fused.linears()]
    assert not ws[0].is_contiguous() and not bs[0].is_contiguous()
    out = F.fused_mlp(x, ws, bs, "elu")
    torch.testing.assert_close(out, seq(x), **tol(torch.float32))


def test_input_shapes(device):
    fused, seq = make_mlp(4, 3, 8, 1, "relu", "none", True, torch.float32, device)
    x3 = torch.randn(2, 5, 4, device=device)
    torch.testing.assert_close(fused(x3), seq(x3), **tol(torch.float32))
    x1 = torch.randn(4, device=device)
    assert fused(x1).shape == (3,)
    torch.testing.assert_close(fused(x1), seq(x1), **tol(torch.float32))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_features, hidden, layers", [(5, 64, 3), (2, 100, 1)])
def test_deterministic(device, threads, in_features, hidden, layers):
    # (2, 100, 1): the spiral net, whose backward takes short row blocks on the CPU
    fused, _ = make_mlp(in_features, 3, hidden, layers, "relu", "none", True, torch.float32,
                        device)
    x = torch.randn(5000, in_features, device=device)
    g = torch.randn(5000, 3, device=device)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = forward_backward(fused, x, g)
        torch.set_num_threads(threads)
        second = forward_backward(fused, x, g)
    finally:
        torch.set_num_threads(before)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b)


def test_special_values(device):
    fused, seq = make_mlp(3, 2, 8, 1, "relu", "none", True, torch.float32, device)
    x = torch.tensor([[float("nan"), 0.0, 1.0], [float("inf"), 1.0, -1.0], [1e4, -1e4, 3.0]],
                     device=device)
    torch.testing.assert_close(fused(x), seq(x), equal_nan=True)


# ---- bad inputs ---------------------------------------------------------------------------------

def _op_args(device="cpu", dtype=torch.float32):
    x = torch.randn(4, 3, device=device, dtype=dtype)
    ws = [torch.randn(5, 3, device=device, dtype=dtype), torch.randn(2, 5, device=device,
                                                                     dtype=dtype)]
    bs = [torch.randn(5, device=device, dtype=dtype), torch.randn(2, device=device, dtype=dtype)]
    return x, ws, bs


@pytest.mark.parametrize("change, match", [
    (lambda x, ws, bs: (x, ws, bs, "swish", "none"), "unknown activation 'swish'.*relu, leaky"),
    (lambda x, ws, bs: (x, ws, bs, "relu", "softmax"), "unknown output_activation 'softmax'"),
    (lambda x, ws, bs: (x[:, :2], ws, bs, "relu", "none"), r"weights\[0\].size\(1\)"),
    (lambda x, ws, bs: (x, [ws[0], ws[1][:, :4]], bs, "relu", "none"), r"weights\[1\].size\(1\)"),
    (lambda x, ws, bs: (x, [], [], "relu", "none"), "at least one weight"),
    (lambda x, ws, bs: (x[0], ws, bs, "relu", "none"), "input of shape"),
    (lambda x, ws, bs: (x, ws, [bs[0], None], "relu", "none"), "every bias"),
    (lambda x, ws, bs: (x, ws, [bs[0]], "relu", "none"), "biases"),
    (lambda x, ws, bs: (x, ws, [bs[0][:4], bs[1]], "relu", "none"), r"biases\[0\] of shape"),
    (lambda x, ws, bs: (x, [ws[0].double(), ws[1]], bs, "relu", "none"), "dtype"),
    (lambda x, ws, bs: (x.int(), ws, bs, "relu", "none"), "floating-point"),
    (lambda x, ws, bs: (x, [ws[0], torch.randn(6, 5), torch.randn(2, 6)], bs + [bs[1]], "relu",
                        "none"), "same width"),
])
def test_bad_inputs(change, match):
    x, ws, bs = _op_args()
    args = change(x, ws, bs)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        torch.ops.fastops.fused_mlp(*args, False)


def test_bad_backward_inputs():
    x, ws, bs = _op_args()
    out, hidden, out_preact = torch.ops.fastops.fused_mlp(x, ws, bs, "relu", "tanh", True)
    g = torch.randn_like(out)
    mask = [True, True, True]
    with pytest.raises(RuntimeError, match="grad_output of shape"):
        torch.ops.fastops.fused_mlp_backward(g[:, :1], x, ws, bs, hidden, out_preact, "relu",
                                             "tanh", mask)
    with pytest.raises(RuntimeError, match="save_for_backward=True"):
        torch.ops.fastops.fused_mlp_backward(g, x, ws, bs, [x.new_zeros(4, 2)], out_preact,
                                             "relu", "tanh", mask)
    with pytest.raises(RuntimeError, match="one per hidden layer"):
        torch.ops.fastops.fused_mlp_backward(g, x, ws, bs, [], out_preact, "relu", "tanh", mask)
    with pytest.raises(RuntimeError, match="out_preact"):
        torch.ops.fastops.fused_mlp_backward(g, x, ws, bs, hidden, x.new_empty(0), "relu",
                                             "tanh", mask)


def test_functional_errors():
    x, ws, bs = _op_args()
    with pytest.raises(ValueError, match="unknown activation 'prelu'"):
        F.fused_mlp(x, ws, bs, "prelu")
    with pytest.raises(ValueError, match="0-d"):
        F.fused_mlp(x[0, 0], ws, bs)


def test_second_derivative_raises(device):
    fused, _ = make_mlp(3, 2, 8, 1, "tanh", "none", True, torch.float64, device)
    x = torch.randn(4, 3, device=device, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(fused(x).sum(), x, create_graph=False)
    with pytest.raises(RuntimeError, match="does not support a second derivative"):
        torch.autograd.grad(fused(x).sum(), x, create_graph=True)


def test_backward_without_saved_raises():
    x, ws, bs = _op_args()
    ws = [w.requires_grad_(True) for w in ws]
    out, _, _ = torch.ops.fastops.fused_mlp(x, ws, bs, "relu", "none", False)
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a second device")
def test_device_mismatch():
    x, ws, bs = _op_args()
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.fastops.fused_mlp(x, [ws[0].cuda(), ws[1]], bs, "relu", "none", False)


# ---- the op machinery ---------------------------------------------------------------------------

def test_opcheck(device):
    x, ws, bs = _op_args(device)
    opcheck = torch.library.opcheck
    for out_act in ("none", "sigmoid"):
        for biases in (bs, [None, None], []):
            for save in (True, False):
                opcheck(torch.ops.fastops.fused_mlp.default,
                        (x, ws, biases, "gelu", out_act, save))
        out, hidden, out_preact = torch.ops.fastops.fused_mlp(x, ws, bs, "gelu", out_act, True)
        g = torch.randn_like(out)
        for mask in ([True, True, True], [False, True, False], [True, False, True]):
            opcheck(torch.ops.fastops.fused_mlp_backward.default,
                    (g, x, ws, bs, hidden, out_preact, "gelu", out_act, mask))


def test_compile_fullgraph():
    fused, seq = make_mlp(4, 3, 16, 2, "relu", "none", True, torch.float32, "cpu")
    x = torch.randn(10, 4)

    def loss(model, x):
        return F.cross_entropy(model(x), torch.arange(10) % 3)

    compiled = torch.compile(lambda x: loss(fused, x), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x), list(fused.parameters()))
    want = torch.autograd.grad(loss(seq, x), list(seq.parameters()))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol(torch.float32))


def test_torch_func_grad():
    fused, seq = make_mlp(4, 3, 8, 1, "gelu", "none", True, torch.float64, "cpu")
    x = torch.randn(6, 4, dtype=torch.float64)
    got = torch.func.grad(lambda x: fused(x).square().sum())(x)
    want = torch.func.grad(lambda x: seq(x).square().sum())(x)
    torch.testing.assert_close(got, want)


# ---- modules ------------------------------------------------------------------------------------

def test_state_dict_and_init_match_sequential():
    torch.manual_seed(3)
    fused = FusedMLP(6, 2, 10, 3, activation="gelu_tanh", output_activation="sigmoid")
    torch.manual_seed(3)
    seq = nn.Sequential(nn.Linear(6, 10), nn.GELU(approximate="tanh"), nn.Linear(10, 10),
                        nn.GELU(approximate="tanh"), nn.Linear(10, 10),
                        nn.GELU(approximate="tanh"), nn.Linear(10, 2), nn.Sigmoid())
    sd_f, sd_s = fused.state_dict(), seq.state_dict()
    assert list(sd_f) == list(sd_s)
    for k in sd_f:
        assert torch.equal(sd_f[k], sd_s[k])
    x = torch.randn(5, 6)
    torch.testing.assert_close(fused(x), seq(x))
    assert repr(fused.to_sequential()) == repr(seq)


@pytest.mark.parametrize("activation", FUSED_MLP_ACTIVATIONS)
def test_round_trip(activation):
    fused, seq = make_mlp(3, 2, 5, 2, activation, "tanh", False, torch.float32, "cpu")
    back = FusedMLP.from_sequential(seq)
    assert (back.activation, back.output_activation, back.hidden_layers) == (
        activation, "tanh", 2)
    again = back.to_sequential()
    for (k1, v1), (k2, v2) in zip(seq.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    x = torch.randn(4, 3)
    assert torch.equal(back(x), fused(x))


@pytest.mark.parametrize("seq, why", [
    (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)),
     "different widths"),
    (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)),
     "activations differ"),
    (nn.Sequential(nn.Linear(2, 3), nn.LeakyReLU(0.2), nn.Linear(3, 1)), "default parameters"),
    (nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.1), nn.Linear(3, 1)), "activation"),
    (nn.Sequential(nn.ReLU()), "starts with a Linear"),
    (nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 1)), "bias"),
])
def test_from_sequential_rejects(seq, why):
    with pytest.raises(ValueError, match=why):
        FusedMLP.from_sequential(seq)


def test_convert_fuse_mlp():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                      nn.Linear(8, 3))
            self.other = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.0), nn.Linear(5, 2))

        def forward(self, x):
            return self.other(self.body(x))

    torch.manual_seed(0)
    net = Net()
    ref = Net()
    ref.load_state_dict(net.state_dict())
    params = {id(p) for p in net.parameters()}
    keys = list(net.state_dict())
    converted = convert(net, fuse_mlp=True)
    assert converted is net
    assert isinstance(net.body, FusedMLP) and not isinstance(net.other, FusedMLP)
    assert {id(p) for p in net.parameters()} == params
    assert list(net.state_dict()) == keys
    x = torch.randn(7, 4)
    torch.testing.assert_close(net(x), ref(x), **tol(torch.float32))
    # a Sequential that is itself an MLP comes back as a FusedMLP
    seq = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    assert isinstance(convert(seq, fuse_mlp=True), FusedMLP)


def test_models_mlp_fused():
    torch.manual_seed(0)
    model = MLP(2, [16, 16], 3, activation="elu", fused=True)
    assert isinstance(model.layers, FusedMLP)
    twin = model.twin("torch")
    x = torch.randn(9, 2)
    torch.testing.assert_close(model(x), twin(x), **tol(torch.float32))
    with pytest.raises(ValueError, match="one width"):
        MLP(2, [16, 8], 3, fused=True)
    with pytest.raises(ValueError, match="dropout"):
        MLP(2, [16], 3, dropout=0.1, fused=True)
    with pytest.raises(ValueError, match="activations"):
        MLP(2, [16], 3, activation="prelu", fused=True)


def test_public_api():
    assert fastops.functional.fused_mlp is F.fused_mlp
    assert fastops.nn.FusedMLP is FusedMLP
