"""Normalisations of the MMDiT blocks, and selective recomputation of cheap activations.

Why this file exists: in an MMDiT trained without checkpointing, most activation memory is not what the GEMMs need
but what autograd keeps for cheap element-wise ops - the LayerNorm output kept for the modulation's scale gradient,
the modulated input kept by each projection, the GELU output kept by the second MLP layer, the normalised q/k kept
by a composite RMSNorm. Each of these can be rebuilt in backward from tensors that are saved anyway, in one or two
element-wise passes (Liger's fused MLPs and FlashAttention's softmax make the same trade). Nothing here recomputes a
GEMM or the attention.

- `recompute_in_backward(t, fn)`: while active, any op that saves `t` (or a view of it) for backward stores `fn`
  instead, and `fn()` rebuilds it when backward needs it. Consumers stay ordinary modules, so a LoRA-wrapped Linear
  gets the same saving. Skipped under `torch.compile`, whose partitioner makes its own recompute choices.
- `rms_norm`: RMSNorm as one autograd node that saves its input and the per-row 1/rms only (the composite
  `F.rms_norm` on CPU also saves x / rms).
- `modulated_layer_norm`: AdaLN's `LayerNorm(x) * (1 + scale) + shift` whose LayerNorm output is rebuilt in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _Rebuild:
    """A saved tensor replaced by a recipe: `fn()` gives the tensor it was a view of; built at most once."""

    __slots__ = ("fn", "value")

    def __init__(self, fn):
        self.fn, self.value = fn, None

    def view(self, size, stride, offset) -> torch.Tensor:
        # Runs in backward, where grad mode is off unless create_graph=True - then the rebuilt tensor gets the
        # history a double backward needs.
        if self.value is None:
            self.value = self.fn()
        return self.value.as_strided(size, stride, offset)


class recompute_in_backward:  # noqa: N801 - used like a function-style context manager
    """Within `with recompute_in_backward(tensor, fn):`, ops that save `tensor` (or any view of its storage) for
    backward keep `fn` instead, and `fn()` rebuilds it when backward first needs it (once, shared by every op that
    saved it). The object can be entered several times (one tensor feeding several layers shares one rebuild).

    `fn()` must return a tensor laid out exactly like the one that produced `tensor` (same op, same inputs), and its
    closure must not capture `tensor` itself (that would keep it alive and save nothing). `fn` may be None (or is
    dropped) when grad is off: then the block is a no-op.
    """

    def __init__(self, tensor: torch.Tensor, fn):
        # The hooks outlive the block (autograd keeps them with each saved variable), so they must not reference
        # `tensor` itself: only its storage address and dtype. Without grad nothing is saved, so `fn` (and whatever
        # its closure holds) is not kept either.
        # Only a tensor that owns its whole storage can be rebuilt from `fn()`'s fresh output (views into something
        # larger are left alone and kept as usual).
        active = fn is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
            tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
        self._recipe = _Rebuild(fn) if active else None
        self._storage, self._dtype = (tensor.untyped_storage().data_ptr(), tensor.dtype) if active else (None, None)
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        try:
            if t.untyped_storage().data_ptr() == self._storage and t.dtype == self._dtype:
                return self._recipe, t.size(), t.stride(), t.storage_offset()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage (e.g. DTensor, functional)
            pass
        return t

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, tuple):
            recipe, size, stride, offset = packed
            return recipe.view(size, stride, offset)
        return packed

    def __enter__(self):
        if self._recipe is not None and torch.is_grad_enabled():
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.__exit__(*exc)
        return False


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift, no LayerNorm weights. x [B, N, C]; shift, scale [B, C].

    The multiply-add is one `addcmul`; its saved LayerNorm output is rebuilt from x (which LayerNorm keeps anyway)."""
    normed = F.layer_norm(x, x.shape[-1:], eps=eps)
    with recompute_in_backward(normed, lambda: F.layer_norm(x, x.shape[-1:], eps=eps)):
        return torch.addcmul(shift[:, None], normed, 1 + scale[:, None])


class _RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dim, math in fp32 (as diffusers), y in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xc = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 math for half types, fp64 stays fp64
        rstd = torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return (xc * rstd * weight).to(x.dtype)

    @staticmethod
    @once_differentiable  # rstd is saved as a constant: a double backward through this would be wrong, so it raises
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        g = grad.to(rstd.dtype)
        gw = g * weight  # dL/dxhat
        grad_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        grad_w = (g * xhat).sum(tuple(range(grad.dim() - 1))) if ctx.needs_input_grad[1] else None
        return (
            grad_x.to(x.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,  # eps: a Python float
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with weight [D]: the per-head QK norm of q or k [B, N, H, D], and Qwen-Image's text
    input norm [B, Nt, 3584]."""
    return _RMSNorm.apply(x, weight, eps)
