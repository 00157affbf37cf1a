"""Model-agnostic DiffusionNFT algorithm core: tensors in, tensors out (torch, numpy and stdlib only).

- `advantages`: raw rewards → group-relative advantages → optimality probabilities r.
- `filtering`: low-variance group filtering and the permanent prompt ban (§4).
- `old_policy`: the sampling policy's soft-update schedule and update (§1.5).
- `ema`: the evaluation/checkpoint EMA (§1.6).
"""

from nftcore.nft.advantages import GroupStats, group_stats, rewards_to_optimality
from nftcore.nft.ema import EMA
from nftcore.nft.filtering import FILTER_RULES, PromptBan, low_variance_filter
from nftcore.nft.old_policy import OldPolicySchedule, pair_tensors, soft_update_

__all__ = [
    "EMA",
    "FILTER_RULES",
    "GroupStats",
    "OldPolicySchedule",
    "PromptBan",
    "group_stats",
    "low_variance_filter",
    "pair_tensors",
    "rewards_to_optimality",
    "soft_update_",
]
