"""The advantages phase: the epoch's rewards from every rank → optimality r, the low-variance filter, the prompt ban
and the epoch's reward statistics (`AdvantageStats`).

Over the whole epoch, never per rank: a group with any invalid reward (the judge failed, the rollout diverged, the image
did not decode) is dropped and counted, never scored 0 (§11.4); r (§1.3) and the filter (§4.3) see the surviving groups
only. The statistics the official Edit-R1 / DiffusionNFT scripts log per epoch are computed their way, over the
surviving groups: `zero_std_ratio` (groups whose rewards are all equal) and `mean_reward_P` for P in `TOP_PERCENTS` (per
group, the mean of the rewards at or above its (100 − P)th percentile, linearly interpolated; then the mean over groups;
P = 100 is the plain mean of group means).

The logged statistics: docs/TRAINING.md, "Metrics".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from nftcore.config import TrainConfig
from nftcore.nft import PromptBan, low_variance_filter, rewards_to_optimality
from nftcore.trainer.distributed import DistEnv, all_gather_cat
from nftcore.trainer.errors import NonFiniteLossError
from nftcore.trainer.rollout import Rollouts

TOP_PERCENTS = (100, 75, 50, 25, 10)
"""The top-reward percentages the official scripts log as `mean_reward_P`."""


@dataclass
class AdvantageStats:
    """What the advantages phase hands the update, and the epoch's reward statistics for the logs."""

    r: torch.Tensor  # [G·K] optimality in [0, 1] by global sample index; 0 in dropped groups
    train: torch.Tensor  # [G·K] bool: the samples the update trains on (surviving groups that pass the filter)
    reward_mean: float  # over the surviving groups' samples
    reward_std: float
    valid_samples: int  # samples in surviving groups
    filtered_fraction: float  # of the surviving samples, the share the low-variance filter removed
    invalid_rewards: int
    dropped_groups: int
    nonfinite_rollouts: int
    unreadable_images: int
    zero_std_ratio: float
    top_reward_means: dict[str, float] = field(default_factory=dict)  # mean_reward_P for P in TOP_PERCENTS

    def logged(self) -> dict[str, Any]:
        """The statistics as metrics-row fields (everything but the per-sample tensors)."""
        return {"reward_mean": self.reward_mean, "reward_std": self.reward_std, "valid_samples": self.valid_samples,
                "filtered_fraction": self.filtered_fraction, "invalid_rewards": self.invalid_rewards,
                "dropped_groups": self.dropped_groups, "nonfinite_rollouts": self.nonfinite_rollouts,
                "unreadable_images": self.unreadable_images, "zero_std_ratio": self.zero_std_ratio,
                **self.top_reward_means}


def zero_std_ratio(grouped: torch.Tensor) -> float:
    """Share of the groups (rows of `grouped`, [groups, K]) whose rewards all equal: no signal to learn from."""
    return float((grouped.std(dim=1, correction=0) == 0).double().mean())


def top_reward_means(grouped: torch.Tensor) -> dict[str, float]:
    """`mean_reward_P` for P in TOP_PERCENTS over `grouped` ([groups, K]): per group the mean of the rewards at or
    above its (100 − P)th percentile (linear interpolation, numpy's default), then the mean over groups."""
    grouped = grouped.double()
    out = {}
    for percent in TOP_PERCENTS:
        if percent == 100:
            means = grouped.mean(dim=1)
        else:
            threshold = torch.quantile(grouped, 1 - percent / 100, dim=1, keepdim=True)
            top = grouped >= threshold
            means = (grouped * top).sum(dim=1) / top.sum(dim=1)
        out[f"mean_reward_{percent}"] = float(means.mean())
    return out


def epoch_advantages(epoch: int, rollouts: Rollouts, cfg: TrainConfig, env: DistEnv, *, ban: PromptBan, dataset,
                     log: Callable[[str], None]) -> AdvantageStats:
    """Gather the epoch's rewards from every rank; drop invalid groups; r, filter and (filter.ban_prompts) the ban
    over the whole epoch. `ban`: the run's prompt ban, updated here; `dataset`: the train split (its `sample_ids`
    key the ban); `log`: a line for the run's log."""
    k = cfg.sampling.group_size
    scores = all_gather_cat(rollouts.scores, env)
    valid = all_gather_cat(rollouts.valid, env)
    diverged = int((~all_gather_cat(rollouts.finite, env)).sum())
    unreadable = int(all_gather_cat(rollouts.unreadable, env).sum())
    total = scores.numel()
    group = torch.arange(total) // k
    group_ok = valid.view(-1, k).all(dim=1)
    dropped = int((~group_ok).sum())
    if diverged:
        log(f"epoch {epoch}: {diverged} of {total} rollouts are not finite (NaN/inf latents); their groups are "
            "dropped")
    if diverged and not bool(group_ok.any()):
        raise NonFiniteLossError(
            f"epoch {epoch}: {diverged} of {total} rollouts are not finite and no group is left: the policy's "
            f"weights have diverged. Likely causes: a learning rate too high (optim.lr = {cfg.optim.lr:g}), no "
            f"gradient clipping (optim.max_grad_norm = {cfg.optim.max_grad_norm:g}), or fp16 overflow; resume "
            "from the last checkpoint with a lower optim.lr")
    if not bool(group_ok.any()):
        raise RuntimeError(f"epoch {epoch}: every one of the {group_ok.numel()} groups has an invalid reward "
                           f"({int((~valid).sum())} of {total} samples invalid); is the reward backend "
                           f"({cfg.reward.backend}) reachable and working?")
    sel = group_ok[group]
    r_sel, _ = rewards_to_optimality(scores[sel], group[sel], adv_clip_max=cfg.nft.adv_clip_max,
                                     global_std=cfg.nft.global_std, singleton=cfg.nft.singleton)
    keep_sel, filtered = low_variance_filter(scores[sel], group[sel], mean_threshold=cfg.filter.mean_threshold,
                                             std_threshold=cfg.filter.std_threshold, rule=cfg.filter.rule)
    if cfg.filter.ban_prompts:
        ids = dataset.sample_ids
        ban.update(scores[sel], group[sel], [ids[rollouts.groups[int(gi)]] for gi in group[sel]])
    r = torch.zeros(total, dtype=r_sel.dtype)
    r[sel] = r_sel
    train = torch.zeros(total, dtype=torch.bool)
    train[sel] = keep_sel
    good = scores[sel].double()
    grouped = good.view(-1, k)
    return AdvantageStats(r=r, train=train, reward_mean=float(good.mean()), reward_std=float(good.std(correction=0)),
                          valid_samples=int(sel.sum()), filtered_fraction=filtered, invalid_rewards=int((~valid).sum()),
                          dropped_groups=dropped, nonfinite_rollouts=diverged, unreadable_images=unreadable,
                          zero_std_ratio=zero_std_ratio(grouped), top_reward_means=top_reward_means(grouped))
