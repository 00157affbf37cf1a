"""Editing wrappers: (model, conditioning) -> `velocity_fn(x, sigma)` over the *target* tokens only.

`nftcore.sampling` and the NFT loss see only the target latents x [B, N, in] (packed 2x2 patches). The wrapper
appends the source image's tokens after them (`[target ; source]`, positions from the family's scheme: FLUX ids with
axis 0 = 1 for the source, Qwen-Image one frame index per image in `img_shapes`), calls the transformer, and returns
the velocity of the first N tokens (the final layer is not even run on the source tokens).

The conditioning is computed once per prompt/source pair (frozen encoders) and kept in one small dataclass per
family. A conditioning of batch 1 is broadcast to any batch of x (a group of rollouts of one prompt) without copies.

Source injection and token layout: docs/ALGORITHM.md §6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from .mmdit import MMDiT
from .rope import flux_image_ids

VelocityFn = Callable[[torch.Tensor, Union[float, torch.Tensor]], torch.Tensor]


def _expand(x: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """[1, ...] -> [batch, ...] view; [batch, ...] unchanged; anything else is an error."""
    if x is None or x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"conditioning has batch {x.shape[0]}, latents have {batch} (use batch 1 or {batch})")
    return x.expand(batch, *x.shape[1:])


def _per_sample(value: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Python float, 0-d or [B] tensor -> [B] fp32 on `device` (per-sample sigmas are allowed for the loss)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.expand(batch) if t.dim() == 0 else t


@dataclass
class FluxEditConditioning:
    """FLUX.1-Kontext conditioning for one batch of edits.

    prompt_embeds [B|1, Nt, 4096] (T5), pooled_prompt_embeds [B|1, 768] (CLIP), txt_ids [Nt, 3] (zeros),
    img_ids [N + Ns, 3] for [target ; source], guidance: the distilled guidance scale, a float or [B] (FLUX.1-Kontext's
    pipeline default is 3.5, Edit-R1 trains at 2.5; None for a model without guidance_embeds), source_latents
    [B|1, Ns, 64] packed (None: plain generation).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    txt_ids: torch.Tensor
    img_ids: torch.Tensor
    guidance: float | torch.Tensor | None
    source_latents: torch.Tensor | None = None

    @classmethod
    def from_grids(cls, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                   target_grid: tuple[int, int], source_latents: torch.Tensor | None = None,
                   source_grid: tuple[int, int] | None = None, *,
                   guidance: float | torch.Tensor | None) -> "FluxEditConditioning":
        """Build the Kontext ids: target tokens (0, row, col), source tokens (1, row, col), text tokens all zero.
        Grids are in tokens (latent size / 2)."""
        device = prompt_embeds.device
        ids = [flux_image_ids(*target_grid, index=0, device=device)]
        if source_latents is not None:
            if source_grid is None:
                raise ValueError("source_latents need their source_grid (rows, cols) in tokens")
            ids.append(flux_image_ids(*source_grid, index=1, device=device))
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device)
        return cls(prompt_embeds, pooled_prompt_embeds, txt_ids, torch.cat(ids), guidance, source_latents)


@dataclass
class QwenEditConditioning:
    """Qwen-Image-Edit conditioning for one batch of edits.

    prompt_embeds [B|1, Nt, 3584] (Qwen2.5-VL last hidden state), prompt_embeds_mask [B|1, Nt] (1 = real token;
    None when nothing is padded), img_shapes [(1, h, w) target, (1, hs, ws) source, ...] in tokens for one sample
    (the same for the whole batch), source_latents [B|1, Ns, 64] packed (None: plain generation).
    """

    prompt_embeds: torch.Tensor
    prompt_embeds_mask: torch.Tensor | None
    img_shapes: list[tuple[int, int, int]]
    source_latents: torch.Tensor | None = None

    def __post_init__(self):
        # An all-ones mask changes nothing but forces the masked attention path: drop it once here (one host
        # sync per conditioning, never per step).
        if self.prompt_embeds_mask is not None and bool(self.prompt_embeds_mask.bool().all()):
            self.prompt_embeds_mask = None


class EditVelocity:
    """`velocity_fn(x, sigma)` for one conditioning: x [B, N, in] target tokens, sigma a float, 0-d or [B] tensor;
    returns v [B, N, out] in x's dtype (the model runs in its own parameter dtype)."""

    def __init__(self, model: MMDiT, cond: FluxEditConditioning | QwenEditConditioning):
        family = model.config.family
        expected = FluxEditConditioning if family == "flux" else QwenEditConditioning
        if not isinstance(cond, expected):
            raise TypeError(f"a {family} model needs {expected.__name__}, got {type(cond).__name__}")
        self.model, self.cond = model, cond

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        cond, model, dtype = self.cond, self.model, self.model.dtype
        batch, n_target = x.shape[:2]
        tokens = x.to(dtype)
        if cond.source_latents is not None:
            tokens = torch.cat([tokens, _expand(cond.source_latents, batch).to(dtype)], dim=1)  # [target ; source]
        common = dict(timestep=_per_sample(sigma, batch, x.device), return_dict=False, num_output_tokens=n_target)
        text = _expand(cond.prompt_embeds, batch).to(dtype)
        if isinstance(cond, FluxEditConditioning):
            guidance = None if cond.guidance is None else _per_sample(cond.guidance, batch, x.device)
            out = model(tokens, text, pooled_projections=_expand(cond.pooled_prompt_embeds, batch).to(dtype),
                        img_ids=cond.img_ids, txt_ids=cond.txt_ids, guidance=guidance, **common)[0]
        else:
            out = model(tokens, text, encoder_hidden_states_mask=_expand(cond.prompt_embeds_mask, batch),
                        img_shapes=[list(cond.img_shapes)] * batch, **common)[0]
        return out.to(x.dtype)


def edit_velocity_fn(model: MMDiT, cond: FluxEditConditioning | QwenEditConditioning) -> VelocityFn:
    """The velocity function `nftcore.sampling` and the NFT loss call: `edit_velocity_fn(model, cond)(x, sigma)`."""
    return EditVelocity(model, cond)
