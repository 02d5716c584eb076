"""The autograd.Function of every fastops op and the fake kernels that let torch.compile and
torch.library.opcheck trace them, one module per family."""

from fastops.ops.activations import *  # noqa: F401,F403
from fastops.ops.linear import *  # noqa: F401,F403
from fastops.ops.losses import *  # noqa: F401,F403
