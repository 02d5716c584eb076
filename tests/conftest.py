"""Shared test settings: the devices and dtypes every op is held against PyTorch on."""

import os

import pytest
import torch

import fastops


def _devices():
    devices = ["cpu"]
    if fastops.cuda_available():
        devices.append("cuda")
    return devices


DEVICES = _devices()

# Where fresh interpreters of the tests start: not the repository root, whose fastops/ source
# tree (without the compiled library when fastops is installed) would shadow the installed
# package.
SUBPROCESS_CWD = os.path.dirname(os.path.abspath(__file__))
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (atol, rtol) when comparing a fastops result with torch's in the same dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1.3e-6 * 10),
    torch.float64: (1e-10, 1e-7),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def tol(dtype):
    atol, rtol = TOLERANCES[dtype]
    return dict(atol=atol, rtol=rtol)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param
