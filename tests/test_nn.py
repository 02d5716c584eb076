"""The drop-in promise: fastops.nn modules load torch state_dicts, convert() swaps a torch model
in place, and torch.compile(fullgraph=True) traces fastops models without graph breaks."""

import subprocess
import sys

import pytest
import torch
from torch import nn as tnn

import fastops
from fastops import nn as fnn


def torch_mlp(activation=tnn.GELU):
    torch.manual_seed(0)
    return tnn.Sequential(tnn.Linear(12, 32), activation(), tnn.Linear(32, 16), tnn.PReLU(16),
                          tnn.Linear(16, 5))


def fastops_mlp(activation=fnn.GELU):
    return tnn.Sequential(fnn.Linear(12, 32), activation(), fnn.Linear(32, 16), fnn.PReLU(16),
                          fnn.Linear(16, 5))


def test_state_dict_loads_unchanged():
    ref = torch_mlp()
    model = fastops_mlp()
    model.load_state_dict(ref.state_dict())
    assert list(model.state_dict()) == list(ref.state_dict())
    x = torch.randn(7, 12)
    torch.testing.assert_close(model(x), ref(x))


@pytest.mark.parametrize("module, args", [
    (tnn.ReLU, ()), (tnn.ELU, (0.5,)), (tnn.GELU, ("tanh",)), (tnn.Hardtanh, (-2.0, 2.0)),
    (tnn.LeakyReLU, (0.1,)), (tnn.Sigmoid, ()), (tnn.Tanh, ()), (tnn.Hardshrink, (0.3,)),
    (tnn.PReLU, (3, 0.1)), (tnn.LogSoftmax, (1,)), (tnn.Softmax, (1,)),
])
def test_modules_match_torch(module, args):
    ref = module(*args)
    ours = getattr(fnn, module.__name__)(*args)
    ours.load_state_dict(ref.state_dict())
    assert repr(ours) == repr(ref)
    x = torch.randn(4, 3, 5, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x))


def test_losses_match_torch():
    x, t = torch.randn(6, 4), torch.randint(0, 4, (6,))
    w = torch.rand(4)
    torch.testing.assert_close(fnn.CrossEntropyLoss(w, label_smoothing=0.1)(x, t),
                               tnn.CrossEntropyLoss(w, label_smoothing=0.1)(x, t))
    lp = torch.log_softmax(x, 1)
    torch.testing.assert_close(fnn.NLLLoss(w, ignore_index=2)(lp, t),
                               tnn.NLLLoss(w, ignore_index=2)(lp, t))
    y = torch.randn(6, 4)
    torch.testing.assert_close(fnn.MSELoss(reduction="sum")(x, y), tnn.MSELoss(reduction="sum")(x, y))


def test_maxout_module():
    m = fnn.Maxout(2)
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), x.view(3, 4, 2).max(-1).values)
    assert "pool_size=2" in repr(m)
    with pytest.raises(ValueError):
        fnn.Maxout(0)


def test_convert_fuses_and_keeps_parameters():
    model = torch_mlp()
    x = torch.randn(9, 12)
    expected = model(x)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    fnn.convert(model)
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys
    assert isinstance(model[0], fnn.LinearAct) and model[0].activation == "gelu"
    assert isinstance(model[1], tnn.Identity)
    assert type(model[2]) is fnn.Linear  # followed by PReLU: a parameter, so not fused
    assert type(model[3]) is fnn.PReLU
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_linear_act_module():
    m = fnn.LinearAct(6, 8, activation="elu", alpha=0.5)
    x = torch.randn(5, 6)
    torch.testing.assert_close(m(x), torch.nn.functional.elu(torch.nn.functional.linear(
        x, m.weight, m.bias), 0.5))
    p = fnn.LinearAct(6, 8, activation="prelu", num_parameters=8, init=0.1)
    assert p.act_weight.shape == (8,)
    torch.testing.assert_close(p(x), torch.nn.functional.prelu(
        torch.nn.functional.linear(x, p.weight, p.bias), p.act_weight))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = fnn.convert(torch_mlp())
    x = torch.randn(8, 12, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    loss_fn = fnn.CrossEntropyLoss()

    def step(x):
        return loss_fn(model(x), target)

    eager = step(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(g_got, g_eager)


def test_import_without_compiled_library_says_how_to_build():
    code = ("import sys; sys.modules['fastops._C'] = None\n"
            "try:\n    import fastops\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "pip install --no-build-isolation" in out


def test_version():
    assert fastops.__version__
