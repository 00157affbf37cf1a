"""The policy-family protocol: what the training loop needs from a model family, and the demo family.

Why a protocol instead of importing a model: the loop (rollouts, NFT update, checkpoints) is the same for FLUX.1-
Kontext, Qwen-Image-Edit and the embedded demo; what differs is how a batch of dataset rows becomes conditioning,
which sigma grid the sampler walks, how latents become images, and where the datasets come from. A family
provides exactly that:

    family.transformer                      the nn.Module that gets LoRA adapters, FSDP2 and the optimizer
    family.train_dataset / eval_dataset     indexable, with `sample_ids` and `epoch_prompts(G, epoch, seed, banned)`
    family.conditioning(samples)            once per rollout batch, under no_grad; kept for training (through
                                            `conditioning_cache`: only rows not cached yet are encoded)
    family.conditioning_identity()          optional: what the conditioning depends on besides the row (the cache
                                            key: model, dtype, resolution, ...)
    family.index_conditioning(cond, idx)    rows `idx` of a conditioning (micro-batches mix rollout batches)
    family.cat_conditioning(conds)          concatenate along the batch
    family.velocity_fn(cond, transformer)   `fn(x [B, N, C], sigma float | [B]) -> v` through `transformer` (default:
                                            family.transformer, with whatever LoRA adapter is active)
    family.sigmas(num_steps)                the sampler's grid (float64, 1 → 0); training noises at its first N
    family.latent_shape                     (N, C) of one packed latent
    family.decode(latents)                  [B, 3, H, W] images in [0, 1] for the reward
    family.source_images(samples)           [B, 3, H, W] in [0, 1], what the judge compares against
    family.reward_metadata(sample)          the per-sample dict passed to the reward
    family.default_reward()                 the in-process reward of the family ('demo' backend), or None
    family.target_images(samples)           ground truth for the before/after grid, or None

`build_family` gives the demo family below for model.family = 'demo', and `edit_family.EditFamily` (FLUX.1-Kontext,
Qwen-Image-Edit: VAE + text encoders around `nftcore.models.MMDiT`, the Edit-R1 dataset) for 'flux' / 'qwen_image'.

Also here: `build_reward` (the config's reward backend as one callable) and the trainable-weights strategies, which
give the loop θ, θ_old and the reference as velocity functions plus the tensors to optimise, average and save:
`LoRAWeights` (Edit-R1: adapters "default"/"old" on one model, reference = adapters disabled) and `FullWeights`
(model.finetune = 'full': the model as fp32 masters, a copy for θ_old, a frozen copy for the reference).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from nftcore.config import TrainConfig
from nftcore.reward.base import RewardResult
from nftcore.trainer.conditioning import cat_conditioning, index_conditioning

DEMO_TRAIN_TASKS = 256  # enough distinct (scene, instruction) pairs that G = 8 groups per epoch rarely repeat
DEMO_EVAL_TASKS = 64  # eval rewards spread ≈ 0.25 per task: 16 tasks left ±0.06 of sampling noise on the mean
DEMO_DATA_SEED = 0  # the task set is part of the demo, not of the run: changing --run.seed must not change it
DEMO_EVAL_SEED = 1


class PolicyFamily(Protocol):
    """See the module docstring."""

    transformer: nn.Module
    train_dataset: Any
    eval_dataset: Any

    @property
    def latent_shape(self) -> tuple[int, int]: ...

    def conditioning(self, samples: Sequence[Any]) -> Any: ...

    def index_conditioning(self, cond: Any, index: torch.Tensor) -> Any: ...

    def cat_conditioning(self, conds: Sequence[Any]) -> Any: ...

    def velocity_fn(self, cond: Any, transformer: nn.Module | None = None
                    ) -> Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]: ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def source_images(self, samples: Sequence[Any]) -> torch.Tensor: ...

    def reward_metadata(self, sample: Any) -> dict[str, Any]: ...

    def default_reward(self) -> Callable[..., RewardResult] | None: ...

    def target_images(self, samples: Sequence[Any]) -> torch.Tensor | None: ...


class DemoReward:
    """The demo's programmatic judge as a reward callable: `nftcore.demo.verify` against the exact target.

    The ground-truth task travels in the metadata (`"task"`), so the judge stays a plain reward function of
    (edited, sources, prompts, metadata) like the MLLM and HTTP ones.
    """

    def __call__(self, edited, sources, prompts, metadata: Sequence[Mapping[str, Any]]) -> RewardResult:
        from nftcore.demo import verify

        scores = verify(torch.as_tensor(edited).float().cpu(), [m["task"] for m in metadata])
        return RewardResult.from_scores(scores)


class DemoFamily:
    """The embedded demo: `nftcore.demo.model.DemoPolicy` (a tiny FLUX-shaped MMDiT in pixel-patch space) on the
    procedural editing world, judged by the exact verifier.

    `model.path`: empty loads the shipped base checkpoint; "random" (or "random:SEED") builds a randomly initialised
    policy (independent of the shipped asset); "tiny[:SEED]" is a random policy with one double and one single block
    of width 32, which is what the tests use; anything else is a checkpoint file.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from nftcore.demo import DemoDataset
        from nftcore.demo.model import DemoPolicy, default_transformer_config

        _reject_for_demo(cfg)
        path = cfg.model.path
        kind, _, seed = path.partition(":")
        if kind in ("random", "tiny"):
            transformer = None
            if kind == "tiny":
                transformer = default_transformer_config(double=1, single=1, head_dim=16)
            # PyTorch's default init rather than `fresh`'s adaLN-zero: a zero output layer would give LoRA no gradient.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed or 0))
                self.policy = DemoPolicy(None, transformer)
        else:
            self.policy = DemoPolicy.from_pretrained(path or None)
        self.policy.to(device).requires_grad_(False)
        # model.dtype: the frozen base transformer's storage; the tiny text encoder stays fp32 (it runs once per sample)
        self.policy.transformer.to(MODEL_DTYPES[cfg.model.dtype])
        self.device = device
        size = self.policy.demo.image_size
        if cfg.sampling.resolution != size:
            import warnings

            warnings.warn(f"sampling.resolution = {cfg.sampling.resolution}, but this demo policy works at {size} px; "
                          f"using {size} (set --sampling.resolution={size} to silence this)", stacklevel=2)
        self.train_dataset = DemoDataset(DEMO_TRAIN_TASKS, seed=DEMO_DATA_SEED, size=size)
        self.eval_dataset = DemoDataset(DEMO_EVAL_TASKS, seed=DEMO_EVAL_SEED, size=size)
        self.identity = _demo_identity(cfg, size)

    def conditioning_identity(self) -> dict[str, Any]:
        """What the conditioning depends on besides the row (the conditioning cache's key and check): the policy's
        text encoder (its checkpoint, or the random seed) and the dtype the source tokens are cast to."""
        return dict(self.identity)

    @property
    def transformer(self) -> nn.Module:
        return self.policy.transformer

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.policy.latent_shape

    def conditioning(self, samples):
        with torch.no_grad():
            return self.policy.conditioning(self.source_images(samples), [s.prompt for s in samples])

    def index_conditioning(self, cond, index: torch.Tensor):
        return index_conditioning(cond, index)

    def cat_conditioning(self, conds):
        return cat_conditioning(conds)

    def velocity_fn(self, cond, transformer: nn.Module | None = None):
        from nftcore.models import edit_velocity_fn

        return edit_velocity_fn(transformer if transformer is not None else self.policy.transformer, cond)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return self.policy.sigmas(num_steps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.policy.decode(latents)

    def source_images(self, samples) -> torch.Tensor:
        return torch.stack([s.image for s in samples]).to(self.device)

    def target_images(self, samples) -> torch.Tensor:
        return torch.stack([s.task.target_image for s in samples])

    def reward_metadata(self, sample) -> dict[str, Any]:
        return {**sample.metadata, "requirement": sample.requirement, "sample_id": sample.sample_id,
                "task": sample.task}

    def default_reward(self):
        return DemoReward()


MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # `model.dtype` values


def _demo_identity(cfg: TrainConfig, size: int) -> dict[str, Any]:
    import hashlib
    from pathlib import Path

    from nftcore.demo.model import ASSET

    kind, _, seed = cfg.model.path.partition(":")
    if kind in ("random", "tiny"):
        model = f"{kind}:{int(seed or 0)}"
    else:  # a checkpoint: its bytes (a few MB) name the trained text encoder
        path = Path(cfg.model.path or ASSET).resolve()
        model = f"{path}#{hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()}"
    return {"family": "demo", "model": model, "dtype": cfg.model.dtype, "resolution": size}


def _reject_for_demo(cfg: TrainConfig) -> None:
    """Settings the demo family cannot honour: an error naming the key rather than a silently ignored value."""
    s = cfg.sampling
    problems = [message for message, bad in (
        (f"sampling.guidance_scale={s.guidance_scale}: the demo policy has no guidance embedding; leave it unset",
         s.guidance_scale is not None),
        (f"sampling.true_cfg_scale={s.true_cfg_scale}: the demo policy has no unconditional branch; use 1.0",
         s.true_cfg_scale != 1.0),
        (f"data.path={cfg.data.path!r}: the demo family trains on its embedded world; a dataset folder needs the "
         "flux or qwen_image family", bool(cfg.data.path)),
    ) if bad]
    if problems:
        raise ValueError("model.family='demo' cannot honour:\n  - " + "\n  - ".join(problems))


def build_family(cfg: TrainConfig, device: torch.device, *, load_transformer: bool = True) -> PolicyFamily:
    """The policy family named by `cfg.model.family`. With `data.verify_images`, every image of both splits is
    decoded now (`EditDataset.verify_images`: 'skip' drops unreadable ones like bad lines, 'error' stops), on every
    rank alike, so all ranks keep the same rows; the demo's procedural datasets have no files to verify.

    `load_transformer=False` leaves out the policy transformer where it is big (the real families; the demo's is part
    of its tiny policy): `python -m nftcore.precompute` needs only the frozen encoders."""
    if cfg.model.family == "demo":
        family = DemoFamily(cfg, device)
    elif cfg.model.family in ("flux", "qwen_image"):
        from nftcore.trainer.edit_family import EditFamily

        # The keyword only when it is used: the plain call stays `EditFamily(cfg, device)` (tests stub that).
        family = EditFamily(cfg, device) if load_transformer else EditFamily(cfg, device, load_transformer=False)
    else:
        raise ValueError(f"unknown model.family {cfg.model.family!r}; expected 'demo', 'flux' or 'qwen_image'")
    if cfg.data.verify_images:
        for dataset in (family.train_dataset, family.eval_dataset):
            verify = getattr(dataset, "verify_images", None)
            if callable(verify):
                verify()
    return family


def judge_is_sharded(cfg: TrainConfig, env) -> bool:
    """Whether the in-process judge is FSDP2-sharded (`parallel.shard_reward_model` with more than one rank)."""
    return cfg.parallel.shard_reward_model and env.world_size > 1


def build_reward(cfg: TrainConfig, family: PolicyFamily, env=None) -> Callable[..., RewardResult]:
    """The reward callable of `cfg.reward.backend`: the family's own ('demo'), the MLLM in process ('local') or the
    HTTP judge ('server', `reward.server_url` or $REWARD_SERVER). `env` (a `DistEnv`, default one process) says
    whether `parallel.shard_reward_model` has ranks to shard the local judge over."""
    backend = cfg.reward.backend
    if backend == "demo":
        reward = family.default_reward()
        if reward is None:
            raise ValueError(f"reward.backend='demo' but the {cfg.model.family} family has no built-in reward")
        return reward
    if backend == "server":
        import os

        from nftcore.reward import HTTPReward

        url = cfg.reward.server_url or os.environ.get("REWARD_SERVER", "")
        if not url:
            raise ValueError("reward.backend='server' needs reward.server_url or REWARD_SERVER=host:port")
        url = url if "://" in url else f"http://{url}"
        return HTTPReward(url, timeout=cfg.reward.timeout_s, retries=cfg.reward.max_retries)
    from nftcore.reward import MLLMReward, MLLMScorer
    from nftcore.trainer.distributed import DistEnv

    # The rank's own device (the policy's), not "cuda" = cuda:0, where every rank's judge would pile up.
    device = getattr(getattr(family, "transformer", None), "device", None)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    r = cfg.reward
    dtype = MODEL_DTYPES.get(r.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = env or DistEnv()
    shard = judge_is_sharded(cfg, env)
    # Sharded: rank 0 loads the weights on the CPU, the other ranks only the shapes; shard_judge fills every rank's
    # shards from rank 0 and moves them to the device one group at a time.
    load_on = device if not shard else "cpu" if env.is_main else "meta"
    scorer = MLLMScorer.from_pretrained(r.model, dtype=dtype, device=load_on, min_pixels=r.min_pixels or None,
                                        max_pixels=r.max_pixels or None)
    if shard:
        from nftcore.trainer.inference_sharding import shard_judge

        layers = shard_judge(scorer, device, from_rank0=True)
        if env.is_main:
            print(f"# reward model: FSDP2-sharded over {env.world_size} ranks ({layers} layer groups); scoring runs in step "
                  "on the main thread", flush=True)
    return MLLMReward(scorer)


# ----------------------------------------------------------------------------------------------------------------
# Trainable weights: LoRA adapters on one model, or full fine-tuning with model copies


def _wrapped(fn, context):
    """`fn(x, sigma)` run inside `context()` on every call (adapter switches must wrap each forward)."""
    def call(x, sigma):
        with context():
            return fn(x, sigma)

    return call


class LoRAWeights:
    """θ, θ_old and the reference as three views of one model (Edit-R1): LoRA adapters "default" (trained) and "old"
    (rollouts), and the base weights with adapters disabled. Apply before FSDP2 wrapping."""

    kind = "lora"

    def __init__(self, family: PolicyFamily, cfg: TrainConfig, generator: torch.Generator):
        from nftcore.models.lora import apply_lora

        self.family, self.model = family, family.transformer
        apply_lora(self.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, include_mlp=cfg.lora.include_mlp,
                   init=cfg.lora.init, generator=generator)

    def models(self) -> list[nn.Module]:
        return [self.model]

    def place(self, env, cfg: TrainConfig) -> None:
        """Activation checkpointing and FSDP2 (adapters included: they are applied already)."""
        from nftcore.trainer.distributed import shard_transformer

        shard_transformer(_checkpointing(self.model, cfg), env, cfg)

    def trainable(self) -> list[nn.Parameter]:
        from nftcore.models.lora import trainable_parameters

        return trainable_parameters(self.model, "default")

    def state(self, which: str) -> dict[str, torch.Tensor]:
        """'default' (θ) or 'old' (θ_old), by PEFT name: live tensors for the EMA and the soft update."""
        from nftcore.models.lora import adapter_state

        _reshard(self.model)
        return adapter_state(self.model, which)

    def reshard(self) -> None:
        """Drop FSDP2's gathered copies (see `_reshard`): after weights were swapped in for no-grad forwards."""
        _reshard(self.model)

    def velocity(self, cond, which: str):
        """`fn(x, sigma)` of θ ('default'), θ_old ('old') or the frozen reference ('ref')."""
        from nftcore.models.lora import adapters_disabled, using_adapter

        fn = self.family.velocity_fn(cond)
        if which == "default":
            return fn
        if which == "ref":
            return _wrapped(fn, lambda: adapters_disabled(self.model))
        return _wrapped(fn, lambda: using_adapter(self.model, which))

    def old_and_ref_velocity(self, stacked_cond):
        """`fn(x, sigma)` of θ_old on the first half of the rows and the frozen reference on the second, in one
        forward: the two differ only in the adapter, so the "old" update is added to the first half only
        (`adapter_per_row`). `stacked_cond` is the conditioning for [rows; rows]."""
        from nftcore.models.lora import adapter_per_row

        fn = self.family.velocity_fn(stacked_cond)

        def call(x, sigma):
            with adapter_per_row(self.model, "old", x.shape[0] // 2):
                return fn(x, sigma)

        return call

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Both adapters (the base weights are the pretrained ones, not saved)."""
        return {k: v for k, v in self.model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}

    def export(self, directory) -> None:
        """θ (with whatever weights are loaded, e.g. the EMA swapped in) as PEFT and diffusers LoRA files."""
        from nftcore.models.lora_io import save_diffusers_lora, save_peft_adapter

        save_peft_adapter(self.model, "default", directory / "peft")
        save_diffusers_lora(self.model, "default", directory / "diffusers")


class FullWeights:
    """Full fine-tuning: θ is the model itself (every parameter trained), θ_old a second copy, the reference a third,
    frozen copy (only built when kl_weight > 0 or evaluation is on). For small models, or sharded over many ranks
    (the reference implementation has no full fine-tuning; docs/TRAINING.md has the memory plan).

    Precision: θ's parameters are fp32 masters (FSDP2 shards, or the plain parameters on one rank), so AdamW's
    moments and the gradients are fp32 too and a small update is not rounded away; the forwards compute in
    model.dtype (FSDP2's MixedPrecisionPolicy, or the trainer's autocast unsharded). θ_old and the reference take no
    gradient and stay in model.dtype; the EMA keeps fp32 shadows.
    """

    kind = "full"
    master_dtype = torch.float32

    def __init__(self, family: PolicyFamily, cfg: TrainConfig, generator: torch.Generator):
        self.family, self.model = family, family.transformer
        self.compute_dtype = MODEL_DTYPES[cfg.model.dtype]
        self.keep_ref = cfg.nft.kl_weight > 0 or cfg.eval.every > 0  # the base-model evaluation needs it too
        self.old = self.ref = None
        self.model.requires_grad_(True)

    def place(self, env, cfg: TrainConfig) -> None:
        """θ as fp32 masters (sharded block by block), and the copies. Sharded, each copy is built on the meta
        device, sharded like θ and filled from θ's shards, so no rank ever holds more than the one model it loaded;
        unsharded, the copies are plain deep copies."""
        import copy

        from nftcore.trainer.distributed import shard_transformer

        count = 2 if self.keep_ref else 1
        cls, config = type(self.model), self.model.config
        sharded = env.world_size > 1 and cfg.parallel.shard_transformer
        copies = [] if sharded else [_checkpointing(copy.deepcopy(self.model).requires_grad_(False), cfg)
                                     for _ in range(count)]
        shard_transformer(_checkpointing(self.model, cfg), env, cfg, master_dtype=self.master_dtype,
                          compute_dtype=self.compute_dtype)
        if sharded:
            copies = [self._sharded_copy(cls, config, env, cfg) for _ in range(count)]
        self.old, self.ref = copies[0], copies[1] if self.keep_ref else None

    def _sharded_copy(self, cls, config, env, cfg: TrainConfig) -> nn.Module:
        """A frozen model.dtype copy of θ: built weightless, sharded as θ is, then each local shard copied from θ's."""
        from nftcore.nft.old_policy import local_pair
        from nftcore.trainer.distributed import shard_transformer

        twin = cls(config, dtype=self.compute_dtype, device="meta").requires_grad_(False)
        shard_transformer(_checkpointing(twin, cfg), env, cfg)
        twin.to_empty(device="cpu" if cfg.parallel.cpu_offload else env.device)
        masters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, param in twin.named_parameters():
                local, master = local_pair(param, masters[name])
                local.copy_(master)
        return twin

    def models(self) -> list[nn.Module]:
        return [m for m in (self.model, self.old, self.ref) if m is not None]

    def trainable(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def state(self, which: str) -> dict[str, torch.Tensor]:
        model = self.model if which == "default" else self.old
        _reshard(model)
        return dict(model.named_parameters())

    def reshard(self) -> None:
        for model in self.models():
            _reshard(model)

    def velocity(self, cond, which: str):
        model = {"default": self.model, "old": self.old, "ref": self.ref}[which]
        if model is None:
            raise ValueError("full fine-tuning without a reference copy (kl_weight = 0 and eval off) has no base model")
        return self.family.velocity_fn(cond, model)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"theta.{k}": v for k, v in self.model.state_dict().items()},
                **{f"old.{k}": v for k, v in self.old.state_dict().items()}}

    def export(self, directory, *, write: bool = True, max_shard_size: int | str = "10GB") -> None:
        """θ (with whatever weights are loaded, e.g. the EMA swapped in) in model.dtype as a diffusers transformer
        folder, `directory/transformer` (`FluxTransformer2DModel` / `QwenImageTransformer2DModel.from_pretrained`),
        sharded with an index past `max_shard_size`. FSDP2 shards are gathered one tensor at a time as their file is
        written, so no rank ever holds the whole model: a collective, every rank calls this and only the one with
        `write` writes."""
        from nftcore.models.checkpoint_io import save_pretrained

        _reshard(self.model)
        save_pretrained(self.model, directory / "transformer", max_shard_size=max_shard_size, dtype=self.compute_dtype,
                        write=write)


def _checkpointing(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    if cfg.model.gradient_checkpointing:
        model.set_activation_checkpointing(True)
    return model


def _reshard(model: nn.Module) -> None:
    """Put FSDP2 modules back to their sharded parameters. After a no-grad forward (rollouts, evaluation, θ_old and
    the reference) the last block stays gathered (`reshard_after_forward=False`): its parameters are then plain
    tensors that cannot be paired with the EMA's or θ's DTensors, and a gathered copy made while other weights were
    swapped in would be used again by the next forward."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def build_weights(family: PolicyFamily, cfg: TrainConfig, generator: torch.Generator,
                  kind: str | None = None) -> LoRAWeights | FullWeights:
    """`model.finetune` ('lora' or 'full'), or `kind` when given. Call `place(env, cfg)` next (sharding)."""
    kind = kind or cfg.model.finetune
    if kind not in ("lora", "full"):
        raise ValueError(f"finetune must be 'lora' or 'full', got {kind!r}")
    return FullWeights(family, cfg, generator) if kind == "full" else LoRAWeights(family, cfg, generator)
