"""Batch arithmetic of one epoch for the actual world size (docs/ALGORITHM.md §5.1): the recipe fixes the global
numbers, the launch the world size, so a recipe runs unchanged on 1, 2, 3, 8 or 48 ranks.

    samples_per_epoch = K·G                      (all ranks; global sample g = group·K + k)
    rank shares       = K·G split into world_size contiguous slices whose sizes differ by at most one
    rollout calls     = ceil(largest share / sampling.batch_size), the same number on every rank
    T_train           = int(num_steps · timestep_fraction)

Every rank makes the same number of rollout calls (each is a collective under FSDP2); a rank whose share leaves a
call empty runs it on a copy of its first sample and drops the result. Random draws are keyed by the global sample
index, so the split changes nothing that is computed; only more ranks than samples cannot work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nftcore.config.errors import ConfigError

if TYPE_CHECKING:
    from nftcore.config.sections import TrainConfig


def train_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """T_train = int(num_steps · fraction), the reference's rounding (6 · 0.99 → 5, 10 · 0.99 → 9)."""
    return int(num_steps * timestep_fraction)


def even_split(items: list[int], parts: int) -> list[list[int]]:
    """`items` cut into `parts` contiguous runs whose lengths differ by at most one, longer first (some empty if
    there are fewer items than parts)."""
    q, rem = divmod(len(items), parts)
    bounds = [i * q + min(i, rem) for i in range(parts + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(parts)]


@dataclass(frozen=True)
class BatchPlan:
    """One epoch's batch arithmetic for a given world size (see the module docstring)."""

    world_size: int
    group_size: int  # K
    samples_per_epoch: int  # K·G, over all ranks
    batch_size: int  # sampling.batch_size: the most images per rollout call and per training micro-batch
    optimizer_steps_per_epoch: int
    train_timesteps: int  # T_train: timesteps (backward passes) per sample

    @property
    def shares(self) -> list[int]:
        """Samples per rank per epoch, in rank order."""
        return [len(part) for part in even_split(list(range(self.samples_per_epoch)), self.world_size)]

    @property
    def samples_per_rank(self) -> int:
        """The largest rank share (every share is this or one less)."""
        return math.ceil(self.samples_per_epoch / self.world_size)

    @property
    def rollout_batches_per_rank(self) -> int:
        """Rollout calls per rank per epoch; the same on every rank."""
        return math.ceil(self.samples_per_rank / self.batch_size)

    @property
    def micro_batch_size(self) -> int:
        """Images in the largest rollout call (≤ sampling.batch_size)."""
        return math.ceil(self.samples_per_rank / self.rollout_batches_per_rank)

    @property
    def grad_accum_micro_batches(self) -> int:
        """Micro-batches per optimizer step when no sample is filtered out (filtering only lowers it)."""
        per_step = math.ceil(self.samples_per_rank / self.optimizer_steps_per_epoch)
        return math.ceil(per_step / self.batch_size)

    @property
    def backward_passes_per_step(self) -> int:
        """Backwards summed into one unfiltered optimizer step, per rank."""
        return self.grad_accum_micro_batches * self.train_timesteps

    @property
    def prompts_per_rollout(self) -> float:
        """Prompts (groups) one rollout call covers over all ranks; fractional when groups straddle calls."""
        return self.world_size * self.micro_batch_size / self.group_size

    def rank_samples(self, rank: int) -> list[int]:
        """The global sample indices rank `rank` rolls out, ascending (a contiguous slice)."""
        return even_split(list(range(self.samples_per_epoch)), self.world_size)[rank]

    def owner(self, sample: int) -> int:
        """The rank that rolled out global sample `sample`."""
        q, rem = divmod(self.samples_per_epoch, self.world_size)
        big = rem * (q + 1)  # the first `rem` ranks hold q + 1 samples each
        return sample // (q + 1) if sample < big else rem + (sample - big) // q

    def rollout_batches(self, rank: int) -> list[list[int]]:
        """Rank `rank`'s rollout calls as lists of global sample indices; an empty list is a padding call."""
        return even_split(self.rank_samples(rank), self.rollout_batches_per_rank)

    def summary(self) -> str:
        share = " or ".join(map(str, sorted(set(self.shares), reverse=True)))
        return (f"{self.samples_per_epoch} samples/epoch on {self.world_size} rank(s): {share} per rank in "
                f"{self.rollout_batches_per_rank} rollout call(s) of ≤ {self.micro_batch_size} "
                f"(sampling.batch_size {self.batch_size}); {self.optimizer_steps_per_epoch} optimizer step(s)/epoch, "
                f"each ≤ {self.grad_accum_micro_batches} micro-batch(es) × {self.train_timesteps} timesteps per rank")


def plan_problem(samples: int, steps: int) -> str | None:
    """Why an epoch of `samples` samples cannot be cut into `steps` optimizer steps on any world size; None if fine."""
    if steps > samples:
        return (f"optim.steps_per_epoch = {steps} exceeds the {samples} samples of an epoch (sampling.group_size × "
                "sampling.groups_per_epoch): some steps would have nothing to train on")
    return None


def batch_plan(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """The epoch's batch arithmetic for `cfg` on `world_size` ranks; ConfigError naming the sizes that work if none
    does (more ranks than samples)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be an int ≥ 1, got {world_size!r}")
    s, steps = cfg.sampling, cfg.optim.steps_per_epoch
    samples = s.group_size * s.groups_per_epoch
    if problem := plan_problem(samples, steps):
        raise ConfigError(f"batch plan: {problem}")
    if world_size > samples:
        raise ConfigError(
            f"batch plan for {world_size} rank(s): an epoch has only K·G = {s.group_size} × {s.groups_per_epoch} = "
            f"{samples} samples, so some ranks would roll out nothing; this recipe runs on 1 to {samples} ranks, or "
            f"raise sampling.groups_per_epoch to at least {math.ceil(world_size / s.group_size)}")
    return BatchPlan(world_size=world_size, group_size=s.group_size, samples_per_epoch=samples,
                     batch_size=s.batch_size, optimizer_steps_per_epoch=steps,
                     train_timesteps=train_timesteps(s.num_steps, cfg.nft.timestep_fraction))
