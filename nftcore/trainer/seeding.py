"""Per-sample random draws: every draw of an epoch (rollout noise, training timesteps, training noise, the training
order) comes from a generator seeded by (run seed, epoch, global sample index, what for), so the result does not
depend on the number of ranks or on batching, and an epoch replayed after a resume is identical.

See docs/ALGORITHM.md §8 and docs/DESIGN.md §3.
"""

from __future__ import annotations

import torch

from nftcore.data import derive_seed


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded by `parts` (e.g. run seed, epoch, sample index, purpose)."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def rollout_noise(seed: int, epoch: int, indices: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] starting noise, one generator per global sample index."""
    return torch.stack([torch.randn(shape, generator=generator(seed, epoch, g, "rollout")) for g in indices])


def sample_timesteps(seed: int, epoch: int, g: int, num_steps: int, t_train: int) -> torch.Tensor:
    """The sampler-step indices sample `g` trains on: a random `t_train` of `num_steps`, in random order (§1.4)."""
    return torch.randperm(num_steps, generator=generator(seed, epoch, g, "timesteps"))[:t_train]


def sample_train_noise(seed: int, epoch: int, g: int, t_train: int, shape: tuple[int, ...]) -> torch.Tensor:
    """[t_train, *shape] fresh noise for sample `g`'s training timesteps (not the rollout's noise, §1.2)."""
    return torch.randn((t_train, *shape), generator=generator(seed, epoch, g, "train-noise"))
