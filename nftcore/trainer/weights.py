"""The trainable-weights strategies: θ, θ_old and the reference as velocity functions for the loop, plus the tensors
to optimise, average, save and export.

- `LoRAWeights` (model.finetune = 'lora', Edit-R1): adapters "default" (θ) and "old" (θ_old) on one model, the
  reference = adapters disabled.
- `FullWeights` ('full'): the model itself as fp32 masters (θ), a copy for θ_old, a frozen copy for the reference.

Which of the three is meant is a `roles.Role`; the LoRA layer below is given its string value (the adapter name).

See docs/ALGORITHM.md §0 (the three policies) and §1.7 (LoRA or full fine-tuning).
"""

from __future__ import annotations

import torch
from torch import nn

from nftcore.config import TrainConfig
from nftcore.family import MODEL_DTYPES, PolicyFamily
from nftcore.trainer.roles import Role


def _wrapped(fn, context):
    """`fn(x, sigma)` run inside `context()` on every call (adapter switches must wrap each forward)."""
    def call(x, sigma):
        with context():
            return fn(x, sigma)

    return call


class LoRAWeights:
    """θ, θ_old and the reference as three views of one model (Edit-R1): LoRA adapters "default" (`Role.THETA`,
    trained) and "old" (`Role.OLD`, rollouts), and the base weights with adapters disabled (`Role.REF`). Apply
    before FSDP2 wrapping."""

    kind = "lora"

    def __init__(self, family: PolicyFamily, cfg: TrainConfig, generator: torch.Generator):
        from nftcore.models.lora import apply_lora

        self.family, self.model = family, family.transformer
        apply_lora(self.model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, include_mlp=cfg.lora.include_mlp,
                   init=cfg.lora.init, generator=generator)

    def models(self) -> list[nn.Module]:
        return [self.model]

    def place(self, env, cfg: TrainConfig) -> None:
        """Activation checkpointing and FSDP2 (adapters included: they are applied already); then, on an unsharded
        model whose adapted weights are small, the merged-weight cache of the no-grad forwards."""
        from nftcore.models.lora import enable_merged_weight_cache
        from nftcore.trainer.distributed import fsdp_modules, shard_transformer

        shard_transformer(_checkpointing(self.model, cfg), env, cfg)
        if not fsdp_modules([self.model]) and enable_merged_weight_cache(self.model) > MERGED_CACHE_MAX_BYTES:
            enable_merged_weight_cache(self.model, False)

    def trainable(self) -> list[nn.Parameter]:
        from nftcore.models.lora import trainable_parameters

        return trainable_parameters(self.model, Role.THETA.value)

    def state(self, which: Role | str) -> dict[str, torch.Tensor]:
        """θ or θ_old, by PEFT name: live tensors for the EMA and the soft update."""
        from nftcore.models.lora import adapter_state

        which = _adapter(which)
        _reshard(self.model)
        return adapter_state(self.model, which.value)

    def reshard(self) -> None:
        """Drop FSDP2's gathered copies (see `_reshard`): after weights were swapped in for no-grad forwards."""
        _reshard(self.model)

    def velocity(self, cond, which: Role | str):
        """`fn(x, sigma)` of θ, θ_old or the frozen reference."""
        from nftcore.models.lora import adapters_disabled, using_adapter

        fn = self.family.velocity_fn(cond)
        which = Role(which)
        if which is Role.THETA:
            return fn
        if which is Role.REF:
            return _wrapped(fn, lambda: adapters_disabled(self.model))
        return _wrapped(fn, lambda: using_adapter(self.model, which.value))

    def old_and_ref_velocity(self, stacked_cond):
        """`fn(x, sigma)` of θ_old on the first half of the rows and the frozen reference on the second, in one
        forward: the two differ only in the adapter, so the "old" update is added to the first half only
        (`adapter_per_row`). `stacked_cond` is the conditioning for [rows; rows]."""
        from nftcore.models.lora import adapter_per_row

        fn = self.family.velocity_fn(stacked_cond)

        def call(x, sigma):
            with adapter_per_row(self.model, Role.OLD.value, x.shape[0] // 2):
                return fn(x, sigma)

        return call

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Both adapters (the base weights are the pretrained ones, not saved)."""
        return {k: v for k, v in self.model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}

    def export(self, directory) -> None:
        """θ (with whatever weights are loaded, e.g. the EMA swapped in) as PEFT and diffusers LoRA files."""
        from nftcore.models.lora_io import save_diffusers_lora, save_peft_adapter

        save_peft_adapter(self.model, Role.THETA.value, directory / "peft")
        save_diffusers_lora(self.model, Role.THETA.value, directory / "diffusers")


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

    def state(self, which: Role | str) -> dict[str, torch.Tensor]:
        model = self.model if _adapter(which) is Role.THETA else self.old
        _reshard(model)
        return dict(model.named_parameters())

    def reshard(self) -> None:
        for model in self.models():
            _reshard(model)

    def velocity(self, cond, which: Role | str):
        model = {Role.THETA: self.model, Role.OLD: self.old, Role.REF: self.ref}[Role(which)]
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


def _adapter(which: Role | str) -> Role:
    """θ or θ_old: the two roles with trainable state (the reference has none)."""
    which = Role(which)
    if which is Role.REF:
        raise ValueError("the reference has no trainable state: ask for Role.THETA or Role.OLD")
    return which


def _checkpointing(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    if cfg.model.gradient_checkpointing:
        model.set_activation_checkpointing(True)
    return model


# The no-grad forwards (rollouts, θ_old + reference, evaluation) run on W + scale·BA rebuilt per call; the LoRA
# layers may keep it while the adapter is unchanged (a rollout phase reuses θ_old through every sampler step). That
# pays for small models, where rebuilding costs as much as the GEMMs; for large ones the rebuild is ~rank/tokens of
# the forward, so the extra copy of the adapted weights is not worth its memory above this size.
MERGED_CACHE_MAX_BYTES = 256 * 2**20


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
