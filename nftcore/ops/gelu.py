"""`gelu_tanh`: the tanh-approximated GELU of the MMDiT MLPs (diffusers' "gelu-approximate"), as one traceable op.

    y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))

Why an op of its own: in a small model's training step the activation and its backward are a tenth of the time on
the CPU, and ATen's vectorised tanh costs about 2.5x what a branch-free fp32 sigmoid loop does. Backends:

- native C++ (`csrc/gelu.cpp`) for CPU tensors when `nftcore._C` is built (the default on CPU): y = x·σ(2u) with
  common.h's exp, one pass forward and one backward (recomputing σ from x), fp32 math, one rounding;
- the reference everywhere else, CUDA included (aten's own element-wise GELU kernels are one pass already):
  `F.gelu(x, approximate="tanh")` and `aten.gelu_backward`; it also takes fp64 and empty inputs.

The custom ops (forward and backward, with fake implementations and the autograd formula dx = gelu'(x)·grad) are what
torch.compile and FSDP2 see; eager calls take `nftcore/ops/eager.py`'s carriers.

`gelu_tanh_` is the in-place variant for no-grad code (the MLPs of a rollout): x is overwritten by the same bits
`gelu_tanh(x)` returns (native: the same per-element code, `csrc/gelu.cpp`'s gelu_tanh_forward_; reference:
`aten.gelu_(x, approximate="tanh")`, which is F.gelu's kernel), so the [B, N, 4C] pre-activation and activation never
coexist. It has no autograd formula and refuses an x that requires grad while grad mode is on; like aten's in-place
ops it bumps x's version counter, so a graph that saved x notices.

The op pattern: docs/DESIGN.md §5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks
from .dispatch import Backend, dispatch, native_impl
from .eager import BackwardOp, ForwardOp, eager

OP = "gelu_tanh"
OP_INPLACE = "gelu_tanh_"


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _backward_ref(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


def gelu_tanh_inplace_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x, approximate="tanh")  # F.gelu's kernel writing into x: the same bits


# Named after their ops (`nftcore.info` pairs tables and ops by name; `GELU_TANH__*` is `gelu_tanh_`'s).
GELU_TANH_FORWARD_IMPLS = {Backend.REFERENCE: lambda: gelu_tanh_reference,
                           Backend.NATIVE: native_impl("gelu_tanh_forward", OP, gelu_tanh_reference, 0)}
GELU_TANH_BACKWARD_IMPLS = {Backend.REFERENCE: lambda: _backward_ref,
                            Backend.NATIVE: native_impl("gelu_tanh_backward", OP + "_backward", _backward_ref, 1)}
GELU_TANH__FORWARD_IMPLS = {Backend.REFERENCE: lambda: gelu_tanh_inplace_reference,
                            Backend.NATIVE: native_impl("gelu_tanh_forward_", OP_INPLACE, gelu_tanh_inplace_reference,
                                                        0)}


def _forward(x):
    return dispatch(OP, x.device, GELU_TANH_FORWARD_IMPLS)(x)


def _forward_inplace(x):
    dispatch(OP_INPLACE, x.device, GELU_TANH__FORWARD_IMPLS)(x)
    # The native kernel writes through the data pointer, which autograd does not see (aten.gelu_ bumps it itself; a
    # second bump is harmless): a graph that saved x must fail loudly in backward rather than read the activation.
    torch.autograd.graph.increment_version(x)


def _backward_body(grad, x):
    return dispatch(OP + "_backward", x.device, GELU_TANH_BACKWARD_IMPLS)(grad, x)


@torch.library.custom_op("nftcore::gelu_tanh", mutates_args=())
def _gelu_op(x: torch.Tensor) -> torch.Tensor:
    return _forward(x)


@_gelu_op.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nftcore::gelu_tanh_backward", mutates_args=())
def _gelu_backward_op(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _backward_body(grad, x)


@_gelu_backward_op.register_fake
def _(grad, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if grad is None:
        return None
    if torch.is_grad_enabled():  # create_graph (double backward): aten's gelu_backward, which has a derivative
        return _backward_ref(grad, x)
    grad = grad.contiguous()  # `.sum().backward()` hands in a stride-0 gradient
    return _GELU_BACKWARD(grad, x, tensors=(grad, x))


# Returns nothing: a custom op may not return (an alias of) an input it mutates; `gelu_tanh_` returns x itself.
@torch.library.custom_op("nftcore::gelu_tanh_", mutates_args=("x",))
def _gelu_inplace_op(x: torch.Tensor) -> None:
    _forward_inplace(x)


@_gelu_inplace_op.register_fake
def _(x):
    return None


_gelu_op.register_autograd(_backward, setup_context=_setup_context)
_GELU = ForwardOp("GeluTanhFunction", _gelu_op, _forward, _setup_context, _backward)
_GELU_BACKWARD = BackwardOp(_gelu_backward_op, _backward_body)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (`F.gelu(x, approximate="tanh")`), element-wise.

    Args:
        x: any shape, float16/bfloat16/float32 (float64 for tests), any strides.

    Returns:
        x's shape and dtype, contiguous. Math in fp32 on the native path; the gradient recomputes from x.
    """
    checks.check_tensor(OP, "x", x)
    checks.check_float(OP, "x", x)
    return _GELU(x, tensors=(x,))


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """In-place `gelu_tanh` for no-grad code: x is overwritten with `gelu_tanh(x)`, bit for bit, and returned.

    Args:
        x: any shape, float16/bfloat16/float32 (float64 for tests). Dense layouts (contiguous or permuted) are
            rewritten where they lie; a strided view with gaps costs one temporary on the native path; a tensor with
            overlapping elements (e.g. from `expand`) is refused, as by aten's in-place ops.

    Returns:
        x. Raises RuntimeError if grad mode is on and x requires grad (there is no backward through an activation
        that overwrote its input: call `gelu_tanh` there).
    """
    checks.check_tensor(OP_INPLACE, "x", x)
    checks.check_float(OP_INPLACE, "x", x)
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            f"{OP_INPLACE}: `x` requires grad and grad mode is on; the in-place GELU overwrites its input and has no "
            "backward. Use it under torch.no_grad()/inference_mode(), or call nftcore.ops.gelu_tanh (out of place)."
        )
    if eager(x):
        _forward_inplace(x)  # the body directly: the custom op's Python dispatch costs more than a small kernel
    else:
        _gelu_inplace_op(x)
    return x
