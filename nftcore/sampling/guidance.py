"""True classifier-free guidance as a velocity-function wrapper.

`true_cfg(cond_fn, uncond_fn, scale)` returns a `velocity_fn(x, sigma)` that runs both branches (the instruction and
a negative prompt) and combines them as the Qwen-Image(-Edit) pipelines do:

    v = v_uncond + scale * (v_cond - v_uncond)
    v = v * (||v_cond|| / ||v||)          (norm rescale, over the last (channel) axis of every token; `rescale=True`)

The rescale keeps each token's velocity at the conditional branch's magnitude, which stops high scales from
over-saturating. Scale 1.0 returns `cond_fn` itself: no second forward and bit-identical results. The trainer's
rollouts never use it (Edit-R1 trains at 1.0); it is an inference option.

See docs/ALGORITHM.md §2.2 and docs/INFERENCE.md, "Presets".
"""

from __future__ import annotations

import math

import torch

from nftcore.sampling.solvers import VelocityFn

__all__ = ["combine_cfg", "true_cfg"]


def combine_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, *, rescale: bool = True) -> torch.Tensor:
    """One guided velocity from the two branches (see the module docstring)."""
    combined = v_uncond + scale * (v_cond - v_uncond)
    if not rescale:
        return combined
    cond_norm = torch.norm(v_cond, dim=-1, keepdim=True)
    return combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))


def true_cfg(cond_fn: VelocityFn, uncond_fn: VelocityFn | None, scale: float, *,
             rescale: bool = True) -> VelocityFn:
    """The guided `velocity_fn(x, sigma)`; `cond_fn` unchanged when `scale` is 1.0 (then `uncond_fn` may be None)."""
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"true CFG scale must be finite, got {scale}")
    if scale == 1.0:
        return cond_fn
    if uncond_fn is None:
        raise ValueError(f"true CFG scale {scale:g} needs an unconditional (negative-prompt) velocity function")

    def guided(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return combine_cfg(cond_fn(x, sigma), uncond_fn(x, sigma), scale, rescale=rescale)

    return guided
