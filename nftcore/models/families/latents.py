"""Latent layout helpers shared by the editing families: 2x2 patch packing and per-channel VAE normalisation.

Both FLUX.1-Kontext and Qwen-Image(-Edit) feed the transformer 2x2 patches of a 16-channel VAE latent, flattened
channel-major (`c, dy, dx`) into 64-d tokens in row-major token order; the pipelines call this `_pack_latents`.
The layout must match the pipelines bit for bit, otherwise a checkpoint's `img_in` sees scrambled features.

The VAEs differ only in how the raw latent is normalised before packing:
- Qwen-Image VAE: per-channel `(z - latents_mean) / latents_std` (16 values each, from the VAE config);
- FLUX VAE: `(z - shift_factor) * scaling_factor` (scalars).
`LatentNorm` holds both as `(z - shift) / scale` with tensors broadcastable over the channel axis.

See docs/ALGORITHM.md §6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LatentNorm", "pack_latents", "unpack_latents"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (or Qwen's video-shaped [B, C, 1, H, W]) -> [B, (H/2)(W/2), 4C] tokens, diffusers' order."""
    if latents.dim() == 5:
        if latents.shape[2] != 1:
            raise ValueError(f"only single-frame latents can be packed, got {tuple(latents.shape)}")
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width must be even for 2x2 packing, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, grid: tuple[int, int], *, frames: bool = False) -> torch.Tensor:
    """[B, rows*cols, 4C] -> [B, C, 2*rows, 2*cols] (`frames=True`: [B, C, 1, 2*rows, 2*cols] for the Qwen VAE).
    `grid` is (rows, cols) in tokens, i.e. latent size / 2."""
    b, n, d = tokens.shape
    rows, cols = grid
    if n != rows * cols or d % 4:
        raise ValueError(f"{tuple(tokens.shape)} tokens do not fit a {rows}x{cols} grid of 2x2 patches")
    x = tokens.reshape(b, rows, cols, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, rows * 2, cols * 2)
    return x.unsqueeze(2) if frames else x


@dataclass
class LatentNorm:
    """`normalize(z) = (z - shift) / scale`, `denormalize(z) = z * scale + shift`; shift/scale are floats or
    per-channel vectors [C] (broadcast over [B, C, ...])."""

    shift: float | torch.Tensor
    scale: float | torch.Tensor

    @classmethod
    def from_vae_config(cls, config) -> "LatentNorm":
        """Qwen-Image VAE (`latents_mean`/`latents_std`) or FLUX VAE (`shift_factor`/`scaling_factor`)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        if get("latents_mean") is not None:
            return cls(torch.tensor(get("latents_mean"), dtype=torch.float32),
                       torch.tensor(get("latents_std"), dtype=torch.float32))
        return cls(float(get("shift_factor", 0.0) or 0.0), 1.0 / float(get("scaling_factor", 1.0)))

    def _view(self, value, z: torch.Tensor):
        if not torch.is_tensor(value):
            return value
        return value.to(z.device, z.dtype).view(1, -1, *([1] * (z.dim() - 2)))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._view(self.shift, z)) / self._view(self.scale, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._view(self.scale, z) + self._view(self.shift, z)
