"""`Editor`: one loaded editing model (FLUX.1-Kontext or Qwen-Image-Edit(-2509), optionally with a LoRA) that turns
(source images, instructions, per-item seeds) into edited images, with a preset's settings.

It reuses the trainer's pieces: the family objects of `nftcore.models.families` (conditioning, sigmas, noise layout,
decoding), `edit_velocity_fn` and `nftcore.sampling` (plus `true_cfg` for the Qwen presets). Each item's starting
noise comes from its own generator (`item_seed(seed, key)`), so an item's edit does not depend on which batch or
process it lands in.

See docs/INFERENCE.md, "Determinism, batching, processes".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
from PIL import Image

from nftcore.data.edit_dataset import derive_seed
from nftcore.inference.presets import Preset

__all__ = ["DTYPES", "Editor", "item_seed"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def item_seed(seed: int, key: str) -> int:
    """The noise seed of one item: a function of (run seed, item key) only."""
    return derive_seed(seed, key, "edit-noise")


class Editor:
    """Load with `Editor(folder, preset, ...)`; `edit(sources, prompts, seeds)` -> [B, 3, H, W] in [0, 1].

    A batch is edited at one size: group items by `size_key(image)` first (`sizes(image)` gives the edit's and the
    source's (width, height))."""

    def __init__(self, folder: str | Path, preset: Preset, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", lora: str | Path | None = None,
                 lora_alpha: float | None = None, keep_base: bool = False):
        from nftcore.models.checkpoint_io import read_config
        from nftcore.models.families import KontextFamily, QwenImageEditFamily
        from nftcore.trainer.edit_family import pipeline_folder

        folder = pipeline_folder(str(folder))
        arch = read_config(folder / "transformer")
        if arch.family != preset.family:
            raise ValueError(f"{folder}: its transformer is a {arch.family!r} model, but preset {preset.name!r} is "
                             f"for {preset.family!r}")
        if arch.family == "flux":
            if arch.guidance_embeds and preset.guidance is None:
                raise ValueError(f"{folder}: this FLUX transformer has a guidance embedding; give --guidance "
                                 "(FLUX.1-Kontext: 3.5)")
            guidance = preset.guidance if arch.guidance_embeds else None
            self.model = KontextFamily.from_pretrained(folder, dtype=dtype, device=device,
                                                       auto_resize=preset.auto_resize,
                                                       max_sequence_length=preset.max_sequence_length or 512,
                                                       guidance=guidance)
        else:
            self.model = QwenImageEditFamily.from_pretrained(folder, dtype=dtype, device=device,
                                                             vae_area=preset.max_area,
                                                             max_sequence_length=preset.max_sequence_length)
        self.folder, self.preset, self.arch = folder, preset, arch
        self.transformer = self.model.transformer.eval().requires_grad_(False)
        self.lora = None
        if lora is not None:
            from nftcore.inference.lora import apply_lora_file

            self.lora = apply_lora_file(self.transformer, lora, alpha=lora_alpha, merge=not keep_base)
        self.has_base = lora is None or keep_base

    # ----------------------------------------------------------------------------------------------- sizes

    def sizes(self, image: Image.Image) -> tuple[tuple[int, int], tuple[int, int]]:
        """((width, height) of the edit, (width, height) the source is encoded at): the pipelines' rules."""
        multiple = self.model.vae_scale_factor * 2
        ratio = image.width / image.height
        if self.arch.family == "flux":
            # FluxKontextPipeline with height/width = the source's: max_area pixels in that aspect
            width = round(math.sqrt(self.preset.max_area * ratio)) // multiple * multiple
            height = round(math.sqrt(self.preset.max_area / ratio)) // multiple * multiple
            source = self.model.source_size(image)
        else:
            from nftcore.models.families.qwen_image_edit import calculate_dimensions

            width, height = calculate_dimensions(self.preset.max_area, ratio)
            width, height = width // multiple * multiple, height // multiple * multiple
            source = self.model.vae_size(image)
        if min(width, height, *source) < multiple:
            raise ValueError(f"a {image.width}x{image.height} source gives a {width}x{height} edit / {source[0]}x"
                             f"{source[1]} source at max area {self.preset.max_area}: the aspect ratio is too extreme")
        return (width, height), source

    def size_key(self, image: Image.Image) -> tuple:
        return self.sizes(image)

    # ------------------------------------------------------------------------------------------------ edit

    def _negative(self, cond, sources: list[Image.Image]):
        """The conditioning of the negative prompt: the same source, its own text."""
        negatives = [self.preset.negative_prompt] * len(sources)
        if self.arch.family == "flux":
            embeds, pooled = self.model.encode_prompt(negatives)
            return dataclasses.replace(cond, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        embeds, mask = self.model.encode_prompt(sources, negatives)
        return dataclasses.replace(cond, prompt_embeds=embeds, prompt_embeds_mask=mask)

    def noise(self, seeds: list[int], grid: tuple[int, int]) -> torch.Tensor:
        return torch.cat([self.model.initial_noise(1, grid, generator=torch.Generator().manual_seed(s))
                          for s in seeds])

    @torch.no_grad()
    def edit(self, sources: list[Image.Image], prompts: list[str], seeds: list[int], *,
             base: bool = False) -> torch.Tensor:
        """Edited images [B, 3, H, W] fp32 in [0, 1] on CPU; `base=True` without the LoRA (needs keep_base)."""
        from nftcore.models import edit_velocity_fn
        from nftcore.sampling import sample, true_cfg

        if base and not self.has_base:
            raise RuntimeError("the LoRA is merged; build the Editor with keep_base=True to edit without it")
        (width, height), _ = self.sizes(sources[0])
        preset = self.preset
        cond = self.model.conditioning(list(sources), list(prompts), height=height, width=width)
        grid = self.model.target_grid(height, width)
        velocity = edit_velocity_fn(self.transformer, cond)
        if preset.true_cfg_scale != 1.0:
            velocity = true_cfg(velocity, edit_velocity_fn(self.transformer, self._negative(cond, sources)),
                                preset.true_cfg_scale)
        context = contextlib.nullcontext()
        if self.lora is not None and base:
            from nftcore.models.lora import adapters_disabled

            context = adapters_disabled(self.transformer)
        with context:
            latents = sample(velocity, self.noise(seeds, grid), self.model.sigmas(preset.num_steps, grid),
                             solver=preset.solver)
        return self.model.decode(latents, grid).cpu()
