"""The two MMDiT block types, shared by both families.

`DoubleStreamBlock` is FLUX's `FluxTransformerBlock` and Qwen-Image's `QwenImageTransformerBlock` (the math is the
same: per-stream AdaLN-Zero modulation, per-stream QKV with RMS QK-norm, one joint attention over [text ; image],
per-stream output projection and GELU-tanh MLP, gated residuals). `SingleStreamBlock` is FLUX's parallel
attention + MLP block over the already-joined sequence.

Performance choices, each numerically neutral (fp32 parity with diffusers is tested, forward and gradients):
- one fused QKV projection per stream: q, k, v come from one GEMM whose weight is diffusers' to_q/to_k/to_v
  concatenated at load time;
- the element-wise glue is nftcore's fused block ops (`nftcore.ops`, each one pass forward and one backward on
  CUDA, aten's fused LayerNorm kernels on the CPU reference path): `adaln` for every modulated LayerNorm,
  `gated_adaln` for "attention gate + residual, then the MLP's modulated norm" of the double block, and
  `gated_residual` to close each block;
- the QK RMSNorm applies RoPE too (`ops.rms_norm(..., rope=)`, each stream with its rows of the joint table), so
  the attention op receives rotated q/k [B, N, H, D] and rotates nothing itself;
- the single block's output projection reads [attn ; GELU(mlp)] as two column blocks of its weight
  (`lora.split_input_linear`, LoRA-aware) instead of a concatenated copy;
- activation memory: the inputs of the projections that only element-wise work produced (modulated norms, the
  GELU output, the per-stream slices of the attention output) are rebuilt in backward instead of kept
  (`layers.recompute_in_backward`); GEMMs and attention are never recomputed. `gated_adaln` keeps the block input
  and recomputes the residual h in its backward, so h is freed once the MLP has consumed it, and `gated_residual`
  keeps its update only when its gate is trained. Every projection is still called as its module, so wrappers such
  as LoRA see ordinary calls;
- without grad (rollouts) intermediate buffers are released as soon as they are consumed (the `del`s), which sets
  the peak of a sampling step; in that mode the MLPs' GELU also overwrites its [B, N, M] input
  (`ops.gelu_tanh_`, the same kernel and bits as `ops.gelu_tanh`), and the single block writes the normalised q, k
  back into the QKV buffer that v keeps alive anyway, instead of allocating new buffers of those sizes.

The fused ops and their backends: docs/DESIGN.md §5; the two architectures: docs/ALGORITHM.md §6.
"""

from __future__ import annotations

import torch
from torch import nn

from nftcore import ops

from .layers import recompute_in_backward
from .lora import split_input_linear

Rope = tuple[torch.Tensor, torch.Tensor]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return ops.gelu_tanh(x)  # F.gelu(x, approximate="tanh"), as nftcore's op (native on CPU)


class MLP(nn.Module):
    """GELU-tanh MLP (diffusers' FeedForward(activation_fn="gelu-approximate"), dropout-free). The GELU output, kept
    by fc2 for its weight gradient, is recomputed from fc1's output (kept by the GELU anyway). Without grad the GELU
    overwrites fc1's output in place (`ops.gelu_tanh_`, the same bits)."""

    def __init__(self, dim: int, hidden: int, **factory):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.fc2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.fc1(x)  # [B, N, M]
        # Without grad nothing else reads pre: the GELU overwrites it, so [B, N, M] exists once, not twice.
        act = ops.gelu_tanh_(pre) if not torch.is_grad_enabled() else _gelu(pre)
        rebuild = recompute_in_backward(act, lambda pre=pre: _gelu(pre))
        del pre
        with rebuild:
            return self.fc2(act)


def modulated(layer: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """layer(LayerNorm(x) * (1 + scale) + shift), the modulated input rebuilt in backward rather than kept."""
    h = ops.adaln(x, scale, shift, eps)
    with recompute_in_backward(h, lambda: ops.adaln(x, scale, shift, eps)):
        return layer(h)


def _rope_rows(rope: Rope | None, start: int, stop: int) -> Rope | None:
    """The rows [start, stop) of the joint (cos, sin) tables ([N, D/2] or [B, N, D/2]): one stream's positions."""
    return None if rope is None else (rope[0][..., start:stop, :], rope[1][..., start:stop, :])


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

    def _qkv(self, x, mod, proj, q_w, k_w, rope):
        """Modulated norm -> fused QKV -> q, k RMS-normed and rotated. x [B, N, C] -> three [B, N, H, D]."""
        qkv = modulated(proj, x, mod[0], mod[1], self.eps)  # [B, N, 3C]
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        if torch.is_grad_enabled():
            # The norms save their input for backward; as views they would keep the whole [B, N, 3C] buffer alive
            # although v is only read once, into the joint v. Copies of q and k let that buffer go after the join.
            q, k = q.contiguous(), k.contiguous()
        return ops.rms_norm(q, q_w, self.eps, rope=rope), ops.rms_norm(k, k_w, self.eps, rope=rope), v

    def _tail(self, x, mod, attn_out, mlp):
        """Attention gate + residual, the MLP on the modulated norm of that, MLP gate + residual. x, attn_out
        [B, N, C] (attn_out: the output projection's result) -> the stream's new residual."""
        h, m = ops.gated_adaln(x, mod[2], attn_out, mod[4], mod[3], self.eps)
        rebuild = None
        if torch.is_grad_enabled():  # m rebuilt from x and attn_out, which gated_adaln keeps anyway
            rebuild = lambda y=attn_out: ops.gated_adaln(x, mod[2], y, mod[4], mod[3], self.eps)[1]  # noqa: E731
        del attn_out  # without grad nothing else holds it: freed before the MLP's activations exist
        with recompute_in_backward(m, rebuild):
            update = mlp(m)
        del m
        return ops.gated_residual(h, mod[5], update)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, rope: Rope | None,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, Ni, C], txt [B, Nt, C], vec = SiLU(temb) [B, C], rope tables over [text ; image], mask [B, Nt+Ni]
        (True = attend) or None -> (img, txt) updated."""
        img_mod = self.img_mod(vec).chunk(6, dim=-1)  # 6 x [B, C]
        txt_mod = self.txt_mod(vec).chunk(6, dim=-1)
        n_txt, n_img = txt.shape[1], img.shape[1]
        txt_q, txt_k, txt_v = self._qkv(txt, txt_mod, self.txt_qkv, self.txt_q_norm, self.txt_k_norm,
                                        _rope_rows(rope, 0, n_txt))
        img_q, img_k, img_v = self._qkv(img, img_mod, self.img_qkv, self.img_q_norm, self.img_k_norm,
                                        _rope_rows(rope, n_txt, n_txt + n_img))
        # Joint [text ; image], each [B, Nt+Ni, H, D]. v first, and each stream's parts dropped once joined: without
        # grad the per-stream qkv buffers (which the v views keep) are gone before the joint q and k exist.
        v = torch.cat([txt_v, img_v], dim=1)
        del txt_v, img_v
        q = torch.cat([txt_q, img_q], dim=1)
        del txt_q, img_q
        k = torch.cat([txt_k, img_k], dim=1)
        del txt_k, img_k
        attn = ops.attention(q, k, v, key_padding_mask=mask).flatten(2)  # [B, Nt+Ni, C]; q, k already rotated
        del q, k, v
        sizes = [n_txt, n_img]
        txt_attn, img_attn = attn.split(sizes, dim=1)  # one split node: its backward is one cat, no zero-filling
        # Each stream's projection is consumed by its tail before the next one exists (the no-grad peak).
        img = self._tail(img, img_mod, _project(self.img_out, img_attn, lambda: attn.split(sizes, 1)[1].contiguous()),
                         self.img_mlp)
        txt = self._tail(txt, txt_mod, _project(self.txt_out, txt_attn, lambda: attn.split(sizes, 1)[0].contiguous()),
                         self.txt_mlp)
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
                mask: torch.Tensor | None, keep: tuple[int, int] | None = None) -> torch.Tensor:
        """x [B, N, C] (text then image), vec [B, C] -> x updated.

        `keep = (start, stop)`: only the tokens [start, stop) are wanted from this block (the last one, when the
        MMDiT returns just the edit target): the others still give keys and values, but their query, MLP and output
        projection are skipped, and the block returns [B, stop − start, C], those tokens' values exactly.

        The MLP input is projected after the attention, not fused into the QKV GEMM: the q/k/v buffer is then free
        before the [B, N, M] MLP activations exist, which lowers the no-grad (rollout) peak; with grad the same
        tensors are kept either way."""
        shift, scale, gate = self.mod(vec).chunk(3, dim=-1)
        h = ops.adaln(x, scale, shift, self.eps)
        rebuild_h = recompute_in_backward(h, lambda: ops.adaln(x, scale, shift, self.eps))
        with rebuild_h:
            q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
        q_rope, residual = rope, x  # not `x = ...`: rebuild_h's lambda reads x when backward runs
        if keep is not None:
            q, q_rope, residual = q[:, keep[0]:keep[1]], _rope_rows(rope, *keep), x[:, keep[0]:keep[1]]
        if torch.is_grad_enabled():
            q = ops.rms_norm(q, self.q_norm, self.eps, rope=q_rope)
            k = ops.rms_norm(k, self.k_norm, self.eps, rope=rope)
        else:  # normalised q, k written back into their slots of the qkv buffer (which v keeps): no new [B, N, C]s
            q.copy_(ops.rms_norm(q, self.q_norm, self.eps, rope=q_rope))
            k.copy_(ops.rms_norm(k, self.k_norm, self.eps, rope=rope))
        attn = ops.attention(q, k, v, key_padding_mask=mask).flatten(2)  # [B, N or kept, C]
        del q, k, v
        with rebuild_h:
            pre = self.mlp_in(h if keep is None else h[:, keep[0]:keep[1]])  # [B, N or kept, M]
        del h
        # Without grad the GELU overwrites pre in place (as in MLP.forward): one [B, N, M] buffer at the peak.
        act = ops.gelu_tanh_(pre) if not torch.is_grad_enabled() else _gelu(pre)
        rebuild_act = recompute_in_backward(act, (lambda pre=pre: _gelu(pre)) if torch.is_grad_enabled() else None)
        del pre
        with rebuild_act:
            update = split_input_linear(self.out, [attn, act])  # out([attn ; act]) without the concatenation
        del act, attn
        return ops.gated_residual(residual, gate, update)
