"""Shared by the op families: one autograd formula serves both the public autograd.Function and
the registered op."""

import torch


def register_autograd(op_name, function):
    """Make the op differentiable with the formula of its autograd.Function (whose forward calls
    the op), so torch.ops.fastops.* are differentiable by themselves too."""
    torch.library.register_autograd(op_name, function.backward,
                                    setup_context=function.setup_context)
    return function
