"""FLUX.1-Kontext family: the frozen parts (FLUX VAE, CLIP-L + T5 text encoders, their tokenizers) around `MMDiT`.

`KontextFamily` reproduces `FluxKontextPipeline`'s conditioning:
- T5: the instruction padded/truncated to `max_sequence_length` tokens (pipeline default 512, Edit-R1 uses 128);
  the encoder's last hidden state, no mask (FLUX attends to the padding, so the padded length is part of the model).
- CLIP: padded/truncated to the tokenizer's `model_max_length` (77); the pooled output.
- source: resized to the preferred Kontext resolution closest in aspect (`auto_resize=True`, the pipeline default)
  or kept at its own size rounded down to multiples of 16; VAE mode, `(z - shift_factor) * scaling_factor`,
  packed 2x2; ids (1, row, col) after the target's (0, row, col).
The distilled guidance scale is part of the conditioning (pipeline default 3.5; Edit-R1 trains at 2.5).

See docs/ALGORITHM.md §6 and §11.8.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from nftcore.models.editing import FluxEditConditioning
from nftcore.models.families.latents import LatentNorm, pack_latents, unpack_latents
from nftcore.models.mmdit import MMDiT
from nftcore.sampling.schedules import FLUX_SCHEDULE, ScheduleConfig

__all__ = ["KontextFamily"]


def _schedule_from_folder(folder: Path) -> ScheduleConfig:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return FLUX_SCHEDULE
    cfg = json.loads(path.read_text())
    return ScheduleConfig(base_shift=cfg.get("base_shift", 0.5), max_shift=cfg.get("max_shift", 1.15),
                          base_seq_len=cfg.get("base_image_seq_len", 256),
                          max_seq_len=cfg.get("max_image_seq_len", 4096), shift_terminal=cfg.get("shift_terminal"))


def _load_text_encoders(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple:
    """(CLIP-L, T5) of a Kontext folder, frozen, on `device`."""
    from transformers import CLIPTextModel, T5EncoderModel

    clip = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype)
    t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"), dtype=dtype)
    return tuple(module.to(device).eval().requires_grad_(False) for module in (clip, t5))


class KontextFamily:
    """Frozen VAE + CLIP + T5 (+ tokenizers) and the policy `MMDiT` (`transformer`, None if not loaded)."""

    def __init__(self, vae, clip, clip_tokenizer, t5, t5_tokenizer, transformer: MMDiT | None = None, *,
                 schedule: ScheduleConfig = FLUX_SCHEDULE, max_sequence_length: int = 512,
                 guidance: float | None = 3.5, auto_resize: bool = True,
                 text_encoder_loader: Callable[[torch.device], tuple] | None = None):
        from diffusers.image_processor import VaeImageProcessor

        self.vae, self.clip, self.clip_tokenizer = vae, clip, clip_tokenizer
        self.text_encoder_loader = text_encoder_loader  # device -> (clip, t5), for encoders skipped at load time
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.transformer, self.schedule = transformer, schedule
        self.max_sequence_length, self.guidance, self.auto_resize = max_sequence_length, guidance, auto_resize
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.norm = LatentNorm.from_vae_config(vae.config)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu", load_transformer: bool = True,
                        load_text_encoders: bool = True, **kwargs) -> "KontextFamily":
        """Load a local diffusers FLUX.1-Kontext folder (`vae/`, `text_encoder/` + `tokenizer/` = CLIP,
        `text_encoder_2/` + `tokenizer_2/` = T5, `transformer/`, `scheduler/`).

        `load_text_encoders=False` leaves CLIP and T5 (~4.9 B parameters) on disk, for a run whose text conditioning
        is cached; the first `encode_prompt` loads them then (`load_text_encoders()`)."""
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer

        folder = Path(folder)
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype)
        vae.to(device).eval().requires_grad_(False)

        def loader(on: torch.device) -> tuple:
            return _load_text_encoders(folder, dtype, on)

        clip, t5 = loader(torch.device(device)) if load_text_encoders else (None, None)
        transformer = MMDiT.from_pretrained(folder, subfolder="transformer", dtype=dtype, device=device) \
            if load_transformer else None
        return cls(vae, clip, AutoTokenizer.from_pretrained(str(folder / "tokenizer")), t5,
                   AutoTokenizer.from_pretrained(str(folder / "tokenizer_2")), transformer,
                   schedule=_schedule_from_folder(folder), text_encoder_loader=loader, **kwargs)

    @property
    def text_encoders_loaded(self) -> bool:
        return self.clip is not None and self.t5 is not None

    def load_text_encoders(self) -> None:
        """Load CLIP and T5 now, whole, on this process's device (after `load_text_encoders=False`)."""
        if self.text_encoders_loaded:
            return
        if self.text_encoder_loader is None:
            raise RuntimeError("this KontextFamily was built without its text encoders and cannot load them")
        self.clip, self.t5 = self.text_encoder_loader(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    # --------------------------------------------------------------------------------------------- encoders

    @torch.no_grad()
    def encode_prompt(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 embeds [B, max_sequence_length, D], pooled CLIP [B, Dp]), both in their encoders' dtypes."""
        instructions = list(instructions)
        self.load_text_encoders()  # a no-op unless they were left on disk
        clip_ids = self.clip_tokenizer(instructions, padding="max_length", truncation=True, return_tensors="pt",
                                       max_length=self.clip_tokenizer.model_max_length).input_ids
        pooled = self.clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(instructions, padding="max_length", truncation=True, return_tensors="pt",
                                   max_length=self.max_sequence_length).input_ids
        embeds = self.t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        return embeds, pooled

    def source_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) the pipeline gives the source (see the module docstring)."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        multiple = self.vae_scale_factor * 2
        height, width = self.image_processor.get_default_height_width(image)
        if self.auto_resize:
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return width // multiple * multiple, height // multiple * multiple

    @torch.no_grad()
    def encode_source(self, source_images: list[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Packed normalised VAE latents ([B, Ns, 64] fp32) and their token grid; one source size per batch."""
        sizes = {self.source_size(im) for im in source_images}
        if len(sizes) != 1:
            raise ValueError(f"sources resize to different sizes {sorted(sizes)}; encode them separately")
        width, height = sizes.pop()
        pixels = self.image_processor.preprocess(self.image_processor.resize(list(source_images), height, width),
                                                 height, width)
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.norm.normalize(self.vae.encode(pixels.to(self.device, vae_dtype)).latent_dist.mode())
        return pack_latents(latents).float(), (latents.shape[-2] // 2, latents.shape[-1] // 2)

    def conditioning(self, source_images: list[Image.Image], instructions: list[str], *, height: int,
                     width: int) -> FluxEditConditioning:
        """Conditioning for a `height` x `width` target (the pipeline derives it from `max_area`; pass it here)."""
        embeds, pooled = self.encode_prompt(instructions)
        source, source_grid = self.encode_source(source_images)
        return FluxEditConditioning.from_grids(embeds, pooled, self.target_grid(height, width), source, source_grid,
                                               guidance=self.guidance)

    # ----------------------------------------------------------------------------------------------- latents

    def target_grid(self, height: int, width: int) -> tuple[int, int]:
        multiple = self.vae_scale_factor * 2
        return height // multiple, width // multiple

    def sigmas(self, num_steps: int, grid: tuple[int, int]) -> torch.Tensor:
        return self.schedule.sigmas(num_steps, grid[0] * grid[1])

    def initial_noise(self, batch: int, grid: tuple[int, int], *, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed noise drawn as `FluxKontextPipeline.prepare_latents` draws it ([B, C, 2r, 2c], then packed)."""
        channels = self.vae.config.latent_channels
        noise = torch.randn((batch, channels, grid[0] * 2, grid[1] * 2), generator=generator, dtype=dtype,
                            device=generator.device if generator is not None else "cpu")
        return pack_latents(noise).to(self.device)

    pack = staticmethod(pack_latents)

    @staticmethod
    def unpack(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return unpack_latents(tokens, grid)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Packed normalised latents -> images [B, 3, H, W] fp32 in [0, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.norm.denormalize(self.unpack(tokens.to(self.device, vae_dtype), grid))
        images = self.vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
