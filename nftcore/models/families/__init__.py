"""Model families: the frozen parts (VAE, text/VL encoders, tokenizers, processors) of each base model around the
shared `MMDiT`, loaded from a local diffusers pipeline folder. One object per family turns `(source image,
instruction)` into a conditioning computed once per sample, packs/unpacks latents and decodes them to images.

See docs/ALGORITHM.md §6 and §11.8.
"""

from .latents import LatentNorm, pack_latents, unpack_latents
from .kontext import KontextFamily
from .qwen_image_edit import QwenImageEditFamily

__all__ = ["KontextFamily", "LatentNorm", "QwenImageEditFamily", "pack_latents", "unpack_latents"]
