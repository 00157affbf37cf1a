"""The trainer's configuration: one typed dataclass per concern, and `TrainConfig` that holds one of each.

Why dataclasses with a help string per field (torchtitan style): tyro builds the command line from the types and
the help strings (`--help`), `validate` checks the values (typeguard the types, against the real annotations: this
module does not postpone them), and a typo is an error instead of a silently ignored attribute (`slots=True`). The
field defaults are the `demo` recipe (the embedded CPU run), so `TrainConfig()` is the default config; the Edit-R1
recipes in `recipes.py` spell out every value of the official configs explicitly rather than inheriting them from
here, so tuning the demo can never move a published recipe.

Names follow the rest of nftcore: `nft.beta` / `nft.kl_weight` / `nft.adv_clip_max` / `nft.negative_weight` are
`nft_loss`'s arguments, `filter.rule` / `mean_threshold` / `std_threshold` are `low_variance_filter`'s,
`nft.decay_type` is `OldPolicySchedule.preset`'s, `sampling.solver` is a key of `nftcore.sampling.SOLVERS`, and
`lora.*` are `apply_lora`'s. The two "betas" of the reference code are `nft.beta` and `nft.kl_weight` here (§11.1).
"""

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from typeguard import TypeCheckError, check_type
from tyro.conf import Suppress

from nftcore.config.batching import plan_problem, train_timesteps
from nftcore.config.errors import ConfigError, UnsupportedConfigError, did_you_mean


def option(default: Any, help: str) -> Any:
    """A config field with its `--help` text (kept in the field's metadata, so it is there at run time)."""
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where a run writes and how long it goes."""

    name: str = option("demo", "Run name, for logs and trackers.")
    out: str = option("runs/demo", "Output folder: metrics in OUT/metrics.jsonl, checkpoints under OUT/checkpoints/ "
                                   "(a fixed layout that scripts rely on).")
    epochs: int = option(100, "Epochs to train. One epoch: G·K rollouts, their rewards, then optim.steps_per_epoch "
                            "optimizer steps. The reference runs until stopped (an 'epoch' is its 'step').")
    seed: int = option(42, "Base seed. Prompt order, rollout noise, training timesteps and training noise are "
                           "all seeded per sample from (seed, epoch, global sample index), so results do not depend on "
                           "the number of ranks.")
    overwrite: bool = option(False, "Start a new run in a run.out folder that already holds one (metrics, "
                                    "checkpoints): its files are deleted first. Without it such a folder is refused "
                                    "unless the run resumes (--resume).")

    @property
    def metrics_path(self) -> Path:
        return Path(self.out) / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out) / "checkpoints"

    def problems(self) -> list[str]:
        return _failed({
            "run.out must not be empty": bool(self.out),
            f"run.epochs must be ≥ 1, got {self.epochs}": self.epochs >= 1,
            f"run.seed must be in [0, 2**63), got {self.seed}": 0 <= self.seed < 2**63,
        })


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The policy transformer: which one, and how it is held in memory."""

    family: Literal["demo", "flux", "qwen_image"] = option(
        "demo", "Transformer family: 'flux' (FLUX.1-Kontext), 'qwen_image' (Qwen-Image-Edit), or 'demo' (the "
                "embedded tiny CPU model).")
    path: str = option("", "Pretrained diffusers pipeline: a local folder, or a Hugging Face id already in the local "
                           "cache (nothing is downloaded); empty for the 'demo' base.")
    finetune: Literal["lora", "full"] = option(
        "lora", "What trains: 'lora' (Edit-R1: adapters on the frozen transformer) or 'full' (every transformer "
                "weight, kept as fp32 masters with fp32 AdamW moments; θ_old and the reference are model.dtype "
                "copies, the EMA fp32). 'full' on more than one rank needs parallel.shard_transformer = true; "
                "docs/TRAINING.md has the memory plan.")
    dtype: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "Storage dtype of the frozen base weights (LoRA adapters are always fp32). With model.finetune = "
                "'full' the compute dtype of the forwards (the trained weights stay fp32) and the storage of the "
                "θ_old and reference copies. The reference loads Kontext in fp32, ~24 GB more per GPU than bf16 "
                "(§11.7).")
    gradient_checkpointing: bool = option(
        False, "Recompute each block's activations in backward; needed to fit the 12B/20B models at 512².")

    def problems(self) -> list[str]:
        return _failed({
            f"model.path must name the pretrained {self.family} pipeline": self.family == "demo" or bool(self.path),
        })


@dataclass(kw_only=True, slots=True)
class LoRAConfig:
    """The trained adapter ("default") and its rollout twin ("old"), same shape."""

    rank: int = option(16, "LoRA rank r.")
    alpha: float = option(32.0, "LoRA α; the update is scaled by α / r.")
    init: Literal["gaussian", "zeros"] = option(
        "gaussian", "'gaussian': A ~ N(0, 1/r²), B = 0 (PEFT's init, so training starts at the base model); 'zeros'.")
    include_mlp: bool = option(
        True, "Also adapt the MLPs. Edit-R1 adapts only the attention projections (q, k, v, out, and the text "
              "stream's add_q/k/v and to_add_out); the demo's ≈ 0.5 M-parameter transformer learns faster with both.")

    def problems(self) -> list[str]:
        return _failed({
            f"lora.rank must be ≥ 1, got {self.rank}": self.rank >= 1,
            f"lora.alpha must be > 0, got {self.alpha}": self.alpha > 0,
        })


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    """Rollouts: how many per epoch, in which batches, and the ODE that makes them."""

    group_size: int = option(8, "K: images sampled per prompt, one group. Advantages are relative within a group, so "
                                "K ≥ 2.")
    groups_per_epoch: int = option(8, "G: prompts (groups) per epoch; an epoch rolls out G·K images over all ranks.")
    batch_size: int = option(16, "Most images per rank per rollout call and per training micro-batch. Each rank's "
                                 "share of the epoch is cut into equal calls of at most this many, so any world size "
                                 "up to G·K runs the recipe unchanged (see batch_plan).")
    num_steps: int = option(6, "Rollout ODE steps. Training noises at exactly these sampler sigmas (§1.4).")
    solver: Literal["dpm2", "euler"] = option("dpm2", "Rollout solver (nftcore.sampling.SOLVERS).")
    resolution: int = option(16, "Square edge of source and edited images in pixels (center crop); the sigma shift "
                                 "keys on (resolution / 16)² target tokens. The demo policy works at its own size "
                                 "(16 px).")
    guidance_scale: float | None = option(
        None, "Distilled-guidance value fed to FLUX.1-Kontext's guidance embedding (2.5 in Edit-R1); none for models "
              "without one.")
    true_cfg_scale: float = option(1.0, "True classifier-free guidance of the rollouts. Training supports only 1.0 "
                                        "(Edit-R1 trains without it; `python -m nftcore.edit` has it for inference).")

    def problems(self) -> list[str]:
        return _failed({
            f"sampling.group_size (K) must be ≥ 2 for group-relative advantages, got {self.group_size}":
                self.group_size >= 2,
            f"sampling.groups_per_epoch (G) must be ≥ 1, got {self.groups_per_epoch}": self.groups_per_epoch >= 1,
            f"sampling.batch_size must be ≥ 1, got {self.batch_size}": self.batch_size >= 1,
            f"sampling.num_steps must be ≥ 1, got {self.num_steps}": self.num_steps >= 1,
            # 8× VAE downsampling, then 2×2 patches: anything else leaves a ragged token grid.
            f"sampling.resolution must be a positive multiple of 16, got {self.resolution}":
                self.resolution > 0 and self.resolution % 16 == 0,
            f"sampling.guidance_scale must be ≥ 0 or none, got {self.guidance_scale}":
                self.guidance_scale is None or self.guidance_scale >= 0,
            f"sampling.true_cfg_scale = {self.true_cfg_scale}: training with true CFG (a negative-prompt branch) "
            "is not implemented; Edit-R1 trains at 1.0": self.true_cfg_scale == 1.0,
        })


@dataclass(kw_only=True, slots=True)
class NFTConfig:
    """The DiffusionNFT objective, reward normalisation, and the two lagged copies of θ."""

    beta: float = option(0.1, "β, the NFT mixing strength: v⁺ = β·v_θ + (1−β)·v_old, v⁻ = (1+β)·v_old − β·v_θ. A "
                              "smaller β takes a bigger step. Not the KL weight (the reference calls both 'beta').")
    kl_weight: float = option(1e-4, "λ_KL: weight of the velocity L2 to the frozen base model (the reference's "
                                    "train.beta); 0 also skips the base-model forward.")
    adv_clip_max: float = option(5.0, "A_max: advantages are clipped to ±A_max before mapping to r ∈ [0, 1], and the "
                                      "policy loss is scaled by it (passed as nft_loss's loss_scale).")
    negative_weight: float = option(1.0, "Weight of the negative-branch term (1 − r)·L⁻ of the loss.")
    global_std: bool = option(True, "Scale advantages by the std of all rewards of the epoch (+1e-4) rather than each "
                                    "group's own std, so a near-constant group's judge noise is not blown up.")
    singleton: Literal["error", "global"] = option(
        "error", "A one-sample group: 'error' (broken grouping), or 'global' (measure it against the epoch mean).")
    timestep_fraction: float = option(
        0.99, "Share of the sampler timesteps trained per sample: T_train = int(num_steps × fraction); each sample "
              "drops a random rest (6 × 0.99 → 5).")
    decay_type: Literal[0, 1, 2] = option(
        1, "Rollout ('old') policy soft update θ_old ← η·θ_old + (1 − η)·θ after each epoch "
           "(OldPolicySchedule.preset): 0 η = 0 (on-policy copy), 1 η = min(0.001·step, 0.5), 2 flat 75 steps then "
           "+0.0075/step up to 0.999 (DiffusionNFT OCR).")
    ema_decay: float = option(0.9, "Decay of the EMA of θ used for evaluation and checkpoints (warm-up "
                                   "(1 + s)/(10 + s)). Not the rollout policy.")
    timestep_chunk: int = option(
        0, "Training timesteps stacked into one forward/backward: a micro-batch of B samples goes through θ as B × "
           "chunk rows. 0 stacks all T_train (fewest passes, most activation memory); 1 is one timestep per pass. "
           "The same loss and gradients either way; lower it when B × T_train rows do not fit.")

    def problems(self) -> list[str]:
        return _failed({
            f"nft.timestep_chunk must be ≥ 0, got {self.timestep_chunk}": self.timestep_chunk >= 0,
            f"nft.beta must be > 0, got {self.beta}": self.beta > 0,
            f"nft.kl_weight must be ≥ 0, got {self.kl_weight}": self.kl_weight >= 0,
            f"nft.adv_clip_max must be > 0, got {self.adv_clip_max}": self.adv_clip_max > 0,
            f"nft.negative_weight must be ≥ 0, got {self.negative_weight}": self.negative_weight >= 0,
            f"nft.timestep_fraction must be in (0, 1], got {self.timestep_fraction}": 0 < self.timestep_fraction <= 1,
            f"nft.ema_decay must be in [0, 1), got {self.ema_decay}": 0 <= self.ema_decay < 1,
        })


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    """The judge that scores each edit."""

    backend: Literal["demo", "local", "server"] = option(
        "demo", "'local': the MLLM judge in this process (frozen; a whole copy per rank, or sharded with "
                "parallel.shard_reward_model); 'server': an HTTP judge at server_url (as the reference, on separate "
                "GPUs); 'demo': the embedded synthetic reward.")
    model: str = option("", "Judge MLLM for 'local' (the score is E[digit]/5 over the tokens '0'–'5' of its answer).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Weights of the 'local' judge; 'auto' is bf16 on CUDA and fp32 on the CPU.")
    min_pixels: int = option(0, "Smallest image area the 'local' judge's processor resizes to (smart_resize); 0 keeps "
                                "the processor's own (stock Qwen2.5-VL: 56·56).")
    max_pixels: int = option(0, "Largest image area for the 'local' judge (a 512² edit is 324 image tokens at the "
                                "stock bound); 0 keeps the processor's own (stock: 28·28·1280).")
    server_url: str = option("", "host:port of the judge for 'server'; empty reads REWARD_SERVER from the environment.")
    timeout_s: float = option(300.0, "Seconds one scoring request may take before it is retried.")
    max_retries: int = option(3, "Retries of a failed scoring request; a group that still fails is dropped, never "
                                 "scored 0 (§11.4).")

    def problems(self) -> list[str]:
        return _failed({
            "reward.model must name the judge MLLM for the 'local' backend":
                self.backend != "local" or bool(self.model),
            f"reward.timeout_s must be > 0, got {self.timeout_s}": self.timeout_s > 0,
            f"reward.max_retries must be ≥ 0, got {self.max_retries}": self.max_retries >= 0,
            f"reward.min_pixels and reward.max_pixels must be ≥ 0, got {self.min_pixels} and {self.max_pixels}":
                self.min_pixels >= 0 and self.max_pixels >= 0,
            f"reward.min_pixels = {self.min_pixels} exceeds reward.max_pixels = {self.max_pixels}":
                not (self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels),
        })


@dataclass(kw_only=True, slots=True)
class FilterConfig:
    """Low-variance group filtering and the prompt ban."""

    rule: Literal["paper", "code", "none"] = option(
        "paper", "'paper': drop groups with mean > τμ AND std < τσ; 'code': keep only groups with std > τσ AND "
                 "mean < τμ (the official Qwen config's loss mask); 'none': keep all (the official Kontext config).")
    mean_threshold: float = option(0.9, "τμ, on the group mean of the raw rewards.")
    std_threshold: float = option(0.05, "τσ, on the group's population std of the raw rewards.")
    ban_prompts: bool = option(False, "Stop sampling, for good, a prompt whose group met the paper's AND rule "
                                      "(PromptBan).")

    def problems(self) -> list[str]:
        return _failed({
            f"filter.mean_threshold must be finite, got {self.mean_threshold}": math.isfinite(self.mean_threshold),
            f"filter.std_threshold must be finite and ≥ 0, got {self.std_threshold}":
                math.isfinite(self.std_threshold) and self.std_threshold >= 0,
        })


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """The optimizer step and numeric precision."""

    lr: float = option(3e-3, "AdamW learning rate, constant (the reference has no schedule).")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW (β1, β2), e.g. --optim.betas=0.9,0.999.")
    weight_decay: float = option(1e-4, "AdamW decoupled weight decay.")
    eps: float = option(1e-8, "AdamW ε.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this before each step; 0 turns clipping off.")
    steps_per_epoch: int = option(4, "Optimizer steps per epoch; the epoch's micro-batches are split evenly among them "
                                     "(the rest is gradient accumulation).")
    mixed_precision: Literal["no", "bf16"] = option("no", "Autocast dtype of the forwards: 'bf16' (Edit-R1) or 'no'.")
    allow_tf32: bool = option(True, "Allow TF32 matmuls and convolutions on CUDA.")

    def problems(self) -> list[str]:
        return _failed({
            f"optim.lr must be > 0, got {self.lr}": self.lr > 0,
            f"optim.betas must both be in [0, 1), got {self.betas}": all(0 <= b < 1 for b in self.betas),
            f"optim.weight_decay must be ≥ 0, got {self.weight_decay}": self.weight_decay >= 0,
            f"optim.eps must be > 0, got {self.eps}": self.eps > 0,
            f"optim.max_grad_norm must be ≥ 0, got {self.max_grad_norm}": self.max_grad_norm >= 0,
            f"optim.steps_per_epoch must be ≥ 1, got {self.steps_per_epoch}": self.steps_per_epoch >= 1,
        })


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the work spreads over ranks. The world size itself comes from the launcher (torchrun), not from here."""

    backend: Literal["auto", "nccl", "gloo"] = option(
        "auto", "torch.distributed backend; 'auto' is nccl with CUDA, gloo without.")
    shard_text_encoder: bool = option(False, "FSDP2-shard the frozen text encoder(s) over all ranks, one group per "
                                             "layer, as the reference does, instead of replicating them (FLUX: T5 + "
                                             "CLIP, Qwen-Image-Edit: Qwen2.5-VL). The demo's encoder is part of its "
                                             "tiny policy: true is an error there on more than one rank.")
    shard_transformer: bool = option(True, "FSDP2-shard the policy transformer per block; false replicates it and "
                                           "all-reduces the gradients (the reference's DDP). Sharding is for 1024² "
                                           "or larger models (§11.10).")
    shard_reward_model: bool = option(False, "FSDP2-shard the in-process MLLM judge (reward.backend='local') over "
                                             "all ranks, one group per layer, instead of a whole copy per rank. "
                                             "Each rank then scores its whole share on its main thread after its "
                                             "rollouts, in step with the others, no longer overlapped with them.")
    cpu_offload: bool = option(False, "Keep FSDP2-sharded parameters on the CPU between uses.")
    replicate_degree: int = option(1, "HSDP: this many replicas of the sharded transformer, each sharded over "
                                      "world_size / replicate_degree ranks (e.g. the node count, so parameters "
                                      "are gathered inside a node and gradients all-reduced across nodes); 1 = one "
                                      "FSDP2 group over all ranks.")
    rollout_reshard: Literal["step", "batch", "phase"] = option(
        "batch", "When FSDP2 drops the sharded transformer's gathered weights during rollouts: 'step' after every "
                 "sampler step (each step all-gathers every block again), 'batch' after each rollout call (gathered "
                 "once per call, held through its denoising loop), 'phase' after the epoch's last rollout call "
                 "(gathered once per epoch's rollouts; the full weights then stay resident while sources are encoded "
                 "and edits decoded). Evaluation follows the same rule. Needs the memory of one unsharded transformer "
                 "unless 'step'.")

    def problems(self) -> list[str]:
        return _failed({
            "parallel.cpu_offload needs parallel.shard_transformer (only FSDP2-sharded parameters are offloaded)":
                self.shard_transformer or not self.cpu_offload,
            f"parallel.replicate_degree must be >= 1, got {self.replicate_degree}": self.replicate_degree >= 1,
            "parallel.replicate_degree > 1 (HSDP) needs parallel.shard_transformer":
                self.shard_transformer or self.replicate_degree == 1,
        })


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Saving and resuming; checkpoints live under OUT/checkpoints/."""

    save_every: int = option(25, "Save a checkpoint every N epochs; 0 saves none periodically.")
    keep_latest: int = option(0, "Keep only the newest N checkpoints; 0 keeps all.")
    resume: str = option("", "'latest' (the newest under OUT/checkpoints/), a checkpoint folder, or empty to start "
                             "fresh. Also --resume.")
    export_lora: bool = option(True, "With each checkpoint also write the EMA weights: a LoRA as safetensors in the "
                                     "diffusers and PEFT layouts (lora_ema/, ready for pipe.load_lora_weights), full "
                                     "fine-tuning as a diffusers transformer folder (ema/transformer/).")

    def problems(self) -> list[str]:
        return _failed({
            f"checkpoint.save_every must be ≥ 0, got {self.save_every}": self.save_every >= 0,
            f"checkpoint.keep_latest must be ≥ 0, got {self.keep_latest}": self.keep_latest >= 0,
        })


@dataclass(kw_only=True, slots=True)
class MetricsConfig:
    """What is logged where; OUT/metrics.jsonl is always written."""

    log_every: int = option(1, "Write a metrics line (OUT/metrics.jsonl and the console) every N optimizer steps.")
    image_every: int = option(0, "Every N epochs save a grid of rank 0's rollouts (source | edit per row) to "
                                 "OUT/images/ and the trackers; 0 never.")
    wandb: bool = option(False, "Also log to Weights & Biases, run name run.name (imported only when on; needs "
                                "`pip install wandb`).")
    wandb_project: str = option("nftcore", "Weights & Biases project.")
    tensorboard: bool = option(False, "Also write TensorBoard event files under OUT/tensorboard/ (needs "
                                      "`pip install tensorboard`).")
    progress: bool = option(True, "Show rollout/update progress: a line redrawn in place on a terminal, one line per "
                                  "finished phase in a log file; false shows neither.")

    def problems(self) -> list[str]:
        return _failed({
            f"metrics.log_every must be ≥ 1, got {self.log_every}": self.log_every >= 1,
            f"metrics.image_every must be ≥ 0, got {self.image_every}": self.image_every >= 0,
        })


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Periodic evaluation of the EMA weights on the test split."""

    every: int = option(20, "Evaluate every N epochs (the last included); 0 never. The test split is divided "
                            "over the ranks and the rewards all-gathered; the mean goes to the log, OUT/eval.jsonl and "
                            "the trackers, a source | edit grid to OUT/images/eval-epoch-N.png.")
    num_steps: int = option(8, "ODE steps of the evaluation sampler.")
    solver: Literal["dpm2", "euler"] = option("euler", "Evaluation solver (nftcore.sampling.SOLVERS).")
    batch_size: int = option(16, "Images per rank per evaluation call.")
    max_samples: int = option(0, "Evaluate on at most this many test samples; 0 uses all.")

    def problems(self) -> list[str]:
        return _failed({
            f"eval.every must be ≥ 0, got {self.every}": self.every >= 0,
            f"eval.num_steps must be ≥ 1, got {self.num_steps}": self.num_steps >= 1,
            f"eval.batch_size must be ≥ 1, got {self.batch_size}": self.batch_size >= 1,
            f"eval.max_samples must be ≥ 0, got {self.max_samples}": self.max_samples >= 0,
        })


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """The editing dataset: (source image, instruction) pairs, train and test splits."""

    path: str = option("", "Dataset folder (the Edit-R1 layout); empty uses the embedded demo data.")
    num_workers: int = option(0, "Threads per rank that read the epoch's dataset rows (image decoding) before its "
                                 "rollouts; 0 reads them in the rollout loop.")
    bad_lines: Literal["error", "skip"] = option(
        "error", "A metadata line that cannot be used (bad JSON, missing field, missing image): 'error' stops with "
                 "file:line and the reason; 'skip' drops it, counts it and logs one warning (never trained on). "
                 "An image that fails to decode when drawn is handled the same way: 'skip' drops the sample's group "
                 "for that epoch and counts it.")
    verify_images: bool = option(False, "Decode every image of both splits at start-up, so a corrupt file is found "
                                        "before the first epoch (slow on large datasets).")
    cache_conditioning: Literal["off", "memory", "disk"] = option(
        "memory", "Encode each dataset row's conditioning (text embeddings, pooled vector, source-image latents) "
                  "once and reuse it in every later epoch and evaluation: 'memory' keeps it in each rank's host RAM "
                  "for the run; 'disk' writes one safetensors file per row under data.cache_dir, keyed by the row and "
                  "the encoders' identity (model, dtype, text lengths, guidance, resolution), and reads it back at "
                  "each use. `python -m nftcore.precompute` fills it ahead of time, after which training does not "
                  "load the text encoders. A stale or corrupt entry is warned about and recomputed, never used. 'off' "
                  "encodes every rollout call and evaluation batch anew.")
    cache_dir: str = option("", "Folder of the 'disk' conditioning cache; empty is OUT/conditioning_cache. Entries of "
                                "other models or resolutions sit beside each other, so one folder can serve many "
                                "runs.")

    def problems(self) -> list[str]:
        return _failed({
            f"data.num_workers must be ≥ 0, got {self.num_workers}": self.num_workers >= 0,
            f"data.cache_dir={self.cache_dir!r} is used only by data.cache_conditioning='disk' (it is "
            f"{self.cache_conditioning!r}); set both or neither":
                not self.cache_dir or self.cache_conditioning == "disk",
        })


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything one training run needs; `TrainConfig()` is the `demo` recipe. Build with `load_config`."""

    recipe: Annotated[str, Suppress] = option("demo", "The recipe this config started from (chosen with --config).")
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def train_timesteps(self) -> int:
        """T_train: the sampler timesteps each sample is trained on."""
        return train_timesteps(self.sampling.num_steps, self.nft.timestep_fraction)

    def type_problems(self) -> list[str]:
        """Values of the wrong type (set in Python, or read from a file) as `section.key: problem`."""
        found = [f"{f.name}: {p}" for f in fields(self) if (p := type_problem(getattr(self, f.name), f.type))]
        return found or [f"{name}.{f.name}: {p}" for name, cls in SECTIONS.items() for f in fields(cls)
                         if (p := type_problem(getattr(getattr(self, name), f.name), f.type))]

    def problems(self) -> list[str]:
        """Every type error, out-of-range value and contradiction, as messages naming `section.key`."""
        typed = self.type_problems()
        if typed:  # range checks on wrongly typed values would only add noise (or raise)
            return typed
        found = [problem for name in SECTIONS for problem in getattr(self, name).problems()]
        s, demo = self.sampling, self.model.family == "demo"
        if not found:
            found += _failed({
                f"sampling.num_steps × nft.timestep_fraction = {s.num_steps} × {self.nft.timestep_fraction} trains "
                "0 timesteps per sample; raise either": self.train_timesteps >= 1,
                "sampling.guidance_scale must be none for qwen_image (it has no guidance embedding)":
                    not (self.model.family == "qwen_image" and s.guidance_scale is not None),
                f"parallel.shard_reward_model shards the in-process judge: it needs reward.backend = 'local', got "
                f"{self.reward.backend!r}": not self.parallel.shard_reward_model or self.reward.backend == "local",
                # The demo family's own limits: an error naming the key rather than a silently ignored value.
                f"model.family='demo' cannot honour sampling.guidance_scale={s.guidance_scale}: the demo policy has "
                "no guidance embedding; leave it unset": not demo or s.guidance_scale is None,
                f"model.family='demo' cannot honour data.path={self.data.path!r}: the demo family trains on its "
                "embedded world; a dataset folder needs the flux or qwen_image family": not demo or not self.data.path,
            })
            # World-size independent; batch_plan adds the one world-size check (no more ranks than samples).
            split = plan_problem(s.group_size * s.groups_per_epoch, self.optim.steps_per_epoch)
            found += [split] if split else []
        return found

    def world_size_problems(self, world_size: int) -> list[str]:
        """What cannot work on `world_size` ranks (the batch plan checks its own sizes: `batch_plan`)."""
        return _failed({
            f"model.finetune='full' on {world_size} ranks with parallel.shard_transformer=false: full weights "
            f"replicated on every rank cost {world_size}× memory and an all-reduce of every weight's gradient; set "
            "parallel.shard_transformer=true":
                not (self.model.finetune == "full" and world_size > 1 and not self.parallel.shard_transformer),
            "parallel.shard_text_encoder=true: the demo's text encoder is part of its tiny policy and always "
            "replicated; run with --parallel.shard_text_encoder=false":
                not (self.parallel.shard_text_encoder and world_size > 1 and self.model.family == "demo"),
        })

    def check_world_size(self, world_size: int) -> "TrainConfig":
        """Raise UnsupportedConfigError listing what cannot work on `world_size` ranks; return self."""
        _raise(self.world_size_problems(world_size), f"invalid config for {world_size} ranks", UnsupportedConfigError)
        return self

    def validate(self, world_size: int | None = None) -> "TrainConfig":
        """Raise one ConfigError listing every problem (with `world_size`, then also what cannot work on that many
        ranks, as an UnsupportedConfigError); return self, so `cfg = recipe().validate()` reads well."""
        _raise(self.problems(), "invalid config")
        return self if world_size is None else self.check_world_size(world_size)


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(TrainConfig) if f.name != "recipe"}
"""Section name → its dataclass, in order: run, model, lora, sampling, nft, reward, filter, optim, parallel,
checkpoint, metrics, eval, data."""


def check_name(section: str, key: str | None = None, where: str = "") -> None:
    """ConfigError if `section` (or its `key`) names no option, with the closest name and the valid ones; `where`
    (the flag as typed) is quoted in the message."""
    at = f" ({where})" if where else ""
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r}{at}{did_you_mean(section, SECTIONS)}; "
                          f"sections: {', '.join(SECTIONS)}")
    keys = [f.name for f in fields(SECTIONS[section])]
    if key is not None and key not in keys:
        raise ConfigError(f"unknown key {key!r} in section [{section}]{at}{did_you_mean(key, keys)}; "
                          f"keys of [{section}]: {', '.join(keys)}")


def _failed(checks: dict[str, bool]) -> list[str]:
    """The messages whose condition is False."""
    return [message for message, ok in checks.items() if not ok]


def _raise(found: list[str], title: str, error: type[ConfigError] = ConfigError) -> None:
    """One error for all `found` problems: on one line when there is one (the job's last line), else a list."""
    if len(found) == 1:
        raise error(f"{title}: {found[0]}")
    if found:
        raise error(f"{title}:\n  - " + "\n  - ".join(found))


def type_problem(value: Any, tp: Any) -> str | None:
    """Why `value` is not a `tp` (typeguard decides), or a non-finite float: no option means "no limit" by inf (0 does,
    where there is one), and an inf or nan that got through would only surface hours later as a NaN loss."""
    try:
        check_type(value, tp)
    except TypeCheckError as error:
        hint = did_you_mean(value, get_args(tp)) if get_origin(tp) is Literal and isinstance(value, str) else ""
        return f"{value!r} has the wrong type: {' '.join(str(error).split())}{hint}"
    if any(isinstance(x, float) and not math.isfinite(x) for x in (value if isinstance(value, tuple) else (value,))):
        return f"{value!r} is not a finite float (no float option takes inf or nan)"
    return None
