"""torch's own test tables for the torch twins of fastops's ops: the OpInfo sample inputs of
torch.testing._internal.common_methods_invocations.op_db, in four dtypes, values and input
gradients, and its error inputs where torch has them.

Each sample is held against torch in float64 from the same (rounded) inputs, within the dtype's
tolerance or within twice torch's own error in that dtype (16-bit types)."""

import warnings

import pytest
import torch
from conftest import DTYPES, tol
from torch.testing._internal.common_methods_invocations import op_db

import fastops.functional as F

# (OpInfo name, variant) -> the fastops twin, called with the sample's arguments
TWINS = {
    ("softmax", ""): F.softmax,
    ("softmax", "with_dtype"): F.softmax,
    ("log_softmax", ""): F.log_softmax,
    ("log_softmax", "with_dtype"): F.log_softmax,
    ("nn.functional.cross_entropy", ""): F.cross_entropy,
    ("nn.functional.nll_loss", ""): F.nll_loss,
    ("nn.functional.mse_loss", ""): F.mse_loss,
    ("nn.functional.l1_loss", ""): F.l1_loss,
    ("nn.functional.binary_cross_entropy", ""): F.binary_cross_entropy,
    ("nn.functional.binary_cross_entropy_with_logits", ""): F.binary_cross_entropy_with_logits,
    ("nn.functional.hinge_embedding_loss", ""): F.hinge_embedding_loss,
    ("nn.functional.multi_margin_loss", ""): F.multi_margin_loss,
    ("nn.functional.linear_cross_entropy", ""): F.linear_cross_entropy,
    ("nn.functional.linear_cross_entropy", "chunked"): F.linear_cross_entropy,
    ("nn.functional.linear_cross_entropy", "chunked_none"): F.linear_cross_entropy,
}
# (nn.functional.rrelu's samples train, with random slopes: tests/test_rrelu.py holds them to
# the slopes drawn.)
OPINFOS = {(op.name, op.variant_test_name): op for op in op_db
           if (op.name, op.variant_test_name) in TWINS}
IDS = [f"{n}.{v}" if v else n for n, v in TWINS]


def _double(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().double().requires_grad_(v.requires_grad)
    if isinstance(v, (list, tuple)):
        return type(v)(_double(a) for a in v)
    if isinstance(v, dict):
        return {k: _double(a) for k, a in v.items()}
    return v


def _grad_or_none(out, x, g):
    if not (x.requires_grad and out.requires_grad):
        return None
    return torch.autograd.grad(out, x, g, allow_unused=True)[0]


def _torch_in_dtype(op, x, s):
    """torch's own result in the sample's dtype, or None where torch has no kernel for it."""
    try:
        return op(x, *s.args, **s.kwargs)
    except NotImplementedError:
        return None


def _allowed_atol(dtype, ref, theirs):
    """tol(dtype)'s atol, or twice torch's own error in dtype where that is larger (16-bit)."""
    atol = tol(dtype)["atol"]
    if dtype in (torch.float16, torch.bfloat16) and theirs is not None:
        finite = torch.isfinite(ref) & torch.isfinite(theirs.double())
        if finite.any():
            atol = max(atol, 2 * (theirs.double() - ref)[finite].abs().max().item())
    return atol


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", list(TWINS), ids=IDS)
def test_opinfo_samples(key, dtype, device):
    op, fo = OPINFOS[key], TWINS[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the implicit softmax dim
        samples = list(op.sample_inputs(device, dtype, requires_grad=True))
        assert samples
        for s in samples:
            x = s.input
            out = fo(x, *s.args, **s.kwargs)
            xr = _double(x)
            # (linear_cross_entropy's chunking options name 16-bit accumulation dtypes that the
            # float64 reference cannot take; options=None is the same math)
            ref_kwargs = {k: v for k, v in s.kwargs.items() if k != "options"}
            ref = op(xr, *_double(s.args), **_double(ref_kwargs))
            theirs = _torch_in_dtype(op, x, s)
            if theirs is not None:
                assert out.dtype == theirs.dtype and out.shape == theirs.shape
            else:  # torch lacks the dtype here (multi_margin_loss in 16-bit on the CPU)
                assert out.dtype == dtype and out.shape == ref.shape
            exact_dtype = out.dtype  # the with_dtype variants compute in their dtype
            atol = _allowed_atol(exact_dtype, ref.detach(),
                                 None if theirs is None else theirs.detach())
            torch.testing.assert_close(out.double(), ref.detach().double(), equal_nan=True,
                                       atol=atol, rtol=tol(exact_dtype)["rtol"])
            g = torch.randn(out.shape, dtype=torch.float64, device=device)
            got = _grad_or_none(out, x, g.to(out.dtype))
            if got is None:
                continue
            want = _grad_or_none(ref, xr, g.to(ref.dtype))
            mine = None if theirs is None else _grad_or_none(theirs, x, g.to(theirs.dtype))
            gatol = _allowed_atol(dtype, want.double(), mine)
            torch.testing.assert_close(got.double(), want.double(), equal_nan=True, atol=gatol,
                                       rtol=tol(dtype)["rtol"])


@pytest.mark.parametrize("key", [k for k in TWINS if OPINFOS[k].error_inputs_func is not None],
                         ids=str)
def test_opinfo_error_inputs(key, device):
    op, fo = OPINFOS[key], TWINS[key]
    for e in op.error_inputs(device):
        s = e.sample_input
        with pytest.raises(e.error_type):
            fo(s.input, *s.args, **s.kwargs)
