"""Policy models: one compact MMDiT for FLUX.1-Kontext and Qwen-Image-Edit, its diffusers-format loader/saver, and
the editing wrappers that turn it into a `velocity_fn(x, sigma)` for sampling and the NFT loss.

Attention goes through `nftcore.ops.attention`; nothing here imports diffusers.

The base models and their inputs: docs/ALGORITHM.md §6; LoRA: §1.7 and §11.14.
"""

from .config import MMDiTConfig
from .editing import EditVelocity, FluxEditConditioning, QwenEditConditioning, VelocityFn, edit_velocity_fn
from .mmdit import MMDiT, MMDiTOutput
from .rope import flux_image_ids

__all__ = [
    "EditVelocity",
    "FluxEditConditioning",
    "MMDiT",
    "MMDiTConfig",
    "MMDiTOutput",
    "QwenEditConditioning",
    "VelocityFn",
    "edit_velocity_fn",
    "flux_image_ids",
]
