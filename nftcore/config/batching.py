"""Batch arithmetic of one epoch, derived from the actual world size (ALGORITHM.md §5.1).

The reference configs solve for a per-GPU batch against a hard-coded GPU count (48 for Qwen, 24 for Kontext) and
then only run on that count. Here the world size is an input, so the same recipe plans correctly on 1, 8 or 48 ranks,
and a world size that cannot work is an error that says which sizes would:

    samples_per_epoch        = K·G                                  (all ranks)
    rollout_batches_per_rank = K·G / (world_size · batch_size)      must be whole
    grad_accum               = rollout_batches_per_rank / optimizer steps per epoch   must be whole
    T_train                  = int(num_steps · timestep_fraction)

Each rollout batch is then one training micro-batch, and every (sample, timestep) pair one backward pass, so an
optimizer step takes grad_accum · T_train backwards (the loss is divided by that).

One reference constraint is deliberately dropped: world_size · batch_size divisible by K. The reference sampler draws
whole groups per rollout call; nftcore plans the epoch's G·K draws at once (G prompts × K repeats, shuffled with a seed
shared by all ranks, cut into world_size · batch_size slices), so a group may straddle calls. Group statistics are
taken after the whole epoch is scored in both designs, so nothing changes but that K = 12 recipes also run on 1, 2 or
4 ranks. `BatchPlan.prompts_per_rollout` is fractional exactly when groups straddle calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nftcore.config.errors import ConfigError

if TYPE_CHECKING:
    from nftcore.config.sections import TrainConfig

_MAX_SUGGESTIONS = 16


def train_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """T_train = int(num_steps · fraction), the reference's rounding (6 · 0.99 → 5, 10 · 0.99 → 9)."""
    return int(num_steps * timestep_fraction)


def _splits(samples: int, world_size: int, batch_size: int, steps: int) -> bool:
    per_call = world_size * batch_size
    return samples % per_call == 0 and (samples // per_call) % steps == 0


def _show(values: list[int]) -> str:
    if not values:
        return "none"
    shown = ", ".join(map(str, values[:_MAX_SUGGESTIONS]))
    return shown if len(values) <= _MAX_SUGGESTIONS else f"{shown}, …"


def split_problem(group_size: int, groups: int, world_size: int, batch_size: int, steps: int) -> str | None:
    """Why K·G samples per epoch do not split into world_size × batch_size rollout calls and `steps` optimizer
    steps, with the world sizes and batch sizes that would; None when they split."""
    samples = group_size * groups
    if _splits(samples, world_size, batch_size, steps):
        return None
    per_call = world_size * batch_size
    if samples % per_call:
        why = (f"K·G = {group_size} × {groups} = {samples} samples per epoch do not split into rollout calls of "
               f"{world_size} rank(s) × sampling.batch_size {batch_size} = {per_call} "
               f"({samples} % {per_call} = {samples % per_call})")
    else:
        batches = samples // per_call
        good_steps = [s for s in range(1, batches + 1) if batches % s == 0]
        why = (f"the {batches} rollout batches per rank ({samples} / ({world_size} × {batch_size})) do not split into "
               f"optim.steps_per_epoch = {steps} optimizer steps (valid steps_per_epoch here: {_show(good_steps)})")
    worlds = [w for w in range(1, samples // batch_size + 1) if _splits(samples, w, batch_size, steps)]
    batch_sizes = [b for b in range(1, samples // world_size + 1) if _splits(samples, world_size, b, steps)]
    return (f"{why}; with batch_size {batch_size} and steps_per_epoch {steps} valid world sizes are {_show(worlds)}; "
            f"on {world_size} rank(s) valid sampling.batch_size values are {_show(batch_sizes)}")


@dataclass(frozen=True)
class BatchPlan:
    """One epoch's batch arithmetic for a given world size (see the module docstring)."""

    world_size: int
    group_size: int  # K
    samples_per_epoch: int  # K·G, over all ranks
    samples_per_rank: int  # per rank per epoch
    rollout_batches_per_rank: int  # rollout calls per rank per epoch; each is one training micro-batch
    micro_batch_size: int  # = sampling.batch_size
    optimizer_steps_per_epoch: int
    grad_accum_micro_batches: int  # micro-batches per optimizer step
    train_timesteps: int  # T_train: timesteps (backward passes) per sample

    @property
    def backward_passes_per_step(self) -> int:
        """Backwards summed into one optimizer step; the loss is divided by this."""
        return self.grad_accum_micro_batches * self.train_timesteps

    @property
    def prompts_per_rollout(self) -> float:
        """Prompts (groups) one rollout call covers over all ranks; fractional when groups straddle calls."""
        return self.world_size * self.micro_batch_size / self.group_size

    def summary(self) -> str:
        return (f"{self.samples_per_epoch} samples/epoch on {self.world_size} rank(s): {self.samples_per_rank} per "
                f"rank in {self.rollout_batches_per_rank} batches of {self.micro_batch_size}; "
                f"{self.optimizer_steps_per_epoch} optimizer step(s)/epoch, each {self.grad_accum_micro_batches} "
                f"micro-batches × {self.train_timesteps} timesteps = {self.backward_passes_per_step} backwards")


def batch_plan(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """The epoch's batch arithmetic for `cfg` on `world_size` ranks; ConfigError (with valid alternatives) if the
    epoch does not split evenly."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be an int ≥ 1, got {world_size!r}")
    s, steps = cfg.sampling, cfg.optim.steps_per_epoch
    samples = s.group_size * s.groups_per_epoch
    problem = split_problem(s.group_size, s.groups_per_epoch, world_size, s.batch_size, steps)
    if problem:
        raise ConfigError(f"batch plan for {world_size} rank(s): {problem}")
    batches = samples // (world_size * s.batch_size)
    return BatchPlan(
        world_size=world_size,
        group_size=s.group_size,
        samples_per_epoch=samples,
        samples_per_rank=samples // world_size,
        rollout_batches_per_rank=batches,
        micro_batch_size=s.batch_size,
        optimizer_steps_per_epoch=steps,
        grad_accum_micro_batches=batches // steps,
        train_timesteps=train_timesteps(s.num_steps, cfg.nft.timestep_fraction),
    )
