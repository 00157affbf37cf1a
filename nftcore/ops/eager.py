"""Eager carriers for the fused ops: the same kernels and the same autograd formulas, without the custom op's
Python dispatch.

Every fused op is a `torch.library.custom_op` with a fake implementation and a registered autograd formula: that is
what torch.compile, FSDP2 and shape inference see. In plain eager mode the custom op's own Python machinery costs
tens of microseconds per call, and about 0.2 ms per forward + backward, which at a small model's shapes is as much as
the kernels. So each op's public function calls it through a `ForwardOp` (and its formula calls the backward op
through a `BackwardOp`), which picks the carrier per call:

- traced (torch.compile) or non-plain inputs (FakeTensors, other subclasses): the custom op itself;
- eager without grad: the op's body, i.e. the backend implementation, no autograd;
- eager with grad: a `torch.autograd.Function` whose forward is the op's body and whose setup and backward are the
  very functions registered with the custom op. One formula, two carriers; tests check they agree bit for bit.

See docs/DESIGN.md §5 (point 5).
"""

from __future__ import annotations

from typing import Callable, Sequence

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


class ForwardOp:
    """A differentiable fused op: `op(*args, tensors=...)` runs `body(*args)` through the carrier the call needs
    (module docstring). `tensors`: the tensor arguments, checked for plainness."""

    def __init__(self, name: str, custom_op: Callable, body: Callable, setup_context: Callable, backward: Callable):
        self.custom_op, self.body = custom_op, body

        def run_forward(ctx, *inputs):
            output = body(*inputs)
            setup_context(ctx, inputs, output)
            return output

        def run_backward(ctx, *grads):
            return backward(ctx, *grads)

        self.function = type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward),
                                                                "backward": staticmethod(run_backward)})

    def __call__(self, *args, tensors: Sequence[torch.Tensor | None]):
        if not eager(*tensors):
            return self.custom_op(*args)
        if not torch.is_grad_enabled():
            return self.body(*args)
        return self.function.apply(*args)


class BackwardOp:
    """A fused op's backward (no autograd of its own): `body(*args)` directly when eager without grad (a plain
    backward pass), the custom op otherwise (traced, or a double backward that records the graph)."""

    def __init__(self, custom_op: Callable, body: Callable):
        self.custom_op, self.body = custom_op, body

    def __call__(self, *args, tensors: Sequence[torch.Tensor | None]):
        return self.body(*args) if call_directly(*tensors) else self.custom_op(*args)
