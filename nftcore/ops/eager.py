"""Eager carriers for the fused ops: the same kernels and the same autograd formulas, without the custom op's
Python dispatch.

Every fused op is a `torch.library.custom_op` with a fake implementation and a registered autograd formula: that is
what torch.compile, FSDP2 and shape inference see. In plain eager mode the custom op's own Python machinery costs
tens of microseconds per call, and about 0.2 ms per forward + backward, which at a small model's shapes is as much as
the kernels. So the public functions take a shortcut when nothing needs the op itself:

- `call_directly(...)`: grad off, nothing compiling, plain tensors: call the backend implementation, no autograd;
- `eager_autograd(forward, setup_context, backward)`: grad on, nothing compiling, plain tensors: a
  `torch.autograd.Function` whose forward is the custom op's body and whose setup and backward are the very
  functions registered with the custom op. One formula, two carriers.
"""

from __future__ import annotations

from typing import Callable

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors: torch.Tensor | None) -> bool:
    """Nothing traces (torch.compile) and the inputs are plain tensors or Parameters, not FakeTensors or other
    subclasses that need the op's fake implementation."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def call_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an op may call its backend directly: grad is off (no autograd node to record) and `eager(...)`."""
    return not torch.is_grad_enabled() and eager(*tensors)


def eager_autograd(name: str, forward: Callable, setup_context: Callable,
                   backward: Callable) -> type[torch.autograd.Function]:
    """A `torch.autograd.Function` running `forward(*inputs)` (the custom op's body) with the custom op's registered
    `setup_context(ctx, inputs, output)` and `backward(ctx, *grads)`."""

    def run_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def run_backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward),
                                                   "backward": staticmethod(run_backward)})
