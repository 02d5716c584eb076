"""fastops: hand-written CPU and CUDA kernels for linear layers, activations and losses, each a
drop-in for its torch.nn / torch.nn.functional twin."""

import torch

try:
    from fastops import _C  # noqa: F401  (loading it registers the torch.ops.fastops ops)
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "fastops: the compiled library fastops._C could not be loaded "
        f"({e}). Build it against the installed torch with\n"
        "    pip install --no-build-isolation .\n"
        "(or `python setup.py build_ext --inplace` in a source checkout). Rebuild after "
        "upgrading torch."
    ) from e

from fastops import ops  # noqa: E402,F401  (autograd formulas and fake kernels)
from fastops import functional, nn  # noqa: E402,F401

__version__ = "0.1.0"


def cpu_isa() -> str:
    """The CPU instruction set the fastops kernels run with: avx512, avx2 or baseline."""
    return torch.ops.fastops.cpu_isa()


def cuda_available() -> bool:
    """Whether this build has CUDA kernels (and a GPU can run them)."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastops::relu", "CUDA")
