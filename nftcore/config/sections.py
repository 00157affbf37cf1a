"""The trainer's configuration: one typed dataclass per concern, and `TrainConfig` that holds one of each.

tyro builds the command line and `--help` from the types and help texts. `validate` checks the types (typeguard, on
the real annotations: do not postpone them here), each field's range (`must_be`) and the rules across fields; slots
make a misspelt attribute an error. The field defaults are the `demo` recipe; the reference's two "betas" are
`nft.beta` and `nft.kl_weight` (§11.1), the other names those of the functions they feed (`nft_loss`, `apply_lora`).
"""

import math
import operator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from typeguard import TypeCheckError, check_type
from tyro.conf import Suppress

from nftcore.config.batching import plan_problem, train_timesteps
from nftcore.config.errors import ConfigError, UnsupportedConfigError, did_you_mean


def option(default: Any, help: str, must_be: str = "") -> Any:
    """A field with its `--help` text and the range `validate` holds it to: "≥ 1", "> 0", "in [0, 1)", ... (the help
    states the range too, so `--help` and the TOML dump's comments show it)."""
    text = f"{help} Range: {must_be}." if must_be else help
    return field(default=default, metadata={"help": text, "must_be": must_be})


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where a run writes and how long it goes."""

    name: str = option("demo", "Run name, for logs and trackers.")
    out: str = option("runs/demo", "Output folder: OUT/metrics.jsonl, checkpoints under OUT/checkpoints/ (a fixed "
                                   "layout that scripts rely on).")
    epochs: int = option(100, "Epochs to train; one is G·K rollouts, their rewards, then optim.steps_per_epoch "
                              "optimizer steps (the reference's 'step'; it runs until stopped).", "≥ 1")
    seed: int = option(42, "Base seed; every random draw is seeded per sample from (seed, epoch, global sample "
                           "index), so results do not depend on the rank count.")
    overwrite: bool = option(False, "Delete a previous run's files in run.out and start anew; without it such a "
                                    "folder is refused unless the run resumes (--resume).")

    @property
    def metrics_path(self) -> Path:
        return Path(self.out) / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out) / "checkpoints"


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The policy transformer: which one, and how it is held in memory."""

    family: Literal["demo", "flux", "qwen_image"] = option(
        "demo", "'flux' (FLUX.1-Kontext), 'qwen_image' (Qwen-Image-Edit), or 'demo' (the embedded tiny CPU model).")
    path: str = option("", "Pretrained diffusers pipeline: a local folder, or a Hugging Face id already in the local "
                           "cache (nothing is downloaded); empty for 'demo'.")
    finetune: Literal["lora", "full"] = option(
        "lora", "'lora' (Edit-R1: adapters on the frozen transformer) or 'full' (every weight: fp32 masters and AdamW "
                "moments, θ_old and reference copies in model.dtype, the EMA fp32). 'full' on several ranks needs "
                "parallel.shard_transformer = true; memory plan in docs/TRAINING.md.")
    dtype: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "Storage of the frozen base weights (LoRA adapters are always fp32); with 'full' also the forwards' "
                "compute dtype and θ_old's and the reference's storage. The reference's fp32 Kontext costs ~24 GB "
                "more per GPU than bf16 (§11.7).")
    gradient_checkpointing: bool = option(
        False, "Recompute each block's activations in backward; needed to fit the 12B/20B models at 512².")


@dataclass(kw_only=True, slots=True)
class LoRAConfig:
    """The trained adapter ("default") and its rollout twin ("old"), same shape."""

    rank: int = option(16, "LoRA rank r.", "≥ 1")
    alpha: float = option(32.0, "LoRA α; the update is scaled by α / r.", "> 0")
    init: Literal["gaussian", "zeros"] = option(
        "gaussian", "'gaussian': A ~ N(0, 1/r²), B = 0 (PEFT's init, so training starts at the base model); 'zeros'.")
    include_mlp: bool = option(True, "Also adapt the MLPs; Edit-R1 adapts only attention (q, k, v, out, add_q/k/v, "
                                     "to_add_out), the tiny demo learns faster with both.")


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    """Rollouts: how many per epoch, in which batches, and the ODE that makes them."""

    group_size: int = option(8, "K: images per prompt, one group; advantages are relative within a group, so K ≥ 2.")
    groups_per_epoch: int = option(8, "G: prompts per epoch; an epoch rolls out G·K images over all ranks.", "≥ 1")
    batch_size: int = option(16, "Most images per rank per rollout call and per training micro-batch; any world size "
                                 "up to G·K runs a recipe unchanged (batch_plan).", "≥ 1")
    num_steps: int = option(6, "Rollout ODE steps; training noises at exactly these sampler sigmas (§1.4).", "≥ 1")
    solver: Literal["dpm2", "euler"] = option("dpm2", "Rollout solver (nftcore.sampling.SOLVERS).")
    resolution: int = option(16, "Square image edge in pixels (center crop), a multiple of 16; the sigma shift keys on "
                                 "(resolution / 16)² tokens. The demo policy works at 16 px.")
    guidance_scale: float | None = option(
        None, "Distilled guidance for FLUX.1-Kontext's guidance embedding (Edit-R1: 2.5); none for models without one.",
        "≥ 0")


@dataclass(kw_only=True, slots=True)
class NFTConfig:
    """The DiffusionNFT objective, reward normalisation, and the two lagged copies of θ."""

    beta: float = option(0.1, "β, the mixing strength: v⁺ = β·v_θ + (1−β)·v_old, v⁻ = (1+β)·v_old − β·v_θ; a "
                              "smaller β steps further. Not the KL weight (the reference calls both 'beta').", "> 0")
    kl_weight: float = option(1e-4, "λ_KL, weight of the velocity L2 to the frozen base model (the reference's "
                                    "train.beta); 0 also skips the base-model forward.", "≥ 0")
    adv_clip_max: float = option(5.0, "A_max: advantages are clipped to ±A_max before mapping to r ∈ [0, 1], and the "
                                      "policy loss is scaled by it (nft_loss's loss_scale).", "> 0")
    negative_weight: float = option(1.0, "Weight of the negative-branch term (1 − r)·L⁻ of the loss.", "≥ 0")
    global_std: bool = option(True, "Scale advantages by the std of all the epoch's rewards (+1e-4), not each group's, "
                                    "so a near-constant group's judge noise is not blown up.")
    singleton: Literal["error", "global"] = option(
        "error", "A one-sample group: 'error' (broken grouping), or 'global' (measure it against the epoch mean).")
    timestep_fraction: float = option(0.99, "Share of the sampler timesteps trained per sample: T_train = "
                                            "int(num_steps × fraction), 6 × 0.99 → 5; a random rest is dropped.",
                                      "in (0, 1]")
    decay_type: Literal[0, 1, 2] = option(
        1, "Rollout ('old') policy update θ_old ← η·θ_old + (1 − η)·θ per epoch (OldPolicySchedule.preset): 0 η = 0 "
           "(on-policy), 1 η = min(0.001·step, 0.5), 2 flat 75 steps then +0.0075/step up to 0.999 (DiffusionNFT OCR).")
    ema_decay: float = option(0.9, "Decay of the EMA of θ for evaluation and checkpoints (warm-up (1 + s)/(10 + s)); "
                                   "not the rollout policy.", "in [0, 1)")
    timestep_chunk: int = option(0, "Training timesteps stacked in one forward/backward: 0 all T_train (fewest passes, "
                                    "most activation memory), 1 one per pass. Same gradients; lower it if memory "
                                    "runs out.", "≥ 0")


@dataclass(kw_only=True, slots=True)
class RewardConfig:
    """The judge that scores each edit."""

    backend: Literal["demo", "local", "server"] = option(
        "demo", "'local': the MLLM judge in this process (a copy per rank, or see parallel.shard_reward_model); "
                "'server': an HTTP judge at server_url (as the reference); 'demo': the embedded synthetic reward.")
    model: str = option("", "Judge MLLM for 'local' (the score is E[digit]/5 over the tokens '0'–'5' of its answer).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Weights of the 'local' judge; 'auto' is bf16 on CUDA and fp32 on the CPU.")
    min_pixels: int = option(0, "Smallest image area the 'local' judge resizes to; 0 keeps the processor's own (stock "
                                "Qwen2.5-VL: 56·56).", "≥ 0")
    max_pixels: int = option(0, "Largest image area for the 'local' judge; 0 keeps the processor's own (stock: "
                                "28·28·1280, where a 512² edit is 324 tokens).", "≥ 0")
    server_url: str = option("", "host:port of the judge for 'server'; empty reads REWARD_SERVER from the environment.")
    timeout_s: float = option(300.0, "Seconds one scoring request may take before it is retried.", "> 0")
    max_retries: int = option(3, "Retries of a failed scoring request; a group that still fails is dropped, never "
                                 "scored 0 (§11.4).", "≥ 0")


@dataclass(kw_only=True, slots=True)
class FilterConfig:
    """Low-variance group filtering and the prompt ban."""

    rule: Literal["paper", "code", "none"] = option(
        "paper", "'paper': drop groups with mean > τμ AND std < τσ; 'code': keep only groups with std > τσ AND "
                 "mean < τμ (the official Qwen config); 'none': keep all (the official Kontext config).")
    mean_threshold: float = option(0.9, "τμ, on the group mean of the raw rewards.")
    std_threshold: float = option(0.05, "τσ, on the group's population std of the raw rewards.", "≥ 0")
    ban_prompts: bool = option(False, "Stop sampling, for good, a prompt whose group met the paper's rule (PromptBan).")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """The optimizer step and numeric precision."""

    lr: float = option(3e-3, "AdamW learning rate, constant (the reference has no schedule).", "> 0")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW (β1, β2), e.g. --optim.betas=0.9,0.999.", "in [0, 1)")
    weight_decay: float = option(1e-4, "AdamW decoupled weight decay.", "≥ 0")
    eps: float = option(1e-8, "AdamW ε.", "> 0")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this; 0 turns clipping off.", "≥ 0")
    steps_per_epoch: int = option(4, "Optimizer steps per epoch, over which the epoch's micro-batches are split "
                                     "evenly (the rest is gradient accumulation).", "≥ 1")
    mixed_precision: Literal["no", "bf16"] = option("no", "Autocast dtype of the forwards: 'bf16' (Edit-R1) or 'no'.")
    allow_tf32: bool = option(True, "Allow TF32 matmuls and convolutions on CUDA.")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the work spreads over ranks. The world size itself comes from the launcher (torchrun), not from here."""

    backend: Literal["auto", "nccl", "gloo"] = option(
        "auto", "torch.distributed backend; 'auto' is nccl with CUDA, gloo without.")
    shard_text_encoder: bool = option(False, "FSDP2-shard the frozen text encoders (T5 + CLIP, Qwen2.5-VL) over all "
                                             "ranks, as the reference; an error for the demo on several ranks.")
    shard_transformer: bool = option(True, "FSDP2-shard the policy transformer per block, as 1024² or larger models "
                                           "need; false replicates it, as the reference's DDP (§11.10).")
    shard_reward_model: bool = option(False, "FSDP2-shard the 'local' judge over all ranks; each rank then scores its "
                                             "share after its rollouts, no longer overlapped with them.")
    cpu_offload: bool = option(False, "Keep the sharded parameters on the CPU between uses (needs shard_transformer).")
    replicate_degree: int = option(1, "HSDP: replicas of the sharded transformer, each over world_size / this ranks "
                                      "(e.g. the node count: gathers stay in a node); 1 = one FSDP2 group.", "≥ 1")
    rollout_reshard: Literal["step", "batch", "phase"] = option(
        "batch", "When rollouts and evaluation drop the sharded transformer's gathered weights: after each sampler "
                 "'step' (gathered again every step), rollout 'batch', or the epoch's rollout 'phase' (also held "
                 "while sources are encoded and edits decoded). All but 'step' need one unsharded copy's memory.")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Saving and resuming; checkpoints live under OUT/checkpoints/."""

    save_every: int = option(25, "Save a checkpoint every N epochs; 0 saves none periodically.", "≥ 0")
    keep_latest: int = option(0, "Keep only the newest N checkpoints; 0 keeps all.", "≥ 0")
    resume: str = option("", "'latest' (the newest in OUT/checkpoints/), a checkpoint folder, or empty. Also --resume.")
    export_lora: bool = option(True, "Also write each checkpoint's EMA weights for diffusers: a LoRA in lora_ema/ "
                                     "(diffusers and PEFT layouts), full fine-tuning in ema/transformer/.")


@dataclass(kw_only=True, slots=True)
class MetricsConfig:
    """What is logged where; OUT/metrics.jsonl is always written."""

    log_every: int = option(1, "Log metrics (OUT/metrics.jsonl, console) every N optimizer steps.", "≥ 1")
    image_every: int = option(0, "Every N epochs save a grid of rank 0's rollouts (source | edit) to OUT/images/ and "
                                 "the trackers; 0 never.", "≥ 0")
    wandb: bool = option(False, "Also log to Weights & Biases as run.name (needs `pip install wandb`).")
    wandb_project: str = option("nftcore", "Weights & Biases project.")
    tensorboard: bool = option(False, "Also write TensorBoard events to OUT/tensorboard/ (needs tensorboard).")
    progress: bool = option(True, "Show rollout/update progress (redrawn on a terminal, a line per phase in a log).")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Periodic evaluation of the EMA weights on the test split."""

    every: int = option(20, "Evaluate every N epochs and after the last; 0 never. Results go to the log, "
                            "OUT/eval.jsonl, the trackers and OUT/images/eval-epoch-N.png.", "≥ 0")
    num_steps: int = option(8, "ODE steps of the evaluation sampler.", "≥ 1")
    solver: Literal["dpm2", "euler"] = option("euler", "Evaluation solver (nftcore.sampling.SOLVERS).")
    batch_size: int = option(16, "Images per rank per evaluation call.", "≥ 1")
    max_samples: int = option(0, "Evaluate on at most this many test samples; 0 uses all.", "≥ 0")


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """The editing dataset: (source image, instruction) pairs, train and test splits."""

    path: str = option("", "Dataset folder (the Edit-R1 layout); empty uses the embedded demo data.")
    num_workers: int = option(0, "Threads per rank that decode the epoch's rows before its rollouts; 0 decodes in the "
                                 "rollout loop.", "≥ 0")
    bad_lines: Literal["error", "skip"] = option(
        "error", "An unusable metadata line or undecodable image: 'error' stops with file:line and the reason; 'skip' "
                 "drops it (an image's group for that epoch), counts it and logs one warning.")
    verify_images: bool = option(False, "Decode every image at start-up, so a corrupt file fails before the first "
                                        "epoch (slow on large datasets).")
    cache_conditioning: Literal["off", "memory", "disk"] = option(
        "memory", "Encode each row's conditioning once and reuse it: 'memory' in host RAM, 'disk' under "
                  "data.cache_dir (`python -m nftcore.precompute` fills it ahead, so training loads no text encoder); "
                  "'off' re-encodes each time. Stale or corrupt entries are recomputed, never used.")
    cache_dir: str = option("", "Folder of the 'disk' cache, shared safely by runs of any model; empty is "
                                "OUT/conditioning_cache.")


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

    def _values(self) -> list[tuple[str, Any, Any]]:
        """(section name, field, value) of every option."""
        return [(name, f, getattr(getattr(self, name), f.name)) for name in SECTIONS for f in fields(SECTIONS[name])]

    def type_problems(self) -> list[str]:
        """Values of the wrong type (set in Python, or read from a file) as `section.key: problem`."""
        found = [f"{f.name}: {p}" for f in fields(self) if (p := type_problem(getattr(self, f.name), f.type))]
        return found or [f"{name}.{f.name}: {p}" for name, f, value in self._values()
                         if (p := type_problem(value, f.type))]

    def problems(self) -> list[str]:
        """Every type error, out-of-range value and contradiction, as messages naming `section.key`."""
        if typed := self.type_problems():  # range checks on wrongly typed values would only add noise (or raise)
            return typed
        s, reward, parallel, data = self.sampling, self.reward, self.parallel, self.data
        found = [f"{name}.{f.name} must be {f.metadata['must_be']}, got {value}" for name, f, value in self._values()
                 if f.metadata["must_be"] and not _within(value, f.metadata["must_be"])]
        found += _failed({
            "run.out must not be empty": bool(self.run.out),
            f"run.seed must be in [0, 2**63), got {self.run.seed}": 0 <= self.run.seed < 2**63,
            f"model.path must name the pretrained {self.model.family} pipeline":
                self.model.family == "demo" or bool(self.model.path),
            f"sampling.group_size (K) must be ≥ 2 for group-relative advantages, got {s.group_size}": s.group_size >= 2,
            # 8× VAE downsampling, then 2×2 patches: anything else leaves a ragged token grid.
            f"sampling.resolution must be a positive multiple of 16, got {s.resolution}":
                s.resolution > 0 and s.resolution % 16 == 0,
            "reward.model must name the judge MLLM for the 'local' backend": reward.backend != "local" or reward.model,
            f"reward.min_pixels = {reward.min_pixels} exceeds reward.max_pixels = {reward.max_pixels}":
                not 0 < reward.max_pixels < reward.min_pixels,
            "parallel.cpu_offload needs parallel.shard_transformer (only FSDP2-sharded parameters are offloaded)":
                parallel.shard_transformer or not parallel.cpu_offload,
            "parallel.replicate_degree > 1 (HSDP) needs parallel.shard_transformer":
                parallel.shard_transformer or parallel.replicate_degree == 1,
            f"data.cache_dir={data.cache_dir!r} is used only by data.cache_conditioning='disk' (it is "
            f"{data.cache_conditioning!r}); set both or neither":
                not data.cache_dir or data.cache_conditioning == "disk",
        })
        if found:  # the rules below combine sections, each of which must be sound first
            return found
        demo = self.model.family == "demo"
        found = _failed({
            f"sampling.num_steps × nft.timestep_fraction = {s.num_steps} × {self.nft.timestep_fraction} trains 0 "
            "timesteps per sample; raise either": self.train_timesteps >= 1,
            "sampling.guidance_scale must be none for qwen_image (it has no guidance embedding)":
                not (self.model.family == "qwen_image" and s.guidance_scale is not None),
            f"parallel.shard_reward_model shards the in-process judge: it needs reward.backend = 'local', got "
            f"{reward.backend!r}": not parallel.shard_reward_model or reward.backend == "local",
            # The demo family's own limits: an error naming the key rather than a silently ignored value.
            f"model.family='demo' cannot honour sampling.guidance_scale={s.guidance_scale}: the demo policy has no "
            "guidance embedding; leave it unset": not demo or s.guidance_scale is None,
            f"model.family='demo' cannot honour data.path={data.path!r}: the demo family trains on its embedded "
            "world; a dataset folder needs the flux or qwen_image family": not demo or not data.path,
        })
        # World-size independent; batch_plan adds the one world-size check (no more ranks than samples).
        split = plan_problem(s.group_size * s.groups_per_epoch, self.optim.steps_per_epoch)
        return found + ([split] if split else [])

    def check_world_size(self, world_size: int) -> "TrainConfig":
        """Raise UnsupportedConfigError listing what cannot work on `world_size` ranks (the batch plan checks its own
        sizes: `batch_plan`); return self."""
        _raise(_failed({
            f"model.finetune='full' on {world_size} ranks with parallel.shard_transformer=false: full weights "
            f"replicated on every rank cost {world_size}× memory and an all-reduce of every weight's gradient; set "
            "parallel.shard_transformer=true":
                not (self.model.finetune == "full" and world_size > 1 and not self.parallel.shard_transformer),
            "parallel.shard_text_encoder=true: the demo's text encoder is part of its tiny policy and always "
            "replicated; run with --parallel.shard_text_encoder=false":
                not (self.parallel.shard_text_encoder and world_size > 1 and self.model.family == "demo"),
        }), f"invalid config for {world_size} ranks", UnsupportedConfigError)
        return self

    def validate(self, world_size: int | None = None) -> "TrainConfig":
        """Raise one ConfigError listing every problem (with `world_size`, then also what cannot work on that many
        ranks, as an UnsupportedConfigError); return self, so `cfg = recipe().validate()` reads well."""
        _raise(self.problems(), "invalid config")
        return self if world_size is None else self.check_world_size(world_size)


SECTIONS: dict[str, type] = {f.name: f.type for f in fields(TrainConfig) if f.name != "recipe"}
"""Section name → its dataclass, in order: run, model, lora, ..., data."""


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


def _within(value: Any, bound: str) -> bool:
    """Whether `value` (each item of a tuple; None passes) is `bound`: "≥ 1", "> 0" or an interval "in [0, 1)"."""
    if value is None or isinstance(value, tuple):
        return all(_within(item, bound) for item in value or ())
    if bound.startswith("in "):  # "[" and "]" include the end, "(" and ")" do not
        low, high = map(float, bound[4:-1].split(", "))
        above = low <= value if bound[3] == "[" else low < value
        return above and (value <= high if bound[-1] == "]" else value < high)
    op, limit = bound.split()
    return {"≥": operator.ge, ">": operator.gt}[op](value, float(limit))


def _failed(checks: dict[str, object]) -> list[str]:
    """The messages whose condition is false."""
    return [message for message, ok in checks.items() if not ok]


def _raise(found: list[str], title: str, error: type[ConfigError] = ConfigError) -> None:
    """One error for all `found` problems: on one line when there is one (the job's last line), else a list."""
    if len(found) == 1:
        raise error(f"{title}: {found[0]}")
    if found:
        raise error(f"{title}:\n  - " + "\n  - ".join(found))
