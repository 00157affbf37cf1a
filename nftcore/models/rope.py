"""3-axis rotary position tables for FLUX (ids) and Qwen-Image (MSRoPE), computed once per forward.

The model never rotates q/k itself: it builds (cos, sin) tables here, fp32, one row per token of the joint sequence
`[text ; image]`, and hands them to `nftcore.ops.attention`, which rotates the interleaved pairs (x[2i], x[2i+1]) of q
and k inside the attention op. Each axis owns a slice of the head dimension (`axes_dims_rope`, e.g. 16 + 56 + 56 =
128): pair i of axis a turns by angle pos_a * theta**(-2i / d_a).

Numerics follow diffusers 0.42 exactly where it matters for parity: FLUX computes the angles in float64 (then casts
the cos/sin to fp32), Qwen-Image in float32 (its tables come from `torch.polar` on fp32 angles).

The source image's positions: docs/ALGORITHM.md §6.
"""

from __future__ import annotations

from typing import Sequence

import torch

ImageShape = tuple[int, int, int]  # (frames, rows, cols) of one image, in tokens (after 2x2 patching)


def axes_rope(pos: torch.Tensor, axes_dims: Sequence[int], theta: float,
              angle_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for positions `pos` [..., N, n_axes] (float32): each [..., N, sum(axes_dims) / 2], fp32."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=angle_dtype, device=pos.device) / dim)
        angle = pos[..., axis, None].to(angle_dtype) * inv_freq  # [..., N, dim/2]
        cos.append(angle.cos())
        sin.append(angle.sin())
    return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


# ------------------------------------------------------------------------------------------------------------ FLUX

def flux_rope(txt_ids: torch.Tensor, img_ids: torch.Tensor, axes_dims: Sequence[int],
              theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX RoPE for the joint sequence [text ; image] from diffusers-style ids.

    txt_ids [Nt, 3] and img_ids [Ni, 3] (diffusers' layout), or [B, Nt, 3] / [B, Ni, 3]. Returns cos, sin of shape
    [1, Nt + Ni, D/2] or [B, Nt + Ni, D/2]. A batched id tensor is honoured per sample (diffusers 0.42 warns and uses
    sample 0; identical whenever the rows agree, which every pipeline guarantees).
    """
    if txt_ids.dim() == img_ids.dim() == 2:
        ids = torch.cat([txt_ids, img_ids], dim=0)  # [N, 3]
    else:
        txt_ids, img_ids = (i if i.dim() == 3 else i[None] for i in (txt_ids, img_ids))
        batch = max(txt_ids.shape[0], img_ids.shape[0])
        ids = torch.cat([txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)], dim=1)  # [B, N, 3]
    # diffusers: float64 angles except where the device has no float64
    angle_dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64
    return axes_rope(ids.float(), axes_dims, theta, angle_dtype)


def flux_image_ids(rows: int, cols: int, index: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """[rows * cols, 3] ids (index, row, col) of one packed latent grid, row-major like FLUX pipelines build them.
    Kontext gives the target index 0 and the source (context) image index 1."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    ids = torch.stack([torch.full_like(r, index), r, c], dim=-1)
    return ids.reshape(rows * cols, 3).float()


# ------------------------------------------------------------------------------------------------------ Qwen-Image

def normalize_img_shapes(img_shapes, batch: int) -> list[list[ImageShape]]:
    """diffusers' accepted forms of `img_shapes` -> one list of (frames, rows, cols) per sample.

    diffusers 0.42 takes `[[(f, h, w), ...]] * B` (per sample, per image), and for a bare tuple or flat list uses
    only the first element. nftcore keeps that reading for the flat forms (so a pipeline gets the same answer) and
    honours per-sample lists (diffusers warns and uses sample 0 when they differ).
    """
    if isinstance(img_shapes, tuple):
        img_shapes = [img_shapes]
    if not isinstance(img_shapes, list) or not img_shapes:
        raise ValueError(f"img_shapes must be a list of per-sample lists of (frames, rows, cols), got {img_shapes!r}")
    per_sample = []
    for entry in img_shapes:
        images = entry if isinstance(entry, list) else [entry]  # diffusers: a tuple entry is one image
        per_sample.append([tuple(int(v) for v in fhw) for fhw in images])
    if not isinstance(img_shapes[0], list):
        per_sample = per_sample[:1]  # flat list of tuples: diffusers reads only its first element
    if len(per_sample) not in (1, batch):
        raise ValueError(f"img_shapes has {len(per_sample)} entries for a batch of {batch}")
    return per_sample


def qwen_positions(images: Sequence[ImageShape], txt_len: int, device=None) -> torch.Tensor:
    """MSRoPE positions [txt_len + sum(f*h*w), 3] (frame, row, col) for [text ; images].

    Image k (target 0, source 1, ...) gets frame index k + its frame number; rows/cols are centred (`scale_rope`):
    row i sits at i - ceil(h/2), so a grid covers [-ceil(h/2), floor(h/2)). Text token j sits on the diagonal
    (p, p, p) with p = max over images of max(h//2, w//2), plus j, so text never collides with image positions.
    """
    parts, max_index = [], 0
    for k, (frames, rows, cols) in enumerate(images):
        f = torch.arange(frames, device=device) + k
        r = torch.arange(rows, device=device) - (rows - rows // 2)
        c = torch.arange(cols, device=device) - (cols - cols // 2)
        grid = torch.stack(torch.meshgrid(f, r, c, indexing="ij"), dim=-1)  # [f, h, w, 3]
        parts.append(grid.reshape(-1, 3))
        max_index = max(max_index, rows // 2, cols // 2)
    txt = (torch.arange(txt_len, device=device) + max_index)[:, None].expand(txt_len, 3)
    return torch.cat([txt, *parts], dim=0).float()


def qwen_rope(img_shapes: list[list[ImageShape]], txt_len: int, axes_dims: Sequence[int],
              theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image MSRoPE for [text ; images]: cos, sin [Nt + Ni, D/2] when every sample has the same images, else
    [B, Nt + Ni, D/2] (fp32 angles, as diffusers)."""
    if all(images == img_shapes[0] for images in img_shapes):
        pos = qwen_positions(img_shapes[0], txt_len, device)  # [N, 3]
    else:
        pos = torch.stack([qwen_positions(images, txt_len, device) for images in img_shapes])  # [B, N, 3]
    return axes_rope(pos, axes_dims, theta, torch.float32)
