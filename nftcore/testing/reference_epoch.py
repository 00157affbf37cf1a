"""The official-style Edit-R1 / DiffusionNFT epoch: the baseline `bench/bench_epoch.py` times nftcore's trainer
against.

What it is: one epoch (rollouts → rewards → advantages → NFT update → soft update of "old") written the way the
official Edit-R1 training scripts (`train_nft_kontext.py`, `train_nft_qwen_image_edit.py`, built on DiffusionNFT)
run it, around the diffusers transformer of the family:

- **Model.** The diffusers `FluxTransformer2DModel` (demo, FLUX.1-Kontext) or `QwenImageTransformer2DModel`
  (Qwen-Image-Edit) with the same base weights as nftcore, wrapped by PEFT exactly as the scripts do:
  `get_peft_model(transformer, LoraConfig(r, alpha, init_lora_weights="gaussian", target_modules))`,
  `add_adapter("old", ...)`, `set_adapter("default")`; the initial adapter tensors are nftcore's (both sides start
  from the same weights). Gradient checkpointing via `enable_gradient_checkpointing()` when the config asks for it.
  DDP-style replication: the scripts wrap the PEFT model in `DistributedDataParallel`; with one process there is
  nothing to all-reduce, so no wrapper and no process group (nftcore runs with world size 1 as well).
- **Rollouts.** Batch by batch in a plain loop with the "old" adapter: the pipeline's own conditioning
  (`FluxKontextPipeline.encode_prompt` / `prepare_latents`; `QwenImageEditPipeline.encode_prompt` /
  `prepare_latents`; the demo's own text encoder and pixel patching, nothing in diffusers corresponds), the
  deterministic dpm2 solver written out in data-prediction form on the pipeline scheduler's sigma grid
  (`retrieve_timesteps(..., mu=calculate_shift(...))`), decoding through the pipeline's unpack + VAE +
  postprocess; each batch's reward is submitted to a one-worker thread pool while the next batch is sampled.
- **Advantages.** The official `PerPromptStatTracker` arithmetic in numpy (group mean, global std + 1e-4, ddof 0),
  fp64 on the device as the scripts keep them; clip to ±A_max and map to r = clip(A / A_max / 2 + ½, 0, 1) inside
  every training pass. The low-variance rule is a *loss mask* (`valid_mask`): masked samples run every forward.
- **Update.** One `torch.randperm` over the epoch's samples on the device and one per sample over the sampler
  timesteps; everything shuffled once (`v[perm]`), micro-batches are contiguous slices of `sampling.batch_size`.
  For every micro-batch and every one of its T_train timesteps: fresh noise drawn on the device, x_t, then three
  forwards in the scripts' order: "old" (`set_adapter("old")`, no grad), θ (`set_adapter("default")`), the
  reference (`disable_adapter()`, no grad, then `set_adapter("default")` again). The loss is the scripts'
  arithmetic line by line: the adaptive weights in fp64 (`.double()`, as the scripts compute them), the masked
  `mean_by_mask` means, `loss = policy + kl_weight · KL`, and the logged terms (x0_norm(_max), old_deviate(_max),
  unweighted_policy_loss, kl_div, old_kl_div), then `(loss / (grad_accum · T_train)).backward()`. Per optimizer
  step: `clip_grad_norm_`, `AdamW.step`, `zero_grad`, the per-tensor EMA of flow_grpo's `EMAModuleWrapper`
  (`ema += (1 − d)(θ − ema)`, d = min((1 + s)/(10 + s), ema_decay)); after the epoch the soft update of "old" with
  the scripts' `return_decay` presets (`old ← old·η + θ.clone()·(1 − η)`).

Same as nftcore (set by `bench_epoch.py` from one config): device, torch thread count, base-weight dtype
(`model.dtype`), autocast (bf16 on CUDA when `optim.mixed_precision = bf16`, none on the CPU), TF32, K, G, rollout
batch = micro-batch, sampler steps and solver, T_train, optimizer steps per epoch, LoRA rank/alpha/targets and
initial values, AdamW hyper-parameters, clipping, EMA decay, old-policy preset, the frozen encoders and the dataset
rows of every epoch.

Reviewed for handicaps (work the official code does not do), which this baseline avoids:
- training noise and rollout noise are drawn on the device, not on the host and copied every pass (the scripts use
  `torch.randn_like(x0)` and `prepare_latents` on the device);
- the timestep grid is gathered on the device once per epoch, not indexed on the host and copied per pass;
- a partly masked micro-batch is not row-gathered (`v[rows]` copies of every velocity and latent) before the loss:
  the mask multiplies the per-sample terms, as the scripts do;
- micro-batch conditioning is shuffled once and sliced (views), as the scripts do, not gathered per micro-batch;
- the gradient norm is kept on the device and read once after the epoch, not read back (`float(...)`, a device
  sync) after every optimizer step.
Kept on purpose, because the official code does the same: the fp64 adaptive weights (which promote the two branch
losses to fp64), the PEFT adapter switches (`set_adapter` walks every module, `disable_adapter` checks the model
status), the extra `set_adapter("default")` after the reference forward, the `.clone()` in the soft update, the
temporaries of the EMA update, the diagnostics computed every pass.
Left out, in the reference's favour (less work than the official code): the debug `print` of `x0_prediction`, wandb
logging and image grids; the host check `mask.sum() == 0` (a device sync per `mean_by_mask` call, six per pass) is
decided from a host copy of the mask; the per-step log reduction is one `.tolist()` instead of one `.item()` per
term plus an all-reduce; the Qwen script's `img_shapes.tolist()` per forward (a device read) is a Python list here;
the reference forward is skipped when kl_weight = 0 (the scripts always run it); the prompt-id round trip
(tokenise, gather, decode) that keys the stat tracker is replaced by the group index; the trajectory
`torch.stack(latents)` kept by the scripts' pipeline is not built; the sampler grid is kept as sigmas rather than
scheduler timesteps divided by 1000 per pass; `clip_grad_norm_` gets the trainable tensors rather than every module
parameter (the same norm: the others have no gradient).

Documented departures of nftcore from this epoch (docs/ALGORITHM.md §7, §11.9, §11.12): nftcore drops filtered samples
*before* micro-batching (no forward for them) and divides every (sample, timestep) term by the global count of the
step's pairs; here every sample runs and each micro-batch's masked mean is divided by grad_accum · T_train, so a kept
sample weighs 1 / (grad_accum · T_train · kept samples of its micro-batch). With nothing filtered and full micro-batches
the two are the same gradient (tests/test_reference_epoch.py checks it, and the difference when they are not). Random
draws differ (nftcore seeds per sample); `ReferenceEpoch.update` accepts explicit `Draws` so a test can give both sides
the same ones. The Qwen reference uses the single-image `QwenImageEditPipeline` (the Edit-R1 recipe targets -2509
"Plus", whose diffusers `encode_prompt` shows every image of a batch to every prompt; Edit-R1 patches that per sample),
so `qwen_small` is built on a Qwen-Image-Edit folder on both sides. Prompt bans (the Qwen recipe's `filter.ban_prompts`)
are not applied here: a ban needs a group mean above `filter.mean_threshold` (0.9), which the benchmark's tiny random
judge does not give, so both sides draw the same rows every epoch.

How tests and benchmarks are organised: docs/DESIGN.md §8.
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Conditioning fields with a batch dimension (the rest, ids and image shapes, are shared by every sample).
PER_SAMPLE = ("src", "encoder_hidden_states", "pooled_projections", "guidance", "encoder_hidden_states_mask")
QWEN_TEXT_TOKENS = 256  # Edit-R1's cap on Qwen2.5-VL tokens after the template drop (nftcore uses the same)
OLD_DECAY_PRESETS = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}  # the scripts' return_decay


def demo_args(out: Path, smoke: bool) -> list[str]:
    """The demo recipe as it is, minus evaluation, progress bars and checkpoints (not part of an epoch); `smoke`: the
    tiny policy, K = G = 2, 2 sampler steps. bench/bench_epoch.py's `demo` config and tests/test_reference_epoch.py's
    base."""
    args = ["--config=demo", f"--run.out={out}", "--run.overwrite=true", "--eval.every=0", "--metrics.progress=false",
            "--metrics.image_every=0", "--checkpoint.save_every=0"]
    if smoke:
        args += ["--model.path=tiny", "--sampling.group_size=2", "--sampling.groups_per_epoch=2",
                 "--sampling.batch_size=2", "--sampling.num_steps=2", "--optim.steps_per_epoch=1", "--lora.rank=2",
                 "--lora.alpha=4"]
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dpm2_rollout(velocity: Callable, x: torch.Tensor, sigmas: list[float], sigma_t: torch.Tensor) -> torch.Tensor:
    """The official deterministic dpm2 rollout, written out: first step DDIM in data-prediction form, then
    DPM-Solver++(2M) with lambda = log((1 - s) / s); the step to 0 returns the last x0 prediction. `sigma_t` holds
    the same grid on the device (the pipeline's timesteps live there)."""
    prev_x0, prev_lam = None, None
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        x0 = x - s * velocity(x, sigma_t[i])
        if s_next == 0.0:
            return x0
        lam = -math.inf if s >= 1.0 else math.log((1.0 - s) / s)
        lam_next = math.log((1.0 - s_next) / s_next)
        h = lam_next - lam
        if prev_x0 is None or not math.isfinite(lam):
            d = x0  # first order
        else:
            r0 = (lam - prev_lam) / h
            d = x0 + 0.5 / r0 * (x0 - prev_x0)
        x = (s_next / s) * x - (1.0 - s_next) * math.expm1(-h) * d
        prev_x0, prev_lam = x0, lam
    return x


def to_uint8_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> PIL images, as the official client does before JPEG encoding."""
    from PIL import Image

    arr = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def judge_reward(scorer, edited: torch.Tensor, samples) -> torch.Tensor:
    """The `generate(max_new_tokens=1, output_logits=True)` scorer (bench/bench_scorer.py's baseline) on uint8 PIL
    images."""
    from nftcore.testing.reference_judge import generate_scores
    from nftcore.utils.qwen_vl import build_processor

    processor = build_processor(scorer.tokenizer, scorer.image_processor)
    return generate_scores(scorer, processor, to_uint8_pil(edited), [s.image for s in samples],
                           [s.prompt for s in samples], [s.requirement for s in samples]).float()


# ================================================================================================== frontends


class FluxCall:
    """`FluxTransformer2DModel` on [x ; source] tokens, as `FluxKontextPipeline` and the Kontext script call it."""

    kind = "flux"

    @staticmethod
    def call(model, hidden: torch.Tensor, t: torch.Tensor, cond: dict, dtype: torch.dtype) -> torch.Tensor:
        return model(hidden_states=hidden, timestep=t, guidance=cond["guidance"],
                     encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                     pooled_projections=cond["pooled_projections"].to(dtype), img_ids=cond["img_ids"],
                     txt_ids=cond["txt_ids"], return_dict=False)[0]

    @staticmethod
    def collate(conds: list[dict]) -> dict:
        return {key: (torch.cat([c[key] for c in conds]) if key in PER_SAMPLE and conds[0][key] is not None
                      else conds[0][key]) for key in conds[0]}


class DemoFrontend(FluxCall):
    """The demo's frozen parts: its own text encoder and pixel patching (nothing in diffusers corresponds), the
    verifier, the sigma grid; the transformer exported with `save_pretrained` and loaded as diffusers'
    `FluxTransformer2DModel`."""

    def __init__(self, cfg, device: torch.device, tmp: Path):
        from diffusers import FluxTransformer2DModel

        from nftcore.demo.family import DemoFamily, DemoReward

        family = DemoFamily(cfg, device)  # a fresh copy: base weights without the trainer's LoRA
        self.family, self.dataset, self.device = family, family.train_dataset, device
        folder = Path(tmp) / "demo-transformer"
        family.transformer.save_pretrained(folder)
        dtype = DTYPES[cfg.model.dtype]
        self.transformer = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(device)
        self.sigmas = family.sigmas(cfg.sampling.num_steps).double().cpu()
        self.verifier = DemoReward()
        self.shape = family.latent_shape

    def encode(self, samples, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        c = self.family.conditioning(samples)
        noise = torch.randn((len(samples), *self.shape), generator=generator, device=generator.device)
        return noise.to(self.device), {"src": c.source_latents, "encoder_hidden_states": c.prompt_embeds,
                                       "pooled_projections": c.pooled_prompt_embeds, "guidance": None,
                                       "img_ids": c.img_ids, "txt_ids": c.txt_ids}

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.family.decode(x0).cpu()

    def reward(self, edited: torch.Tensor, samples) -> torch.Tensor:
        return self.verifier(edited, self.family.source_images(samples).cpu(), [s.prompt for s in samples],
                             [self.family.reward_metadata(s) for s in samples]).scores.float()


class KontextFrontend(FluxCall):
    """FLUX.1-Kontext through diffusers' `FluxKontextPipeline` (encode_prompt, prepare_latents, scheduler, VAE
    decode) and the `generate()` judge of `reference_judge.py`."""

    def __init__(self, cfg, device: torch.device, judge_folder: Path, scorer=None):
        import numpy as np
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            FluxKontextPipeline,
            FluxTransformer2DModel,
        )
        from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        from nftcore.data import EditDataset
        from nftcore.reward import MLLMScorer
        from nftcore.trainer.edit_family import KONTEXT_T5_TOKENS

        dtype, folder = DTYPES[cfg.model.dtype], Path(cfg.model.path)
        self.pipe = FluxKontextPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
            vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype),
            tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=dtype),
            tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
            transformer=FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype),
        ).to(device)
        for module in (self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.transformer):
            module.requires_grad_(False).eval()
        self.transformer, self.device, self.size = self.pipe.transformer, device, cfg.sampling.resolution
        self.max_sequence_length, self.guidance = KONTEXT_T5_TOKENS, cfg.sampling.guidance_scale
        self.dataset = EditDataset(Path(cfg.data.path), "train", resolution=self.size)
        n = cfg.sampling.num_steps
        seq = (self.size // (self.pipe.vae_scale_factor * 2)) ** 2
        sc = self.pipe.scheduler.config
        mu = calculate_shift(seq, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        retrieve_timesteps(self.pipe.scheduler, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        self.sigmas = self.pipe.scheduler.sigmas.double().cpu()  # N + 1 values, the last 0
        self.scorer = scorer or MLLMScorer.from_pretrained(judge_folder, device=device)

    @torch.no_grad()
    def encode(self, samples, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        pipe, b = self.pipe, len(samples)
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=[s.prompt for s in samples], prompt_2=None,
                                                      device=self.device, max_sequence_length=self.max_sequence_length)
        image = pipe.image_processor.preprocess([s.image for s in samples], self.size, self.size)
        noise, source, latent_ids, image_ids = pipe.prepare_latents(
            image, b, pipe.transformer.config.in_channels // 4, self.size, self.size, embeds.dtype, self.device,
            generator)
        guidance = torch.full([b], self.guidance, device=self.device, dtype=torch.float32) \
            if pipe.transformer.config.guidance_embeds else None
        return noise.float(), {"src": source, "encoder_hidden_states": embeds, "pooled_projections": pooled,
                               "guidance": guidance, "img_ids": torch.cat([latent_ids, image_ids]), "txt_ids": text_ids}

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(x0.to(vae.dtype), self.size, self.size, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pt").float().cpu()

    def reward(self, edited: torch.Tensor, samples) -> torch.Tensor:
        return judge_reward(self.scorer, edited, samples)


class QwenFrontend:
    """Qwen-Image-Edit through diffusers' `QwenImageEditPipeline` (encode_prompt with the source image,
    prepare_latents, scheduler, VAE decode), the transformer `QwenImageTransformer2DModel`, and the `generate()`
    judge. The source enters the VAE and the VL encoder at the training resolution (Edit-R1's max_area), as
    nftcore's family does."""

    kind = "qwen"

    def __init__(self, cfg, device: torch.device, judge_folder: Path, scorer=None):
        import numpy as np
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImageEditPipeline,
            QwenImageTransformer2DModel,
        )
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift, retrieve_timesteps
        from transformers import Qwen2_5_VLForConditionalGeneration

        from nftcore.data import EditDataset
        from nftcore.reward import MLLMScorer
        from nftcore.utils.qwen_vl import load_qwen_vl_processor

        dtype, folder = DTYPES[cfg.model.dtype], Path(cfg.model.path)
        processor = load_qwen_vl_processor(folder / "processor")
        processor.tokenizer.padding_side = "right"
        self.pipe = QwenImageEditPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
            vae=AutoencoderKLQwenImage.from_pretrained(folder / "vae", torch_dtype=dtype),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=dtype),
            tokenizer=processor.tokenizer, processor=processor,
            transformer=QwenImageTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype),
        ).to(device)
        for module in (self.pipe.vae, self.pipe.text_encoder, self.pipe.transformer):
            module.requires_grad_(False).eval()
        self.transformer, self.device, self.size = self.pipe.transformer, device, cfg.sampling.resolution
        self.dataset = EditDataset(Path(cfg.data.path), "train", resolution=self.size)
        tokens = self.size // (self.pipe.vae_scale_factor * 2)
        self.img_shapes = [(1, tokens, tokens), (1, tokens, tokens)]  # [target, source], square at the resolution
        n = cfg.sampling.num_steps
        sc = self.pipe.scheduler.config
        mu = calculate_shift(tokens * tokens, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        retrieve_timesteps(self.pipe.scheduler, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        self.sigmas = self.pipe.scheduler.sigmas.double().cpu()
        vae = self.pipe.vae.config
        self.latents_mean = torch.tensor(vae.latents_mean).view(1, vae.z_dim, 1, 1, 1).to(device, dtype)
        self.latents_std = torch.tensor(vae.latents_std).view(1, vae.z_dim, 1, 1, 1).to(device, dtype)
        self.scorer = scorer or MLLMScorer.from_pretrained(judge_folder, device=device)

    @torch.no_grad()
    def encode(self, samples, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        pipe, b, size = self.pipe, len(samples), self.size
        images = [pipe.image_processor.resize(s.image, size, size) for s in samples]
        embeds, mask = pipe.encode_prompt(prompt=[s.prompt for s in samples], image=images, device=self.device)
        if embeds.shape[1] > QWEN_TEXT_TOKENS:
            embeds = embeds[:, :QWEN_TEXT_TOKENS]
            mask = None if mask is None else mask[:, :QWEN_TEXT_TOKENS]
        pixels = pipe.image_processor.preprocess(images, size, size).unsqueeze(2)
        noise, source = pipe.prepare_latents(pixels, b, pipe.transformer.config.in_channels // 4, size, size,
                                             embeds.dtype, self.device, generator)
        return noise.float(), {"src": source, "encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
                               "img_shapes": self.img_shapes}

    @staticmethod
    def call(model, hidden: torch.Tensor, t: torch.Tensor, cond: dict, dtype: torch.dtype) -> torch.Tensor:
        return model(hidden_states=hidden, timestep=t, guidance=None,
                     encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
                     encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                     img_shapes=[cond["img_shapes"]] * hidden.shape[0], return_dict=False)[0]

    @staticmethod
    def collate(conds: list[dict]) -> dict:
        """Rollout batches one after another; text right-padded to the longest with a 0 mask (None: all real)."""
        longest = max(c["encoder_hidden_states"].shape[1] for c in conds)
        embeds, masks = [], []
        for c in conds:
            e, m = c["encoder_hidden_states"], c["encoder_hidden_states_mask"]
            if m is None:
                m = torch.ones(e.shape[:2], dtype=torch.long, device=e.device)
            embeds.append(torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])))
            masks.append(torch.nn.functional.pad(m, (0, longest - e.shape[1])))
        mask = torch.cat(masks)
        return {"src": torch.cat([c["src"] for c in conds]), "encoder_hidden_states": torch.cat(embeds),
                "encoder_hidden_states_mask": None if bool(mask.all()) else mask, "img_shapes": conds[0]["img_shapes"]}

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(x0.to(vae.dtype), self.size, self.size, pipe.vae_scale_factor)
        latents = latents / (1.0 / self.latents_std) + self.latents_mean
        images = vae.decode(latents, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(images, output_type="pt").float().cpu()

    def reward(self, edited: torch.Tensor, samples) -> torch.Tensor:
        return judge_reward(self.scorer, edited, samples)


# ================================================================================================== advantages


def official_advantages(scores: torch.Tensor, k: int, cfg) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(advantages fp64 [n], valid mask bool [n], filtered fraction): the official PerPromptStatTracker arithmetic
    (numpy, ddof 0; groups are the consecutive K samples) and the low-variance rule of `cfg.filter.rule` as a mask."""
    import numpy as np

    s = scores.double().cpu().numpy()
    grouped = s.reshape(-1, k)
    mean = np.repeat(grouped.mean(axis=1), k)
    gstd = np.repeat(grouped.std(axis=1), k)
    std = (s.std() + 1e-4) if cfg.nft.global_std else (gstd + 1e-4)
    advantages = (s - mean) / std
    f = cfg.filter
    if f.rule == "paper":
        mask = ~((mean > f.mean_threshold) & (gstd < f.std_threshold))
    elif f.rule == "code":  # the Qwen script's ban_prompt mask
        mask = (gstd > f.std_threshold) & (mean < f.mean_threshold)
    else:
        mask = np.ones_like(s, dtype=bool)
    return torch.from_numpy(advantages), torch.from_numpy(mask), float(1.0 - mask.mean())


def optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """r of the scripts' training pass: clamp(clamp(A, ±A_max) / A_max / 2 + 0.5, 0, 1)."""
    return torch.clamp(torch.clamp(advantages, -adv_clip_max, adv_clip_max) / adv_clip_max / 2.0 + 0.5, 0, 1)


# ================================================================================================== the epoch


@dataclass
class Draws:
    """Explicit random draws for `ReferenceEpoch.update` (a test gives both sides the same ones): `order` [n] the
    training order of the epoch's samples (the scripts' `perm`), `timesteps` [n, ≥ T_train] sampler-step indices
    per *sample* (its first T_train are trained, in that order), `noise` [n, T_train, *latent] per sample, or None to
    draw each pass's noise on the device as the scripts do."""

    order: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor | None = None


class ReferenceEpoch:
    """The official-style epoch (see the module docstring) around a frontend's diffusers transformer.

    `run_epoch(epoch)` runs and times one epoch; its pieces are `rollout`, `official_advantages`, `update`
    (micro-batches → `accumulate` → `optimizer_step` per optimizer step) and `soft_update_old`."""

    name = "reference"

    def __init__(self, cfg, frontend, device: torch.device, init_adapters: dict[str, dict[str, torch.Tensor]]):
        from peft import LoraConfig, get_peft_model

        self.cfg, self.front, self.device = cfg, frontend, device
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.optim.allow_tf32
        names = sorted({k.rsplit(".lora_", 1)[0] for k in init_adapters["default"]})
        lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, init_lora_weights="gaussian",
                          target_modules=names)
        transformer = frontend.transformer
        if cfg.model.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.dtype = transformer.dtype  # read once: diffusers' `.dtype` walks every parameter
        self.model = get_peft_model(transformer, lora)
        self.model.add_adapter("old", lora)
        self.model.set_adapter("default")
        params = dict(self.model.named_parameters())
        with torch.no_grad():  # the trainer's initial adapters, so both sides start from the same weights
            for adapter, state in init_adapters.items():
                for key, value in state.items():
                    module, ab = key.rsplit(".lora_", 1)  # ab: "A.weight" / "B.weight"
                    params[f"base_model.model.{module}.lora_{ab[0]}.{adapter}.weight"].copy_(value)
        self.trainable = [p for n, p in self.model.named_parameters() if ".default." in n and p.requires_grad]
        if not self.trainable or len(self.trainable) != len(init_adapters["default"]):
            raise RuntimeError(f"PEFT adapter mismatch: {len(self.trainable)} trainable tensors, nftcore has "
                               f"{len(init_adapters['default'])}")
        self.trainable_names = [n.replace("base_model.model.", "").replace(".default", "")
                                for n, p in self.model.named_parameters() if ".default." in n and p.requires_grad]
        self.old_params = [params[n.replace(".default.", ".old.")] for n, p in self.model.named_parameters()
                           if ".default." in n and p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                           eps=o.eps)
        self.ema = [p.detach().clone() for p in self.trainable]
        self.step = 0
        self.sigma_list = [float(s) for s in frontend.sigmas.tolist()]
        self.sigma_t = frontend.sigmas.to(device, torch.float32)  # the pipeline's grid on the device
        self.grid = self.sigma_t[:-1]  # training noises at the sampler's sigmas
        self.t_train = cfg.train_timesteps
        self.reward_fn = frontend.reward
        self.grad_norms: list[torch.Tensor] = []
        self.step_logs: list[dict[str, float]] = []
        self.filtered = 0.0

    def autocast(self):
        if self.cfg.optim.mixed_precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer on [x ; source] tokens, sliced to the target (the pipelines' and the scripts' call); the
        same dtype casts as nftcore's `EditVelocity` (no-ops when the weights are fp32)."""
        dtype = self.dtype
        hidden = x.to(dtype) if cond["src"] is None else torch.cat([x.to(dtype), cond["src"].to(dtype)], dim=1)
        out = self.front.call(self.model, hidden, t.expand(x.shape[0]), cond, dtype)
        return out[:, :x.shape[1]].to(x.dtype)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: dict) -> torch.Tensor:
        self.model.set_adapter("old")
        try:
            with self.autocast():
                return dpm2_rollout(lambda x, s: self.velocity(x, s, cond), noise, self.sigma_list, self.sigma_t)
        finally:
            self.model.set_adapter("default")

    # ---------------------------------------------------------------------------------------------- epoch

    def epoch_rows(self, epoch: int) -> list:
        cfg = self.cfg
        k, g = cfg.sampling.group_size, cfg.sampling.groups_per_epoch
        groups = self.front.dataset.epoch_prompts(g, epoch, cfg.run.seed)
        return [self.front.dataset[groups[i // k]] for i in range(g * k)]

    def rollout(self, epoch: int) -> tuple[torch.Tensor, dict, torch.Tensor, float]:
        """(clean latents [n, ...], collated conditioning, scores [n], seconds spent waiting for rewards)."""
        cfg, bsz = self.cfg, self.cfg.sampling.batch_size
        rows = self.epoch_rows(epoch)
        latents, conds, futures = [], [], []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for b, start in enumerate(range(0, len(rows), bsz)):
                samples = rows[start:start + bsz]
                generator = torch.Generator(device=self.device).manual_seed(cfg.run.seed * 100003 + epoch * 1009 + b)
                noise, cond = self.front.encode(samples, generator)
                x0 = self.sample(noise, cond)
                futures.append(pool.submit(self.reward_fn, self.front.decode(x0), samples))
                latents.append(x0)
                conds.append(cond)
            sync(self.device)
            t0 = time.perf_counter()
            scores = torch.cat([f.result() for f in futures])
        return torch.cat(latents), self.front.collate(conds), scores, time.perf_counter() - t0

    def run_epoch(self, epoch: int) -> dict[str, float]:
        k = self.cfg.sampling.group_size
        steps = self.step
        self.grad_norms = []
        sync(self.device)
        t0 = time.perf_counter()
        x0, cond, scores, waited = self.rollout(epoch)
        t2 = time.perf_counter()
        advantages, valid, self.filtered = official_advantages(scores, k, self.cfg)
        self.update(epoch, x0, cond, advantages, valid)
        self.soft_update_old()
        sync(self.device)
        t3 = time.perf_counter()
        norm = float(self.grad_norms[-1]) if self.grad_norms else float("nan")  # read after the clock stops
        return {"rollout": t2 - t0 - waited, "reward": waited, "update": t3 - t2, "total": t3 - t0,
                "optimizer_steps": self.step - steps, "reward_mean": float(scores.double().mean()),
                "filtered": self.filtered, "grad_norm": norm}

    # ---------------------------------------------------------------------------------------------- update

    def update(self, epoch: int, x0_all: torch.Tensor, cond_all: dict, advantages: torch.Tensor,
               valid: torch.Tensor, draws: Draws | None = None) -> None:
        """Every optimizer step of the epoch: its share of the micro-batches through `accumulate`, then
        `optimizer_step` (grad_accum = micro-batches per optimizer step)."""
        micro, gen = self.micro_batches(epoch, x0_all, cond_all, advantages, valid, draws)
        steps = self.cfg.optim.steps_per_epoch
        for i in range(steps):
            self.accumulate(micro[i * len(micro) // steps:(i + 1) * len(micro) // steps], gen)
            self.optimizer_step()

    def micro_batches(self, epoch: int, x0_all: torch.Tensor, cond_all: dict, advantages: torch.Tensor,
                      valid: torch.Tensor, draws: Draws | None = None) -> tuple[list[dict], torch.Generator | None]:
        """The epoch's micro-batches in training order, as the scripts build them: one shuffle of every per-sample
        tensor (`v[perm]`, timesteps permuted per sample), then contiguous slices of `sampling.batch_size` (views);
        and the generator the passes draw their noise from (None with explicit `draws`)."""
        cfg, dev = self.cfg, self.device
        n, bsz = x0_all.shape[0], cfg.sampling.batch_size
        if n % bsz:
            raise ValueError(f"{n} samples do not split into micro-batches of {bsz} (the scripts need G·K = "
                             "batches × batch size)")
        if draws is None:  # the scripts' draws, on the device
            gen = torch.Generator(device=dev).manual_seed(cfg.run.seed * 7919 + epoch)
            perm = torch.randperm(n, generator=gen, device=dev)
            perms_time = torch.stack([torch.randperm(cfg.sampling.num_steps, generator=gen, device=dev)
                                      for _ in range(n)])
            times, noise = self.grid[perms_time], None
        else:
            gen = None
            perm = draws.order.to(dev)
            times = self.grid[draws.timesteps.to(dev)[perm]]
            noise = None if draws.noise is None else draws.noise.to(dev)[perm]
        x0 = x0_all[perm]
        cond = {key: (v[perm] if key in PER_SAMPLE and v is not None else v) for key, v in cond_all.items()}
        adv = advantages.to(dev)[perm]
        keep_host = valid.cpu()[perm.cpu()]
        keep = keep_host.to(dev).float()
        micro = []
        for i in range(n // bsz):
            rows = slice(i * bsz, (i + 1) * bsz)
            micro.append({"x0": x0[rows], "cond": {key: (v[rows] if key in PER_SAMPLE and v is not None else v)
                                                   for key, v in cond.items()},
                          "adv": adv[rows], "keep": keep[rows], "any_kept": bool(keep_host[rows].any()),
                          "t": times[rows], "noise": None if noise is None else noise[rows]})
        return micro, gen

    def accumulate(self, micro: list[dict], gen: torch.Generator | None = None) -> torch.Tensor:
        """Forward/backward of one optimizer step's micro-batches, T_train passes each (the scripts' inner loops);
        returns the sum of the scaled losses (Σ loss / (grad_accum · T_train)), detached."""
        effective = len(micro) * self.t_train
        total, info = None, {}
        for mb in micro:
            for j in range(self.t_train):
                noise = None if mb["noise"] is None else mb["noise"][:, j]
                loss, terms = self.nft_pass(mb, j, noise, gen)
                scaled = loss / effective
                scaled.backward()
                total = scaled.detach() if total is None else total + scaled.detach()
                for key, value in terms.items():
                    info.setdefault(key, []).append(value)
        names = sorted(info)
        values = torch.stack([torch.stack(info[k]).double().mean() for k in names]).tolist()  # one read per step
        self.step_logs.append(dict(zip(names, values)))
        return total

    def nft_pass(self, mb: dict, j: int, noise: torch.Tensor | None, gen: torch.Generator | None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One (micro-batch, timestep) pass of the scripts: x_t, the old / θ / reference forwards, the loss."""
        nft = self.cfg.nft
        x0, cond = mb["x0"], mb["cond"]
        t = mb["t"][:, j]
        t_expanded = t.view(-1, *([1] * (x0.ndim - 1)))
        if noise is None:
            noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=torch.float32)  # randn_like(x0)
        xt = (1 - t_expanded) * x0 + t_expanded * noise.to(x0.dtype)
        with self.autocast():
            self.model.set_adapter("old")
            with torch.no_grad():
                old_prediction = self.velocity(xt, t, cond).detach()
            self.model.set_adapter("default")
            forward_prediction = self.velocity(xt, t, cond)
            ref_prediction = None
            if nft.kl_weight > 0:
                with torch.no_grad():
                    with self.model.disable_adapter():
                        ref_prediction = self.velocity(xt, t, cond)
                    self.model.set_adapter("default")
        return official_loss(forward_prediction, old_prediction, ref_prediction, xt, x0, t_expanded, mb["adv"],
                             mb["keep"], mb["any_kept"], nft)

    def optimizer_step(self) -> None:
        max_norm = self.cfg.optim.max_grad_norm
        self.grad_norms.append(torch.nn.utils.clip_grad_norm_(self.trainable,
                                                              max_norm if max_norm > 0 else float("inf")))
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        self.ema_step()

    @torch.no_grad()
    def ema_step(self) -> None:
        """flow_grpo's EMAModuleWrapper.step, one tensor at a time."""
        one_minus_decay = 1 - min((1 + self.step) / (10 + self.step), self.cfg.nft.ema_decay)
        for ema, p in zip(self.ema, self.trainable):
            if p.requires_grad:
                ema.add_(one_minus_decay * (p - ema))

    @torch.no_grad()
    def soft_update_old(self) -> None:
        """The scripts' end-of-epoch update: old ← old·η + θ·(1 − η), η = return_decay(step, decay_type)."""
        flat, rate, cap = OLD_DECAY_PRESETS[self.cfg.nft.decay_type]
        decay = 0.0 if self.step < flat else min((self.step - flat) * rate, cap)
        for src, tgt in zip(self.trainable, self.old_params):
            tgt.data.copy_(tgt.detach().data * decay + src.detach().clone().data * (1.0 - decay))


def official_loss(forward_prediction, old_prediction, ref_prediction, xt, x0, t_expanded, advantages, valid_mask,
                  any_valid: bool, nft) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scripts' loss of one pass, line by line (β = nft.beta, KL weight = nft.kl_weight, A_max =
    nft.adv_clip_max; nft.negative_weight multiplies the negative branch when it is not 1, which the scripts lack).
    `any_valid` is the scripts' `mask.sum() != 0`, known on the host. Returns (loss, logged terms)."""
    beta, a_max = nft.beta, nft.adv_clip_max
    dims = tuple(range(1, x0.ndim))

    def mean_by_mask(x, mask):
        if not any_valid:
            return x.sum() * 0
        return x.sum() / mask.sum()

    r = optimality(advantages, a_max)
    terms = {"x0_norm": torch.mean(x0 ** 2).detach(), "x0_norm_max": torch.max(x0 ** 2).detach(),
             "old_deviate": torch.mean((forward_prediction - old_prediction) ** 2).detach(),
             "old_deviate_max": torch.max((forward_prediction - old_prediction) ** 2).detach()}
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = torch.abs(x0_prediction.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=dims)
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = torch.abs(negative_x0_prediction.double() - x0.double()).mean(
            dim=dims, keepdim=True).clip(min=0.00001)
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=dims)
    if nft.negative_weight != 1.0:
        negative_loss = nft.negative_weight * negative_loss
    ori_policy_loss = r * positive_loss * valid_mask / beta + (1.0 - r) * negative_loss * valid_mask / beta
    policy_loss = mean_by_mask(ori_policy_loss * a_max, valid_mask)
    loss = policy_loss
    terms["policy_loss"] = policy_loss.detach()
    terms["unweighted_policy_loss"] = mean_by_mask(ori_policy_loss, valid_mask).detach()
    if ref_prediction is not None:
        kl_div_loss = ((forward_prediction - ref_prediction) ** 2).mean(dim=dims) * valid_mask
        loss = loss + nft.kl_weight * mean_by_mask(kl_div_loss, valid_mask)
        terms["kl_div_loss"] = mean_by_mask(kl_div_loss, valid_mask).detach()
        terms["kl_div"] = mean_by_mask(((forward_prediction - ref_prediction) ** 2).mean(dim=dims) * valid_mask,
                                       valid_mask).detach()
        terms["old_kl_div"] = mean_by_mask(((old_prediction - ref_prediction) ** 2).mean(dim=dims) * valid_mask,
                                           valid_mask).detach()
    terms["total_loss"] = loss.detach()
    return loss, terms


def initial_adapters(weights) -> dict[str, dict[str, torch.Tensor]]:
    """nftcore's initial adapter tensors ("default" and "old", by PEFT name) as plain CPU copies."""
    return {name: {k: v.detach().cpu().clone() for k, v in weights.state(name).items()} for name in ("default", "old")}


def frontend_for(cfg, device: torch.device, tmp: Path, judge: Path | None, scorer=None) -> Any:
    """The frontend of the config's model family (`scorer`: an already loaded judge at `judge`, to share)."""
    if cfg.model.family == "demo":
        return DemoFrontend(cfg, device, tmp)
    if cfg.model.family == "flux":
        return KontextFrontend(cfg, device, judge, scorer)
    return QwenFrontend(cfg, device, judge, scorer)
