"""Low-variance group filtering and the prompt ban (nftcore.nft.filtering)."""

import json

import numpy as np
import pytest
import torch

from nftcore.nft import FILTER_RULES, PromptBan, low_variance_filter

# Four groups of four, one per corner of the (mean vs τμ = 0.9, std vs τσ = 0.05) plane:
GROUP_REWARDS = {
    0: [0.95, 0.96, 0.95, 0.96],  # high mean, low std   → paper drops, code drops
    1: [0.30, 0.30, 0.31, 0.31],  # low mean,  low std   → paper keeps, code drops
    2: [0.80, 1.00, 0.85, 1.00],  # high mean, high std  → paper keeps, code drops
    3: [0.20, 0.50, 0.70, 0.40],  # normal               → both keep
}
REWARDS = torch.tensor([x for g in GROUP_REWARDS.values() for x in g], dtype=torch.float64)
GROUP_IDS = torch.tensor([g for g, xs in GROUP_REWARDS.items() for _ in xs])


def _per_sample(group_flags):
    return [flag for g, xs in GROUP_REWARDS.items() for flag in [group_flags[g]] * len(xs)]


def test_fixture_groups_sit_where_intended():
    stats = {g: (np.mean(xs), np.std(xs)) for g, xs in GROUP_REWARDS.items()}
    assert stats[0][0] > 0.9 and stats[0][1] < 0.05
    assert stats[1][0] < 0.9 and stats[1][1] < 0.05
    assert stats[2][0] > 0.9 and stats[2][1] > 0.05
    assert stats[3][0] < 0.9 and stats[3][1] > 0.05


@pytest.mark.parametrize(
    "rule, kept_groups, fraction",
    [
        ("paper", {1, 2, 3}, 0.25),
        ("code", {3}, 0.75),
        ("none", {0, 1, 2, 3}, 0.0),
    ],
)
def test_rules_separate_the_four_corners(rule, kept_groups, fraction):
    keep, filtered_fraction = low_variance_filter(REWARDS, GROUP_IDS, rule=rule)
    assert keep.dtype == torch.bool and keep.shape == REWARDS.shape
    assert keep.tolist() == _per_sample({g: g in kept_groups for g in GROUP_REWARDS})
    assert isinstance(filtered_fraction, float)
    assert filtered_fraction == fraction


def test_default_rule_is_the_papers():
    assert low_variance_filter(REWARDS, GROUP_IDS)[0].tolist() == low_variance_filter(
        REWARDS, GROUP_IDS, rule="paper"
    )[0].tolist()


def test_filtered_fraction_counts_groups_not_samples():
    # A saturated group of 2 and a normal group of 6: half the groups, a quarter of the samples.
    rewards = torch.tensor([0.97, 0.97, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    ids = torch.tensor([5, 5, 9, 9, 9, 9, 9, 9])
    keep, fraction = low_variance_filter(rewards, ids)
    assert keep.tolist() == [False, False] + [True] * 6
    assert fraction == 0.5
    assert 1 - keep.float().mean().item() == 0.25


def test_thresholds_are_strict_and_configurable():
    # mean exactly τμ, std exactly 0: the paper keeps it (needs mean > τμ), the code drops it (needs mean < τμ).
    rewards = torch.tensor([0.9, 0.9], dtype=torch.float64)
    ids = torch.tensor([0, 0])
    assert low_variance_filter(rewards, ids, rule="paper")[0].tolist() == [True, True]
    assert low_variance_filter(rewards, ids, rule="code")[0].tolist() == [False, False]
    # Lowering τμ makes the same group saturated under the paper rule.
    assert low_variance_filter(rewards, ids, mean_threshold=0.8)[0].tolist() == [False, False]
    # Raising τσ above group 2's spread (≈ 0.089) drops it too.
    keep, fraction = low_variance_filter(REWARDS, GROUP_IDS, std_threshold=0.1)
    assert keep.tolist() == _per_sample({0: False, 1: True, 2: False, 3: True})
    assert fraction == 0.5


def test_singleton_group_counts_as_zero_variance():
    keep, fraction = low_variance_filter(torch.tensor([0.95, 0.1, 0.5]), torch.tensor([0, 1, 1]))
    assert keep.tolist() == [False, True, True]
    assert fraction == 0.5


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="paper.*code.*none"):
        low_variance_filter(REWARDS, GROUP_IDS, rule="strict")
    assert FILTER_RULES == ("paper", "code", "none")


def test_inputs_are_validated():
    with pytest.raises(ValueError, match=r"indices \[1\]"):
        low_variance_filter(torch.tensor([0.1, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"rewards \(3,\) and group_ids \(2,\)"):
        low_variance_filter(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_ids"):
        low_variance_filter(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="std_threshold"):
        low_variance_filter(REWARDS, GROUP_IDS, std_threshold=float("nan"))


# ---------------------------------------------------------------------------------------------- prompt ban

KEYS = {0: "make it snowy|img_001", 1: "add a hat|img_002", 2: "remove the car|img_003", 3: "add a hat|img_004"}
SAMPLE_KEYS = [KEYS[g] for g in GROUP_IDS.tolist()]


def test_ban_uses_the_paper_and_rule_and_is_permanent():
    ban = PromptBan()
    assert ban.update(REWARDS, GROUP_IDS, SAMPLE_KEYS) == [KEYS[0]]  # only the high-mean, low-std group
    assert ban.is_banned(KEYS[0]) and KEYS[0] in ban and len(ban) == 1
    assert not ban.is_banned(KEYS[1]) and not ban.is_banned(KEYS[2])
    # The same instruction on another image is a different key and stays allowed.
    assert not ban.is_banned("make it snowy|img_999")
    # Already banned: no news. A later epoch where the key scores badly does not lift the ban.
    assert ban.update(REWARDS, GROUP_IDS, SAMPLE_KEYS) == []
    assert ban.update(torch.tensor([0.1, 0.5]), torch.tensor([0, 0]), [KEYS[0]] * 2) == []
    assert ban.banned == [KEYS[0]]


def test_filter_keys_keeps_order_and_duplicates():
    ban = PromptBan()
    ban.update(REWARDS, GROUP_IDS, SAMPLE_KEYS)
    keys = [KEYS[3], KEYS[0], KEYS[1], KEYS[3]]
    assert ban.filter_keys(keys) == [KEYS[3], KEYS[1], KEYS[3]]
    assert ban.filter_keys(iter(keys)) == [KEYS[3], KEYS[1], KEYS[3]]


def test_ban_rejects_inconsistent_keys():
    ban = PromptBan()
    mixed = list(SAMPLE_KEYS)
    mixed[1] = "something else"
    with pytest.raises(ValueError, match="group id 0 mixes keys"):
        ban.update(REWARDS, GROUP_IDS, mixed)
    with pytest.raises(ValueError, match="one entry per sample"):
        ban.update(REWARDS, GROUP_IDS, SAMPLE_KEYS[:-1])
    with pytest.raises(ValueError, match=r"keys\[0\] must be a str"):
        ban.update(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), [1, 1])
    assert len(ban) == 0  # nothing half-applied


def test_ban_state_round_trips_through_json():
    ban = PromptBan(mean_threshold=0.85, std_threshold=0.06)
    ban.update(REWARDS, GROUP_IDS, SAMPLE_KEYS)
    ban.update(torch.tensor([0.9, 0.92]), torch.tensor([3, 3]), ["late|img_7"] * 2)
    state = json.loads(json.dumps(ban.state_dict()))
    assert state == {"mean_threshold": 0.85, "std_threshold": 0.06, "banned": sorted([KEYS[0], "late|img_7"])}

    restored = PromptBan()
    restored.load_state_dict(state)
    assert restored.banned == ban.banned
    assert (restored.mean_threshold, restored.std_threshold) == (0.85, 0.06)
    # Same behaviour afterwards: a group with mean 0.87 is saturated under τμ = 0.85 but not under the default.
    probe = (torch.tensor([0.87, 0.87]), torch.tensor([0, 0]), ["probe|img"] * 2)
    assert restored.update(*probe) == ban.update(*probe) == ["probe|img"]
    assert restored.filter_keys([KEYS[0], KEYS[1], "probe|img"]) == [KEYS[1]]


def test_ban_load_replaces_and_validates():
    ban = PromptBan()
    ban.update(REWARDS, GROUP_IDS, SAMPLE_KEYS)
    ban.load_state_dict({"mean_threshold": 0.9, "std_threshold": 0.05, "banned": ["other"]})
    assert ban.banned == ["other"]
    with pytest.raises(ValueError, match="missing"):
        ban.load_state_dict({"banned": []})
    with pytest.raises(ValueError, match="list of str"):
        ban.load_state_dict({"mean_threshold": 0.9, "std_threshold": 0.05, "banned": [1]})
    with pytest.raises(ValueError, match="std_threshold"):
        PromptBan(std_threshold=-0.1)
