"""Group-relative reward normalisation: raw rewards → advantages → optimality probabilities.

DiffusionNFT trains on an optimality probability `r ∈ [0, 1]` per sample, not on the raw reward. The raw reward is
first centred on its group's mean (a group = the K rollouts of one prompt/sample id in this epoch), scaled by a std,
and the clipped advantage is mapped linearly onto [0, 1] (§1.3, §1.2 step 3):

    A = (reward − group_mean) / (std + 1e-4)
    r = clip(clip(A, ±A_max) / (2·A_max) + ½, 0, 1)

`group_stats` is the shared vectorised group reduction; `filtering.py` reuses it so both modules agree exactly on
what a group's mean and std are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STD_EPS = 1e-4  # added to the std before dividing (§1.3); also keeps a zero-variance batch finite
SINGLETON_POLICIES = ("error", "global")
_MAX_LISTED = 20  # how many offending indices/ids an error message spells out


@dataclass(frozen=True)
class GroupStats:
    """Per-group reduction of one batch of rewards.

    All statistics are float64 on the rewards' device. `std` is the population std (ddof 0), as numpy's default,
    which is what the reference tracker uses for both normalisation and filtering.
    """

    ids: torch.Tensor  # [G] the distinct group ids, ascending (int64)
    inverse: torch.Tensor  # [B] position of each sample's group in `ids` (int64)
    counts: torch.Tensor  # [G] samples per group (int64)
    mean: torch.Tensor  # [G] group mean of the raw rewards (float64)
    std: torch.Tensor  # [G] group population std of the raw rewards (float64)

    @property
    def num_groups(self) -> int:
        return self.ids.numel()


def _describe(values: list, limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown if len(values) <= limit else f"{shown}, … ({len(values)} in total)"


def validate_rewards_and_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the `[B]` reward / group-id pair every function here takes; return (float64 rewards, int64 ids).

    The ids are moved to the rewards' device (ids are often built on CPU while rewards arrive on the GPU). Rewards
    are detached: normalisation is a statistic of the batch, never part of the autograd graph. Non-finite rewards
    are rejected rather than silently zeroed or propagated (a failed reward call must not look like a score, §11.4).
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
    if rewards.dim() != 1 or not rewards.dtype.is_floating_point:
        raise ValueError(
            f"rewards must be a 1-D floating tensor [B]; got shape {tuple(rewards.shape)} dtype {rewards.dtype}"
        )
    is_integer = not (group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool)
    if group_ids.dim() != 1 or not is_integer:
        raise ValueError(
            f"group_ids must be a 1-D integer tensor [B]; got shape {tuple(group_ids.shape)} dtype {group_ids.dtype}"
        )
    if rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards and group_ids must have the same length; got rewards {tuple(rewards.shape)} and "
            f"group_ids {tuple(group_ids.shape)}"
        )
    if rewards.numel() == 0:
        raise ValueError("rewards and group_ids are empty (shape (0,)); need at least one sample")
    rewards64 = rewards.detach().to(torch.float64)
    finite = torch.isfinite(rewards64)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"rewards contain non-finite values (NaN/inf) at indices [{_describe(bad)}]")
    return rewards64, group_ids.detach().to(device=rewards.device, dtype=torch.int64)


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Mean and population std of the raw rewards of every group, vectorised (no Python loop over samples).

    Validates the inputs like `rewards_to_optimality`. Two-pass variance (deviations from the group mean) so rewards
    that sit close together, e.g. a group all scoring ≈ 0.96, do not lose their spread to cancellation.
    """
    return _group_stats(*validate_rewards_and_groups(rewards, group_ids))


def _group_stats(rewards64: torch.Tensor, ids64: torch.Tensor) -> GroupStats:
    ids, inverse = torch.unique(ids64, sorted=True, return_inverse=True)
    num_groups = ids.numel()
    counts = torch.zeros(num_groups, dtype=torch.int64, device=rewards64.device).index_add_(
        0, inverse, torch.ones_like(inverse)
    )
    counts64 = counts.to(torch.float64)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=rewards64.device).index_add_(0, inverse, rewards64)
    mean = sums / counts64
    squared_dev = (rewards64 - mean[inverse]).square()
    var = torch.zeros_like(mean).index_add_(0, inverse, squared_dev) / counts64
    return GroupStats(ids=ids, inverse=inverse, counts=counts, mean=mean, std=var.sqrt())


def rewards_to_optimality(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    adv_clip_max: float = 5.0,
    global_std: bool = True,
    singleton: str = "error",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map one epoch's raw rewards to (optimality probability `r`, unclipped advantage `A`), both float32 `[B]`.

    Args:
        rewards: float `[B]` raw rewards (any float dtype; all finite).
        group_ids: integer `[B]`; samples sharing an id form a group (one prompt/sample id's K rollouts).
        adv_clip_max: `A_max`. `A` is clipped to ±A_max before the linear map onto [0, 1], so `r` saturates at
            0/1 exactly when |A| ≥ A_max.
        global_std: divide by the population std of *all* rewards in the batch (the default, §1.3) instead of each
            group's own std. A global scale keeps a near-constant group from having its MLLM noise blown up.
        singleton: what a group with one sample means. "error" (default) raises ValueError naming the group ids:
            with K ≥ 2 this signals broken grouping (mis-keyed samples, a dropped rank). "global" measures such a
            sample against the global mean (and, with global_std=False, the global std) instead of against itself.

    Returns:
        `(r, advantages)`: `r = clip(clip(A, ±A_max)/(2·A_max) + ½, 0, 1)` and `A = (reward − mean) / (std + 1e-4)`
        (unclipped, for logging). Statistics are computed in float64; both outputs are float32 on the rewards'
        device (float64 is needed only for the reduction; the loss consumes float32).
    """
    if not (isinstance(adv_clip_max, (int, float)) and math.isfinite(adv_clip_max) and adv_clip_max > 0):
        raise ValueError(f"adv_clip_max must be a positive finite number, got {adv_clip_max!r}")
    if singleton not in SINGLETON_POLICIES:
        raise ValueError(f"singleton must be one of {SINGLETON_POLICIES}, got {singleton!r}")

    rewards64, ids64 = validate_rewards_and_groups(rewards, group_ids)
    stats = _group_stats(rewards64, ids64)
    is_singleton = stats.counts == 1
    has_singletons = bool(is_singleton.any())
    if has_singletons and singleton == "error":
        lonely = stats.ids[is_singleton].tolist()
        raise ValueError(
            f"group ids [{_describe(lonely)}] have a single sample, so a group-relative advantage is undefined; "
            "fix the grouping or pass singleton='global' to measure them against the batch mean"
        )

    batch_mean = rewards64.mean()
    batch_std = rewards64.std(correction=0)
    group_mean = stats.mean
    group_std = stats.std
    if has_singletons:  # singleton == "global"
        group_mean = torch.where(is_singleton, batch_mean, group_mean)
        group_std = torch.where(is_singleton, batch_std, group_std)

    scale = (batch_std if global_std else group_std[stats.inverse]) + STD_EPS
    advantages = (rewards64 - group_mean[stats.inverse]) / scale
    r = (advantages.clamp(-adv_clip_max, adv_clip_max) / (2.0 * adv_clip_max) + 0.5).clamp(0.0, 1.0)
    return r.to(torch.float32), advantages.to(torch.float32)
