"""Named recipes: functions that return a complete `TrainConfig`.

`demo` (the default; the field defaults) is the embedded CPU run, tuned so that the reward visibly rises within
minutes on two cores (bench/RESULTS.md, "Embedded demo"). `kontext_edit_r1` and `qwen_image_edit_r1` are Edit-R1 on
FLUX.1-Kontext-dev and Qwen-Image-Edit-2509 with every value of the official configs written out, so that tuning the
demo cannot move them. docs/ALGORITHM.md §10 tabulates the recipes, §11 their deliberate departures from the official
configs (§11.2 filter rule, §11.3 sample-id keying, §11.7 bf16 Kontext), each one flag away.
"""

from __future__ import annotations

from collections.abc import Callable

from nftcore.config.errors import ConfigError, did_you_mean
from nftcore.config.sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FilterConfig,
    LoRAConfig,
    MetricsConfig,
    ModelConfig,
    NFTConfig,
    OptimConfig,
    ParallelConfig,
    RewardConfig,
    RunConfig,
    SamplingConfig,
    TrainConfig,
)

DEFAULT_RECIPE = "demo"


def demo() -> TrainConfig:
    """The embedded CPU demo; the field defaults are exactly this recipe."""
    return TrainConfig(recipe="demo")


def _edit_r1(name: str, *, family: str, path: str, guidance_scale: float | None, ban_prompts: bool,
             eval_batch_size: int, timestep_chunk: int) -> TrainConfig:
    """The Edit-R1 training set-up, shared by both recipes; the arguments are what differs between the two models."""
    return TrainConfig(
        recipe=name,
        run=RunConfig(name=name, out=f"runs/{name}", epochs=100_000, seed=42),  # the reference runs until stopped
        # LoRA, as Edit-R1. `--model.finetune=full` trains every weight (fp32 masters, FSDP2-sharded: the transformer
        # must then be sharded, --parallel.shard_transformer=true; memory plan in docs/TRAINING.md).
        model=ModelConfig(family=family, finetune="lora", path=path, dtype="bf16", gradient_checkpointing=True),
        lora=LoRAConfig(rank=32, alpha=64.0, init="gaussian", include_mlp=False),
        sampling=SamplingConfig(
            group_size=12,
            groups_per_epoch=24,
            batch_size=3,
            num_steps=6,
            solver="dpm2",
            resolution=512,
            guidance_scale=guidance_scale,
        ),
        nft=NFTConfig(
            beta=1.0,
            kl_weight=1e-4,
            adv_clip_max=5.0,
            negative_weight=1.0,
            global_std=True,
            singleton="error",
            timestep_fraction=0.99,  # int(6 × 0.99) = 5 of the 6 sampler timesteps per sample
            decay_type=1,  # η = min(0.001·step, 0.5)
            ema_decay=0.9,
            timestep_chunk=timestep_chunk,
        ),
        # The reference serves the 32B judge with vLLM on 8 GPUs of their own; it does not fit beside the policy.
        reward=RewardConfig(backend="server", model="Qwen/Qwen2.5-VL-32B-Instruct", server_url="", timeout_s=300.0,
                            max_retries=3),
        filter=FilterConfig(rule="paper", mean_threshold=0.9, std_threshold=0.05, ban_prompts=ban_prompts),
        optim=OptimConfig(lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8, max_grad_norm=1.0,
                          steps_per_epoch=1, mixed_precision="bf16", allow_tf32=True),
        # As the reference: FSDP2 on the frozen text encoders, the transformer replicated (DDP-style all-reduce).
        parallel=ParallelConfig(backend="auto", shard_text_encoder=True, shard_transformer=False, cpu_offload=False),
        checkpoint=CheckpointConfig(save_every=30, keep_latest=0, resume="", export_lora=True),
        metrics=MetricsConfig(log_every=1, image_every=10, wandb=False, wandb_project="nftcore", tensorboard=False,
                              progress=True),
        eval=EvalConfig(every=10, num_steps=15, solver="euler", batch_size=eval_batch_size, max_samples=0),
        # Each row's T5 / Qwen2.5-VL output on disk (≈1.3-2 MiB a row at 512²; host RAM on 8 ranks would hold it 8
        # times): encoded once, then read back; `python -m nftcore.precompute` fills it before the run.
        data=DataConfig(path="data/edit-r1-dataset", num_workers=2, cache_conditioning="disk"),
    )


def kontext_edit_r1() -> TrainConfig:
    """Edit-R1 on FLUX.1-Kontext-dev (reference: 24 GPUs, so 4 micro-batches × 5 timesteps per step).

    All 5 timesteps of a micro-batch go through one forward/backward: the replicated 12B transformer leaves room for
    5x the activations (~50 of 80 GB, docs/TRAINING.md's Kontext memory plan).
    """
    return _edit_r1("kontext_edit_r1", family="flux", path="black-forest-labs/FLUX.1-Kontext-dev",
                    guidance_scale=2.5, ban_prompts=False, eval_batch_size=3, timestep_chunk=0)


def qwen_image_edit_r1() -> TrainConfig:
    """Edit-R1 on Qwen-Image-Edit-2509 (reference: 48 GPUs, so 2 micro-batches × 5 timesteps per step).

    The evaluation batch is 1: the reference halves its batch of 3 (integer division) above 32 GPUs. One timestep per
    pass: a replicated 20B transformer has no room for 5x the activations (docs/TRAINING.md's memory plan); sharded
    runs can raise `nft.timestep_chunk`.
    """
    return _edit_r1("qwen_image_edit_r1", family="qwen_image", path="Qwen/Qwen-Image-Edit-2509",
                    guidance_scale=None, ban_prompts=True, eval_batch_size=1, timestep_chunk=1)


RECIPES: dict[str, Callable[[], TrainConfig]] = {f.__name__: f for f in (demo, kontext_edit_r1, qwen_image_edit_r1)}


def build_recipe(name: str) -> TrainConfig:
    """A fresh config from recipe `name`; ConfigError listing the recipes (with a suggestion) if unknown."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}{did_you_mean(str(name), RECIPES)}; recipes: {', '.join(RECIPES)}")
    return RECIPES[name]()
