"""Low-variance group filtering and the permanent prompt ban.

When every rollout of a prompt already scores high and alike (mean > τμ, std < τσ), its advantages are mostly MLLM
noise divided by a tiny spread, so its gradient is worth dropping. The paper and the official code disagree on the
exact rule, so `low_variance_filter` makes it a choice:

- "paper" (default): drop a group when mean > τμ AND std < τσ (§4.1).
- "code": keep a group only when std > τσ AND mean < τμ, i.e. drop it when std ≤ τσ OR mean ≥ τμ (§4.2 a). This is
  the official code's loss mask, stricter than the paper's rule.
- "none": keep everything.

`PromptBan` is the separate, stateful mechanism of §4.2 b: a group that meets the paper's AND rule is banned from
all future sampling. It is keyed on a stable sample id (e.g. instruction + source image), not on the instruction
text alone, so two images that share an instruction are judged separately (§11.3).

Means and stds are those of the *raw* rewards: population std (ddof 0), computed in float64 (`group_stats`).
Comparisons are strict, as in both sources.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from nftcore.nft.advantages import group_stats

FILTER_RULES = ("paper", "code", "none")
DEFAULT_MEAN_THRESHOLD = 0.9  # τμ
DEFAULT_STD_THRESHOLD = 0.05  # τσ


def _check_thresholds(mean_threshold: float, std_threshold: float) -> tuple[float, float]:
    for name, value in (("mean_threshold", mean_threshold), ("std_threshold", std_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if std_threshold < 0:
        raise ValueError(f"std_threshold must be ≥ 0, got {std_threshold!r}")
    return float(mean_threshold), float(std_threshold)


def _saturated(mean: torch.Tensor, std: torch.Tensor, mean_threshold: float, std_threshold: float) -> torch.Tensor:
    """The paper's AND rule, per group: already good and already consistent, nothing left to learn."""
    return (mean > mean_threshold) & (std < std_threshold)


def low_variance_filter(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    mean_threshold: float = DEFAULT_MEAN_THRESHOLD,
    std_threshold: float = DEFAULT_STD_THRESHOLD,
    rule: str = "paper",
) -> tuple[torch.Tensor, float]:
    """Decide, per group, whether its samples contribute to the loss.

    Args:
        rewards: float `[B]` raw rewards (finite); validated as in `rewards_to_optimality`.
        group_ids: integer `[B]`; samples sharing an id form a group.
        mean_threshold: τμ. std_threshold: τσ.
        rule: "paper", "code" or "none" (see the module docstring).

    Returns:
        `(keep, filtered_fraction)`: `keep` is a bool `[B]` on the rewards' device, equal within a group.
        `filtered_fraction` is the fraction of *groups* dropped (a Python float in [0, 1]), the number §11.2 asks to
        report. The per-sample fraction, which differs when groups have unequal sizes, is `1 − keep.float().mean()`.

    A one-sample group has std 0, so it counts as low-variance. Advantages should still be computed over the whole
    batch, filtered groups included (§4.2 a); this only masks the loss.
    """
    if rule not in FILTER_RULES:
        raise ValueError(f"unknown filter rule {rule!r}; valid rules are {FILTER_RULES}")
    mean_threshold, std_threshold = _check_thresholds(mean_threshold, std_threshold)
    stats = group_stats(rewards, group_ids)
    if rule == "paper":
        keep_group = ~_saturated(stats.mean, stats.std, mean_threshold, std_threshold)
    elif rule == "code":
        keep_group = (stats.std > std_threshold) & (stats.mean < mean_threshold)
    else:
        keep_group = torch.ones_like(stats.mean, dtype=torch.bool)
    filtered_fraction = float((~keep_group).sum().item()) / stats.num_groups
    return keep_group[stats.inverse], filtered_fraction


class PromptBan:
    """Permanent ban list of sample keys whose rollouts have saturated (§4.2 b, paper AND rule).

    Typical use in a trainer::

        ban = PromptBan()                                    # τμ = 0.9, τσ = 0.05
        newly_banned = ban.update(rewards, group_ids, keys)  # after scoring an epoch; keys: one str per sample
        next_epoch_keys = ban.filter_keys(dataset_keys)      # sample only from these
        checkpoint["prompt_ban"] = ban.state_dict()          # plain JSON types

    A key is a stable sample id string chosen by the trainer (instruction + source image, not the instruction text
    alone). Bans are never lifted: a saturated prompt stays out of sampling for the rest of the run, as in the
    reference. A one-sample group has std 0, so a single high reward is enough to ban its key.
    """

    def __init__(
        self, mean_threshold: float = DEFAULT_MEAN_THRESHOLD, std_threshold: float = DEFAULT_STD_THRESHOLD
    ) -> None:
        self.mean_threshold, self.std_threshold = _check_thresholds(mean_threshold, std_threshold)
        self._banned: set[str] = set()

    def update(self, rewards: torch.Tensor, group_ids: torch.Tensor, keys: Sequence[str]) -> list[str]:
        """Ban the key of every group with std < τσ AND mean > τμ; return the keys banned by this call, sorted.

        `keys[i]` is sample i's key. All samples of one group must share a key (a group *is* one key's rollouts);
        a group with mixed keys is a ValueError, since banning one of them would be arbitrary. Several groups may
        share a key (the same sample drawn twice in an epoch); any one of them saturating bans it.
        """
        stats = group_stats(rewards, group_ids)
        keys = list(keys)
        if len(keys) != stats.inverse.numel():
            raise ValueError(f"keys must have one entry per sample; got {len(keys)} keys for {stats.inverse.numel()}")
        group_key: list[str | None] = [None] * stats.num_groups
        for sample, (group, key) in enumerate(zip(stats.inverse.tolist(), keys)):
            if not isinstance(key, str):
                raise ValueError(f"keys[{sample}] must be a str, got {type(key).__name__}")
            if group_key[group] is None:
                group_key[group] = key
            elif group_key[group] != key:
                raise ValueError(
                    f"group id {stats.ids[group].item()} mixes keys {group_key[group]!r} and {key!r} (at sample "
                    f"{sample}); all samples of a group must share one key"
                )
        saturated = _saturated(stats.mean, stats.std, self.mean_threshold, self.std_threshold).tolist()
        newly = {key for key, hit in zip(group_key, saturated) if hit and key not in self._banned}
        self._banned |= newly
        return sorted(newly)

    def is_banned(self, key: str) -> bool:
        return key in self._banned

    def __contains__(self, key: object) -> bool:
        return key in self._banned

    def __len__(self) -> int:
        return len(self._banned)

    @property
    def banned(self) -> list[str]:
        """The banned keys, sorted (a copy: mutating it does not touch the ban)."""
        return sorted(self._banned)

    def filter_keys(self, keys: Iterable[str]) -> list[str]:
        """The keys that are not banned, in their original order (duplicates kept)."""
        return [key for key in keys if key not in self._banned]

    def state_dict(self) -> dict[str, Any]:
        """Thresholds and the sorted ban list, as plain JSON-serialisable types."""
        return {"mean_threshold": self.mean_threshold, "std_threshold": self.std_threshold, "banned": self.banned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore thresholds and bans exactly as saved (replacing, not merging with, the current ban list)."""
        missing = {"mean_threshold", "std_threshold", "banned"} - set(state)
        if missing:
            raise ValueError(f"PromptBan state is missing {sorted(missing)}")
        banned = state["banned"]
        if isinstance(banned, str) or not all(isinstance(key, str) for key in banned):
            raise ValueError("PromptBan state 'banned' must be a list of str")
        self.mean_threshold, self.std_threshold = _check_thresholds(state["mean_threshold"], state["std_threshold"])
        self._banned = set(banned)

    def __repr__(self) -> str:
        return (
            f"PromptBan(mean_threshold={self.mean_threshold}, std_threshold={self.std_threshold}, "
            f"banned={len(self._banned)})"
        )
