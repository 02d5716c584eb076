"""The autograd.Function of every fastops op and of its backward op (with jvp and vmap rules:
what torch.func transforms, forward-mode AD and second order run), and the fake kernels that
let torch.compile and torch.library.opcheck trace them, one module per family."""

from fastops.ops.activations import *  # noqa: F401,F403
from fastops.ops.fused_mlp import *  # noqa: F401,F403
from fastops.ops.linear import *  # noqa: F401,F403
from fastops.ops.linear_cross_entropy import *  # noqa: F401,F403
from fastops.ops.losses import *  # noqa: F401,F403
from fastops.ops.margin_losses import *  # noqa: F401,F403
