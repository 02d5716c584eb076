"""Where the Python autograd formulas of fastops.ops meet the dispatcher.

The forward ops carry C++ autograd nodes (csrc/autograd.cpp): the fast path of ordinary
training. What those nodes cannot do goes to the op's Python autograd.Function, whose
setup_context, backward, jvp and vmap staticmethods functorch knows how to run:

- torch.func transforms (grad, vjp, jacrev, jacfwd, hessian, vmap): the Function is registered as
  the op's kernel for FuncTorchDynamicLayerFrontMode, the key every op meets first while a
  transform is active. Outside transforms that key is never reached, so the fast path pays
  nothing for it.
- forward-mode AD with dual tensors (torch.autograd.forward_ad): the C++ kernels send such calls
  to the same key.

The backward ops record their own derivatives only when a graph is wanted (a backward with
create_graph=True): the most used ones by C++ nodes (csrc/autograd_second_order.cpp), the others
by their Python Function, registered here for their Autograd key. The ops' C++ nodes call them
below autograd in an ordinary backward, so first-order training never passes through Python.
"""

import torch
import torch.autograd.forward_ad as fwAD

_LIB = torch.library.Library("fastops", "IMPL")
_TRANSFORMS_KEY = "FuncTorchDynamicLayerFrontMode"


def _has_tangent(t):
    return fwAD._current_level >= 0 and fwAD.unpack_dual(t).tangent is not None


def _wants_graph(args):
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return ((torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            or any(_has_tangent(t) for t in tensors))


def transforms_use(op_name, impl):
    """Under torch.func transforms, and for dual tensors, fastops::op_name runs impl
    (an autograd.Function's apply, or a composite of differentiable ops)."""
    _LIB.impl(op_name, impl, _TRANSFORMS_KEY)


def differentiable(op_name, impl):
    """fastops::op_name, a backward op, records its derivative through impl when a graph is
    wanted (and under transforms); otherwise it runs its kernel directly. Where the library has
    a C++ autograd kernel for it (the hot ones, csrc/autograd_second_order.cpp), impl serves the
    transforms only."""
    transforms_use(op_name, impl)
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastops::{op_name}", "Autograd"):
        return
    op = getattr(torch.ops.fastops, op_name).default
    below = torch._C._after_autograd_keyset

    def autograd_kernel(keyset, *args):
        if _wants_graph(args):
            return impl(*args)
        return op.redispatch(keyset & below, *args)

    _LIB.impl(op_name, autograd_kernel, "Autograd", with_keyset=True)


def third_order_error(op_name):
    return RuntimeError(
        f"fastops.{op_name}: this is already the second derivative of a fastops activation; a "
        "third derivative is not supported")


# ---- vmap helpers: physical tensors with the batch dim first ----------------------------------

def batch_first(x, bdim, size):
    """x with its batch dim moved to 0; an unbatched x expanded to the batch (no copy)."""
    if bdim is None:
        return x.expand(size, *x.shape)
    return x.movedim(bdim, 0)


def vmap_elementwise(fn, info, in_dims, *args):
    """vmap rule of an op whose tensor arguments all have one shape and whose output has it
    too: every tensor batch-first, one call."""
    moved = [batch_first(a, d, info.batch_size) if isinstance(a, torch.Tensor) else a
             for a, d in zip(args, in_dims)]
    return fn(*moved), 0


def vmap_loop(fn, info, in_dims, *args):
    """vmap rule by a loop over the batch, for internal ops that are never batched in practice
    (the bit-mask backward, whose packed bits do not line up across samples)."""
    outs = []
    for i in range(info.batch_size):
        outs.append(fn(*[a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), tuple(0 for _ in outs[0])
    return torch.stack(outs), 0
