"""Conditioning embeddings: the sinusoidal timestep features and the two-layer MLPs that turn timestep, distilled
guidance and pooled text into the modulation vector `temb` [B, C].

The layers mirror diffusers' `Timesteps` + `TimestepEmbedding` / `PixArtAlphaTextProjection` (Linear, SiLU, Linear),
including where each family multiplies sigma by 1000 and in which dtype, so fp32 outputs agree to rounding.

See docs/ALGORITHM.md §6 (the families) and §2.1 (the sigma the model receives).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TIME_FEATURES = 256  # sinusoidal width both families use


def timestep_features(t: torch.Tensor, dim: int = TIME_FEATURES, scale: float = 1.0,
                      max_period: float = 10000.0) -> torch.Tensor:
    """[B] -> [B, dim] fp32 features (cos first, then sin), diffusers' `get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0)`: freqs exp(-ln(max_period) * i / (dim/2)), angles scale * (t * freqs)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = scale * (t[:, None].float() * freqs[None])
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' linear_1 / linear_2)."""

    def __init__(self, in_dim: int, hidden: int, **factory):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden, **factory)
        self.fc2 = nn.Linear(hidden, hidden, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class FluxConditioning(nn.Module):
    """temb = MLP_t(feat(1000 sigma)) [+ MLP_g(feat(1000 g))] + MLP_text(pooled) (diffusers'
    CombinedTimestep[Guidance]TextProjEmbeddings). Sigma and guidance are scaled by 1000 in the activation dtype
    first, as FluxTransformer2DModel.forward does."""

    def __init__(self, hidden: int, pooled_dim: int, guidance: bool, **factory):
        super().__init__()
        self.time_in = MLPEmbedder(TIME_FEATURES, hidden, **factory)
        self.guidance_in = MLPEmbedder(TIME_FEATURES, hidden, **factory) if guidance else None
        self.vector_in = MLPEmbedder(pooled_dim, hidden, **factory)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None,
                act_dtype: torch.dtype) -> torch.Tensor:
        dtype = pooled.dtype
        emb = self.time_in(timestep_features(timestep.to(act_dtype) * 1000).to(dtype))
        if guidance is not None:
            if self.guidance_in is None:
                raise ValueError("guidance was given but this FLUX model has guidance_embeds=False")
            emb = emb + self.guidance_in(timestep_features(guidance.to(act_dtype) * 1000).to(dtype))
        elif self.guidance_in is not None:
            raise ValueError("this FLUX model has guidance_embeds=True: pass `guidance` (e.g. 3.5, per sample)")
        return emb + self.vector_in(pooled)


class QwenConditioning(nn.Module):
    """temb = MLP_t(feat(sigma, scale 1000)) (diffusers' QwenTimestepProjEmbeddings: the 1000 sits inside the
    sinusoid, after the fp32 cast)."""

    def __init__(self, hidden: int, **factory):
        super().__init__()
        self.time_in = MLPEmbedder(TIME_FEATURES, hidden, **factory)

    def forward(self, timestep: torch.Tensor, act_dtype: torch.dtype) -> torch.Tensor:
        return self.time_in(timestep_features(timestep.to(act_dtype), scale=1000.0).to(act_dtype))
