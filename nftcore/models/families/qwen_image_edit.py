"""Qwen-Image-Edit family: the frozen parts (Qwen-Image VAE, Qwen2.5-VL text encoder + processor) around our `MMDiT`.

`QwenImageEditFamily` turns `(source image, instruction)` into a `QwenEditConditioning` once per sample; the
conditioning is stored with the rollout and reused by every training forward (the text encoder is never re-run).
It reproduces, step for step, the conditioning of diffusers' editing pipelines:

- `variant="edit"` (`QwenImageEditPipeline`, Qwen-Image-Edit): the source is resized to ~1024^2 area (multiples of
  32, aspect kept); that one resized image is both the VAE input and the image the VL encoder sees, through a fixed
  template with one `<|vision_start|><|image_pad|><|vision_end|>` before the instruction.
- `variant="plus"` (`QwenImageEditPlusPipeline`, Qwen-Image-Edit-2509): the VL encoder sees the source resized to
  ~384^2 area behind a "Picture 1: " prefix; the VAE sees it at ~1024^2 area. One source image per sample (the
  Edit-R1 PR #16 fix: each sample gets its own "Picture 1").

In both, the encoder's last (final-normed) hidden states of the non-padding tokens are kept minus the first
`drop_idx = 64` template tokens (the system prompt), then right-padded to the batch max with a 0/1 mask.

diffusers and transformers are used here only as providers of the frozen modules and the image resizing (so the
preprocessing is the pipelines' own); the trained transformer is nftcore's `MMDiT`.

See docs/ALGORITHM.md §6 and §11.8.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from nftcore.models.editing import QwenEditConditioning
from nftcore.models.families.latents import LatentNorm, pack_latents, unpack_latents
from nftcore.models.mmdit import MMDiT
from nftcore.sampling.schedules import QWEN_IMAGE_SCHEDULE, ScheduleConfig

__all__ = ["QwenImageEditFamily", "calculate_dimensions", "variant_of", "EDIT_TEMPLATE", "PLUS_TEMPLATE"]

_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
           "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
           "image that meets the user's requirements while maintaining consistency with the original input where "
           "appropriate.<|im_end|>\n<|im_start|>user\n")
EDIT_TEMPLATE = _SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
PLUS_TEMPLATE = _SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
DROP_IDX = 64  # tokens of the system part of the template under the Qwen2 vocabulary

VAE_AREA = 1024 * 1024
CONDITION_AREA = 384 * 384
_VARIANTS = {"QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "plus"}


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `target_area` pixels with aspect `ratio` = w/h, each a multiple of 32 (pipelines')."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def variant_of(folder: str | Path) -> str:
    """'edit' or 'plus': the pipeline class a folder's model_index.json names ('edit' without one)."""
    index = Path(folder) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    return _VARIANTS.get(name, "edit")


def _schedule_from_folder(folder: Path) -> ScheduleConfig:
    """The shift parameters of the pipeline's scheduler config (the stock Qwen-Image ones if absent)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return QWEN_IMAGE_SCHEDULE
    cfg = json.loads(path.read_text())
    if cfg.get("time_shift_type", "exponential") != "exponential" or not cfg.get("use_dynamic_shifting", True):
        raise ValueError(f"{path}: only dynamic exponential shifting is supported")
    return ScheduleConfig(base_shift=cfg.get("base_shift", 0.5), max_shift=cfg.get("max_shift", 1.15),
                          base_seq_len=cfg.get("base_image_seq_len", 256),
                          max_seq_len=cfg.get("max_image_seq_len", 4096), shift_terminal=cfg.get("shift_terminal"))


class QwenImageEditFamily:
    """Frozen VAE + Qwen2.5-VL encoder + processor, and the policy `MMDiT` (`transformer`, None if not loaded).

    Args:
        variant: "edit" (Qwen-Image-Edit) or "plus" (Qwen-Image-Edit-2509); see the module docstring.
        vae_area / condition_area: pixel areas the source is resized to for the VAE / the VL encoder ("plus" only).
        max_sequence_length: keep at most this many text tokens after the template drop (Edit-R1 uses 256; None =
            diffusers, no truncation).
    """

    def __init__(self, vae, text_encoder, processor, transformer: MMDiT | None = None, *, variant: str = "edit",
                 schedule: ScheduleConfig = QWEN_IMAGE_SCHEDULE, vae_area: int = VAE_AREA,
                 condition_area: int = CONDITION_AREA, max_sequence_length: int | None = None,
                 text_encoder_loader: Callable[[torch.device], torch.nn.Module] | None = None):
        from diffusers.image_processor import VaeImageProcessor

        if variant not in ("edit", "plus"):
            raise ValueError(f"variant must be 'edit' or 'plus', got {variant!r}")
        self.vae, self.text_encoder, self.processor, self.transformer = vae, text_encoder, processor, transformer
        self.text_encoder_loader = text_encoder_loader  # device -> Qwen2.5-VL, for an encoder skipped at load time
        self.variant, self.schedule = variant, schedule
        self.vae_area, self.condition_area, self.max_sequence_length = vae_area, condition_area, max_sequence_length
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample)
        self.norm = LatentNorm.from_vae_config(vae.config)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                        device: torch.device | str = "cpu", variant: str | None = None, load_transformer: bool = True,
                        load_text_encoders: bool = True, min_pixels: int | None = None, max_pixels: int | None = None,
                        **kwargs) -> "QwenImageEditFamily":
        """Load a local diffusers pipeline folder (`vae/`, `text_encoder/`, `processor/` or `tokenizer/`,
        `transformer/`, `scheduler/`). `variant` defaults to the one `model_index.json` names.

        `load_text_encoders=False` leaves Qwen2.5-VL (~8.3 B parameters) on disk, for a run whose text conditioning
        is cached; the first `encode_prompt` loads it then (`load_text_encoders()`)."""
        from diffusers import AutoencoderKLQwenImage

        from nftcore.utils.qwen_vl import build_processor, load_qwen_vl_processor, load_tokenizer

        folder = Path(folder)
        variant = variant or variant_of(folder)
        vae = AutoencoderKLQwenImage.from_pretrained(str(folder / "vae"), torch_dtype=dtype).to(device).eval()
        vae.requires_grad_(False)

        def loader(on: torch.device) -> torch.nn.Module:
            from transformers import Qwen2_5_VLForConditionalGeneration

            encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder / "text_encoder"), dtype=dtype)
            return encoder.to(on).eval().requires_grad_(False)

        encoder = loader(torch.device(device)) if load_text_encoders else None
        # The released pipelines ship the processor (tokenizer + image-processor config) under processor/.
        if (folder / "processor" / "preprocessor_config.json").is_file():
            processor = load_qwen_vl_processor(folder / "processor", min_pixels=min_pixels, max_pixels=max_pixels)
        else:
            processor = build_processor(load_tokenizer(folder / "tokenizer"), min_pixels=min_pixels,
                                        max_pixels=max_pixels)
        processor.tokenizer.padding_side = "right"  # the released tokenizer's side: positions as if unbatched
        transformer = MMDiT.from_pretrained(folder, subfolder="transformer", dtype=dtype, device=device) \
            if load_transformer else None
        return cls(vae, encoder, processor, transformer, variant=variant, schedule=_schedule_from_folder(folder),
                   text_encoder_loader=loader, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def text_encoders_loaded(self) -> bool:
        return self.text_encoder is not None

    def load_text_encoders(self) -> None:
        """Load Qwen2.5-VL now, whole, on this process's device (after `load_text_encoders=False`)."""
        if self.text_encoder is not None:
            return
        if self.text_encoder_loader is None:
            raise RuntimeError("this QwenImageEditFamily was built without its text encoder and cannot load it")
        self.text_encoder = self.text_encoder_loader(self.device)

    # ------------------------------------------------------------------------------------------ preprocessing

    def vae_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) the pipeline gives the source for the VAE: ~vae_area pixels, multiples of 32."""
        return calculate_dimensions(self.vae_area, image.width / image.height)

    def _vl_images(self, images: list[Image.Image]) -> list[Image.Image]:
        if self.variant == "edit":
            sizes = [self.vae_size(im) for im in images]
        else:
            sizes = [calculate_dimensions(self.condition_area, im.width / im.height) for im in images]
        return [self.image_processor.resize(im, h, w) for im, (w, h) in zip(images, sizes)]

    # --------------------------------------------------------------------------------------------- encoders

    @torch.no_grad()
    def encode_prompt(self, source_images: list[Image.Image], instructions: list[str]) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
        """Qwen2.5-VL embeddings of `(source, instruction)` pairs: ([B, Nt, D] in the encoder's dtype, [B, Nt] long
        mask, 1 = token), Nt = the batch's longest post-template sequence."""
        if len(source_images) != len(instructions):
            raise ValueError(f"{len(source_images)} source images for {len(instructions)} instructions")
        if self.variant == "edit":
            texts = [EDIT_TEMPLATE.format(t) for t in instructions]
        else:
            texts = [PLUS_TEMPLATE.format(PLUS_IMAGE_PROMPT.format(1) + t) for t in instructions]
        self.load_text_encoders()  # a no-op unless it was left on disk
        inputs = self.processor(text=texts, images=self._vl_images(list(source_images)), padding=True,
                                return_tensors="pt").to(self.device)
        out = self.text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                                output_hidden_states=True)
        hidden, mask = out.hidden_states[-1], inputs["attention_mask"].bool()
        rows = [h[m][DROP_IDX:] for h, m in zip(hidden, mask)]
        if self.max_sequence_length is not None:
            rows = [r[: self.max_sequence_length] for r in rows]
        longest = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
        lengths = torch.tensor([r.shape[0] for r in rows], device=embeds.device)
        embeds_mask = (torch.arange(longest, device=embeds.device)[None] < lengths[:, None]).long()
        return embeds, embeds_mask

    @torch.no_grad()
    def encode_source(self, source_images: list[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Packed normalised VAE latents of the sources ([B, Ns, 64] fp32) and their token grid (rows, cols).
        All sources of one batch must resize to the same VAE size (true for square training data)."""
        sizes = {self.vae_size(im) for im in source_images}
        if len(sizes) != 1:
            raise ValueError(f"sources resize to different VAE sizes {sorted(sizes)}; encode them separately")
        width, height = sizes.pop()
        pixels = torch.cat([self.image_processor.preprocess(self.image_processor.resize(im, height, width), height,
                                                            width) for im in source_images])
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels.unsqueeze(2).to(self.device, vae_dtype)).latent_dist
        latents = self.norm.normalize(dist.mode())
        return pack_latents(latents).float(), (latents.shape[-2] // 2, latents.shape[-1] // 2)

    def conditioning(self, source_images: list[Image.Image], instructions: list[str], *,
                     height: int | None = None, width: int | None = None) -> QwenEditConditioning:
        """Everything a rollout and its training forwards need besides the target latents. The target size in
        pixels defaults to the source's VAE size (the pipelines' default)."""
        embeds, mask = self.encode_prompt(source_images, instructions)
        source, (rows, cols) = self.encode_source(source_images)
        multiple = self.vae_scale_factor * 2
        target = self.target_grid(height or rows * multiple, width or cols * multiple)
        return QwenEditConditioning(embeds, mask, [(1, *target), (1, rows, cols)], source)

    # ----------------------------------------------------------------------------------------------- latents

    def target_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) of a `height` x `width` target (rounded down to multiples of 16, as pipelines)."""
        multiple = self.vae_scale_factor * 2
        return height // multiple, width // multiple

    def sigmas(self, num_steps: int, grid: tuple[int, int]) -> torch.Tensor:
        """Sampler sigmas (float64, N + 1) for a target grid; the shift counts target tokens only."""
        return self.schedule.sigmas(num_steps, grid[0] * grid[1])

    def initial_noise(self, batch: int, grid: tuple[int, int], *, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Packed N(0, I) noise drawn exactly as the pipelines' `prepare_latents` ([B, 1, C, 2r, 2c], then packed),
        so one seed gives the same start as diffusers."""
        channels = self.vae.config.z_dim
        noise = torch.randn((batch, 1, channels, grid[0] * 2, grid[1] * 2), generator=generator, dtype=dtype,
                            device=generator.device if generator is not None else "cpu")
        return pack_latents(noise.transpose(1, 2)).to(self.device)

    pack = staticmethod(pack_latents)

    @staticmethod
    def unpack(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, N, 64] -> [B, 16, 1, H, W] (the Qwen VAE's single-frame layout)."""
        return unpack_latents(tokens, grid, frames=True)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Packed normalised latents -> images [B, 3, H, W] fp32 in [0, 1] (what the reward server is sent)."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.norm.denormalize(self.unpack(tokens.to(self.device, vae_dtype), grid))
        images = self.vae.decode(latents, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        """[B, 3, H, W] in [0, 1] -> PIL images (rounded as diffusers' `numpy_to_pil`)."""
        arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arrays]
