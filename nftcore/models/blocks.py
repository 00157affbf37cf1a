"""The two MMDiT block types, shared by both families.

`DoubleStreamBlock` is FLUX's `FluxTransformerBlock` and Qwen-Image's `QwenImageTransformerBlock` (the math is the
same: per-stream AdaLN-Zero modulation, per-stream QKV with RMS QK-norm, one joint attention over [text ; image],
per-stream output projection and GELU-tanh MLP, gated residuals). `SingleStreamBlock` is FLUX's parallel
attention + MLP block over the already-joined sequence.

Performance choices, each numerically neutral:
- one fused QKV projection per stream: q, k, v come from one GEMM whose weight is diffusers' to_q/to_k/to_v
  concatenated at load time;
- RoPE is applied inside `nftcore.ops.attention` from per-forward (cos, sin) tables; q/k/v stay [B, N, H, D];
- modulation is one fused multiply-add (`torch.addcmul`) on the normalised stream, and gated residuals are one
  `addcmul` too;
- activation memory: the inputs of the projections that only element-wise work produced (modulated norms, the
  GELU output, the per-stream slices of the attention output, the single block's `[attn ; mlp]`) are rebuilt in
  backward instead of kept (`layers.recompute_in_backward`); GEMMs and attention are never recomputed. Every
  projection is still called as its module, so wrappers such as LoRA see ordinary calls;
- without grad (rollouts) intermediate buffers are released as soon as they are consumed (the `del`s), which sets
  the peak of a sampling step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nftcore import ops

from .layers import modulated_layer_norm, recompute_in_backward, rms_norm

Rope = tuple[torch.Tensor, torch.Tensor]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """GELU-tanh MLP (diffusers' FeedForward(activation_fn="gelu-approximate"), dropout-free). The GELU output, kept
    by fc2 for its weight gradient, is recomputed from fc1's output (kept by the GELU anyway)."""

    def __init__(self, dim: int, hidden: int, **factory):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.fc2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.fc1(x)  # [B, N, M]
        act = _gelu(pre)
        rebuild = recompute_in_backward(act, lambda pre=pre: _gelu(pre))
        del pre  # without grad nothing else holds it: freed before fc2 runs
        with rebuild:
            return self.fc2(act)


def _gated(residual: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """residual + gate[:, None] * update in one pass. residual, update [B, N, C]; gate [B, C]."""
    return torch.addcmul(residual, gate[:, None], update)


def modulated(layer: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """layer(LayerNorm(x) * (1 + scale) + shift), the modulated input rebuilt in backward rather than kept."""
    h = modulated_layer_norm(x, shift, scale, eps)
    with recompute_in_backward(h, lambda: modulated_layer_norm(x, shift, scale, eps)):
        return layer(h)


def _project(layer: nn.Module, part: torch.Tensor, rebuild) -> torch.Tensor:
    """layer(part) for a strided slice `part` [B, n, C] of the joint attention output: the slice is copied to be
    contiguous (a Linear would copy it anyway), and that copy is rebuilt by `rebuild()` in backward, not kept."""
    if part.is_contiguous():  # batch 1: a plain view, nothing extra to keep
        return layer(part)
    part = part.contiguous()
    with recompute_in_backward(part, rebuild):
        return layer(part)


class DoubleStreamBlock(nn.Module):
    """Dual-stream MMDiT block: text and image keep separate weights and meet only in the joint attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, **factory):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.img_mod = nn.Linear(dim, 6 * dim, **factory)  # shift, scale, gate (attention) + shift, scale, gate (MLP)
        self.txt_mod = nn.Linear(dim, 6 * dim, **factory)
        self.img_qkv = nn.Linear(dim, 3 * dim, **factory)
        self.txt_qkv = nn.Linear(dim, 3 * dim, **factory)
        self.img_q_norm = nn.Parameter(torch.ones(head_dim, **factory))
        self.img_k_norm = nn.Parameter(torch.ones(head_dim, **factory))
        self.txt_q_norm = nn.Parameter(torch.ones(head_dim, **factory))
        self.txt_k_norm = nn.Parameter(torch.ones(head_dim, **factory))
        self.img_out = nn.Linear(dim, dim, **factory)
        self.txt_out = nn.Linear(dim, dim, **factory)
        self.img_mlp = MLP(dim, mlp_hidden, **factory)
        self.txt_mlp = MLP(dim, mlp_hidden, **factory)
        self.checkpointing = False  # recompute this block in backward (set by MMDiT.set_activation_checkpointing)

    def _qkv(self, x, mod, proj, q_w, k_w):
        """Modulated norm -> fused QKV -> q, k RMS-normed. x [B, N, C] -> three [B, N, H, D]."""
        qkv = modulated(proj, x, mod[0], mod[1], self.eps)  # [B, N, 3C]
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        return rms_norm(q, q_w, self.eps), rms_norm(k, k_w, self.eps), v

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: Rope | None,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, Ni, C], txt [B, Nt, C], vec = SiLU(temb) [B, C], rope tables over [text ; image], mask [B, Nt+Ni]
        (True = attend) or None -> (img, txt) updated."""
        img_mod = self.img_mod(vec).chunk(6, dim=-1)  # 6 x [B, C]
        txt_mod = self.txt_mod(vec).chunk(6, dim=-1)
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(  # joint [text ; image], each [B, Nt+Ni, H, D]
            self._qkv(txt, txt_mod, self.txt_qkv, self.txt_q_norm, self.txt_k_norm),
            self._qkv(img, img_mod, self.img_qkv, self.img_q_norm, self.img_k_norm)))
        attn = ops.attention(q, k, v, key_padding_mask=mask, rope=rope).flatten(2)  # [B, Nt+Ni, C]
        del q, k, v
        sizes = [txt.shape[1], img.shape[1]]
        txt_attn, img_attn = attn.split(sizes, dim=1)  # one split node: its backward is one cat, no zero-filling
        img = _gated(img, img_mod[2], _project(self.img_out, img_attn, lambda: attn.split(sizes, 1)[1].contiguous()))
        txt = _gated(txt, txt_mod[2], _project(self.txt_out, txt_attn, lambda: attn.split(sizes, 1)[0].contiguous()))
        img = _gated(img, img_mod[5], modulated(self.img_mlp, img, img_mod[3], img_mod[4], self.eps))
        txt = _gated(txt, txt_mod[5], modulated(self.txt_mlp, txt, txt_mod[3], txt_mod[4], self.eps))
        return img, txt


class SingleStreamBlock(nn.Module):
    """FLUX single-stream block: attention and MLP in parallel from one modulated input, one output projection."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, **factory):
        super().__init__()
        self.heads, self.head_dim, self.eps = heads, head_dim, eps
        self.mod = nn.Linear(dim, 3 * dim, **factory)  # shift, scale, gate
        self.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.mlp_in = nn.Linear(dim, mlp_hidden, **factory)
        self.q_norm = nn.Parameter(torch.ones(head_dim, **factory))
        self.k_norm = nn.Parameter(torch.ones(head_dim, **factory))
        self.out = nn.Linear(dim + mlp_hidden, dim, **factory)  # input [attn ; GELU(mlp)]
        self.checkpointing = False

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: Rope | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, N, C] (text then image), vec [B, C] -> x updated.

        The MLP input is projected after the attention, not fused into the QKV GEMM: the q/k/v buffer is then free
        before the [B, N, M] MLP activations exist, which lowers the no-grad (rollout) peak; with grad the same
        tensors are kept either way."""
        shift, scale, gate = self.mod(vec).chunk(3, dim=-1)
        h = modulated_layer_norm(x, shift, scale, self.eps)
        rebuild_h = recompute_in_backward(h, lambda: modulated_layer_norm(x, shift, scale, self.eps))
        with rebuild_h:
            q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        attn = ops.attention(rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps), v,
                             key_padding_mask=mask, rope=rope).flatten(2)  # [B, N, C]
        del q, k, v
        with rebuild_h:
            pre = self.mlp_in(h)  # [B, N, M]
        del h
        act = _gelu(pre)
        grad = torch.is_grad_enabled()
        rebuild = (lambda attn=attn, pre=pre: torch.cat([attn, _gelu(pre)], dim=-1)) if grad else None
        del pre  # without grad nothing else holds it: freed before the concatenation
        both = torch.cat([attn, act], dim=-1)  # [B, N, C + M]
        del act
        with recompute_in_backward(both, rebuild):
            update = self.out(both)
        return _gated(x, gate, update)
