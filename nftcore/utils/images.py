"""Image grids: one row per sample, one column per image batch. The trainer's rollout and evaluation grids and the
demo's before/after picture are drawn with these (PIL)."""

from __future__ import annotations

from collections.abc import Sequence
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


def save_image_grid(path: str | Path, *columns, scale: int = 4, headers: Sequence[str] | None = None,
                    captions: Sequence[str] | None = None) -> Path:
    """`image_grid(*columns)` as a PNG, upscaled by `scale` (nearest) so 16-32 px demo images are visible; e.g.
    source | base edit | final edit | target. `headers` name the columns above them, `captions` (one per row) are
    written to the right of each row."""
    from PIL import Image, ImageDraw

    grid = image_grid(*columns)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
    if headers or captions:
        top = 16 if headers else 0
        side = 8 + 6 * max((len(c) for c in captions), default=0) if captions else 0
        canvas = Image.new("RGB", (image.width + side, image.height + top), "white")
        canvas.paste(image, (0, top))
        draw = ImageDraw.Draw(canvas)
        cols = [c for c in columns if c is not None]
        rows, _, h, w = cols[0].shape
        pad = (image.width / scale - len(cols) * w) / (len(cols) + 1)  # image_grid's padding, in source pixels
        for j, text in enumerate(headers or []):
            draw.text((scale * (pad + j * (w + pad)), 2), text, fill="black")
        for i, text in enumerate(captions or []):
            draw.text((image.width + 4, top + scale * (pad + i * (h + pad) + h / 2) - 6), text, fill="black")
        image = canvas
    path = Path(path)
    image.save(path)
    return path
