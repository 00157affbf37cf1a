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
- `rms_norm` and `modulated_layer_norm`: the blocks' RMSNorm and AdaLN, now the fused ops `nftcore.ops.rms_norm` and
  `nftcore.ops.adaln` (each one autograd node that saves its input and per-row statistics only, never the normalised
  tensor); kept here under their old names for callers of this module.

The fused ops: docs/DESIGN.md §5.
"""

from __future__ import annotations

import torch

from nftcore import ops


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
    """LayerNorm(x) * (1 + scale) + shift, no LayerNorm weights. x [B, N, C]; shift, scale [B, C]. See
    `nftcore.ops.adaln` (note its argument order: scale before shift)."""
    return ops.adaln(x, scale, shift, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with weight [D], math in fp32 (as diffusers), result in x's dtype: Qwen-Image's text
    input norm [B, Nt, 3584] (the blocks' QK norms call `nftcore.ops.rms_norm` with their RoPE tables)."""
    return ops.rms_norm(x, weight, eps)
