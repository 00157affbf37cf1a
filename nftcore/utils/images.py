"""Image grids: one row per sample, one column per image batch. The trainer's rollout and evaluation grids and the
demo's before/after picture are drawn with these (PIL only: matplotlib is not a dependency)."""

from __future__ import annotations

from pathlib import Path

import torch


def image_grid(*columns, pad: int = 2) -> torch.Tensor:
    """[3, H', W'] in [0, 1] on white: one row per sample, one column per image batch ([B, 3, H, W] in [0, 1];
    None columns are skipped)."""
    columns = [c for c in columns if c is not None]
    rows, _, h, w = columns[0].shape
    grid = torch.ones(3, rows * (h + pad) + pad, len(columns) * (w + pad) + pad)
    for j, col in enumerate(columns):
        for i in range(rows):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y0:y0 + h, x0:x0 + w] = col[i].float().cpu().clamp(0, 1)
    return grid


def save_image_grid(path: str | Path, *columns, scale: int = 4) -> Path:
    """`image_grid(*columns)` as a PNG, upscaled by `scale` (nearest) so 16-32 px demo images are visible; e.g.
    source | base edit | final edit | target."""
    from PIL import Image

    grid = image_grid(*columns)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
    path = Path(path)
    image.save(path)
    return path
