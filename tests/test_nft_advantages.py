"""Reward → advantage → optimality normalisation (nftcore.nft.advantages)."""

import math

import numpy as np
import pytest
import torch

from nftcore.nft import group_stats, rewards_to_optimality

EPS = 1e-4

# Two groups of three, interleaved and with non-contiguous ids, so grouping cannot rely on order.
#   group 7: 0.0, 0.5, 1.0   → mean 0.5,  population std sqrt(1/6)
#   group 3: 0.25 ×3         → mean 0.25, population std 0
REWARDS = [0.0, 0.25, 0.5, 0.25, 1.0, 0.25]
GROUPS = [7, 3, 7, 3, 7, 3]


def _r_from_advantage(a: float, a_max: float = 5.0) -> float:
    return min(max(min(max(a, -a_max), a_max) / (2 * a_max) + 0.5, 0.0), 1.0)


def test_hand_computed_global_std():
    # all six rewards: mean 2.25/6 = 0.375; squared deviations sum to 0.59375, so var = 0.59375/6.
    global_std = math.sqrt(0.59375 / 6)
    expected_a = [d / (global_std + EPS) for d in (-0.5, 0.0, 0.0, 0.0, 0.5, 0.0)]
    r, a = rewards_to_optimality(torch.tensor(REWARDS), torch.tensor(GROUPS))
    assert a.dtype == torch.float32 and r.dtype == torch.float32
    assert a.tolist() == pytest.approx(expected_a, abs=1e-6)
    assert r.tolist() == pytest.approx([_r_from_advantage(x) for x in expected_a], abs=1e-6)
    # Cross-check the scale against numpy's population std.
    assert global_std == pytest.approx(float(np.std(np.array(REWARDS))), abs=1e-12)


def test_hand_computed_per_group_std():
    group_std = math.sqrt(1 / 6)  # deviations -0.5, 0, 0.5 around 0.5
    expected_a = [-0.5 / (group_std + EPS), 0.0, 0.0, 0.0, 0.5 / (group_std + EPS), 0.0]
    r, a = rewards_to_optimality(torch.tensor(REWARDS), torch.tensor(GROUPS), global_std=False)
    assert a.tolist() == pytest.approx(expected_a, abs=1e-6)
    assert r.tolist() == pytest.approx([_r_from_advantage(x) for x in expected_a], abs=1e-6)


def test_matches_a_per_group_numpy_loop():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(48, generator=gen, dtype=torch.float64)
    ids = torch.randint(-5, 5, (48,), generator=gen)
    ids[:10] = torch.arange(-5, 5)  # make sure every id has ≥ 2 samples
    ids[10:20] = torch.arange(-5, 5)
    x, g = rewards.numpy(), ids.numpy()
    for global_std in (True, False):
        expected = np.empty_like(x)
        for gid in np.unique(g):
            members = g == gid
            std = x.std() if global_std else x[members].std()
            expected[members] = (x[members] - x[members].mean()) / (std + EPS)
        r, a = rewards_to_optimality(rewards, ids, global_std=global_std)
        np.testing.assert_allclose(a.numpy(), expected, atol=1e-5)
        np.testing.assert_allclose(r.numpy(), np.clip(np.clip(expected, -5, 5) / 10 + 0.5, 0, 1), atol=1e-6)


def test_clip_saturates_r_but_not_the_advantage():
    # One outlier among 37: per-group A = sqrt(36) = 6 > A_max = 5 (up to the 1e-4 epsilon).
    rewards = torch.zeros(37)
    rewards[0] = 1.0
    r, a = rewards_to_optimality(rewards, torch.zeros(37, dtype=torch.int64), global_std=False)
    std = math.sqrt(36) / 37
    assert a[0].item() == pytest.approx((36 / 37) / (std + EPS), rel=1e-6)
    assert a[0].item() > 5.0
    assert r[0].item() == 1.0
    assert r[1].item() == pytest.approx(0.5 + (-1 / 37) / (std + EPS) / 10, abs=1e-6)

    # A smaller A_max: a two-sample group at A ≈ ±1 maps to exactly 0 and 1.
    r, a = rewards_to_optimality(torch.tensor([0.0, 1.0]), torch.tensor([4, 4]), adv_clip_max=0.5)
    assert r.tolist() == [0.0, 1.0]
    assert a.tolist() == pytest.approx([-0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS)], abs=1e-6)


def test_r_at_exactly_plus_minus_a_max():
    # global std of [0, 1] is 0.5, so A = ±0.5/(0.5 + 1e-4); A_max set to exactly that gives r exactly 0 and 1.
    a_max = 0.5 / (0.5 + EPS)
    r, _ = rewards_to_optimality(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([0, 0]),
                                 adv_clip_max=a_max)
    assert r.tolist() == pytest.approx([0.0, 1.0], abs=1e-7)


def test_constant_batch_gives_half():
    r, a = rewards_to_optimality(torch.full((6,), 0.7), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert a.abs().max().item() < 1e-6
    assert r.tolist() == pytest.approx([0.5] * 6, abs=1e-6)


def test_singleton_is_an_error_naming_the_group():
    with pytest.raises(ValueError, match=r"group ids \[42\]"):
        rewards_to_optimality(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0, 0, 42]))


def test_singleton_global_fallback():
    rewards = [0.1, 0.3, 0.9]
    x = np.array(rewards, dtype=np.float64)
    mean, std = x.mean(), x.std()
    for global_std in (True, False):
        r, a = rewards_to_optimality(torch.tensor(rewards, dtype=torch.float64), torch.tensor([0, 0, 42]),
                                     global_std=global_std, singleton="global")
        pair_std = std if global_std else 0.1  # group 0 = {0.1, 0.3}: population std 0.1
        assert a[0].item() == pytest.approx(-0.1 / (pair_std + EPS), rel=1e-6)
        # The singleton is measured against the batch mean and (in both modes) the batch std.
        assert a[2].item() == pytest.approx((0.9 - mean) / (std + EPS), rel=1e-6)
        assert r[2].item() == pytest.approx(_r_from_advantage(a[2].item()), abs=1e-6)


def test_single_sample_batch_with_global_fallback():
    r, a = rewards_to_optimality(torch.tensor([0.3]), torch.tensor([0]), singleton="global")
    assert a.tolist() == [0.0] and r.tolist() == [0.5]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rewards_name_their_indices(bad):
    rewards = torch.tensor([0.1, 0.2, bad, 0.4, bad, 0.6])
    with pytest.raises(ValueError, match=r"indices \[2, 4\]"):
        rewards_to_optimality(rewards, torch.tensor([0, 0, 0, 1, 1, 1]))


@pytest.mark.parametrize(
    "rewards, group_ids, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), r"rewards.*\(2, 3\)"),
        (torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), r"rewards.*torch\.int64"),
        (torch.zeros(4), torch.zeros(4), r"group_ids.*torch\.float32"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.bool), r"group_ids.*torch\.bool"),
        (torch.zeros(4), torch.zeros(2, 2, dtype=torch.int64), r"group_ids.*\(2, 2\)"),
        (torch.zeros(4), torch.zeros(3, dtype=torch.int64), r"rewards \(4,\) and group_ids \(3,\)"),
        (torch.zeros(0), torch.zeros(0, dtype=torch.int64), r"empty"),
    ],
)
def test_bad_shapes_and_dtypes(rewards, group_ids, match):
    with pytest.raises(ValueError, match=match):
        rewards_to_optimality(rewards, group_ids)


def test_non_tensor_inputs_and_bad_options():
    with pytest.raises(TypeError, match="rewards"):
        rewards_to_optimality([0.1, 0.2], torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="group_ids"):
        rewards_to_optimality(torch.tensor([0.1, 0.2]), [0, 0])
    with pytest.raises(ValueError, match="singleton"):
        rewards_to_optimality(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), singleton="drop")
    with pytest.raises(ValueError, match="adv_clip_max"):
        rewards_to_optimality(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), adv_clip_max=0.0)


def test_accepts_other_float_and_integer_dtypes_and_detaches():
    rewards = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.bfloat16, requires_grad=True)
    r, a = rewards_to_optimality(rewards, torch.tensor([1, 1, 2, 2], dtype=torch.int32))
    assert r.dtype == a.dtype == torch.float32
    assert r.shape == a.shape == (4,)
    assert not r.requires_grad and not a.requires_grad
    assert r.device == rewards.device


def test_group_stats():
    stats = group_stats(torch.tensor(REWARDS), torch.tensor(GROUPS))
    assert stats.ids.tolist() == [3, 7]
    assert stats.num_groups == 2
    assert stats.counts.tolist() == [3, 3]
    assert stats.inverse.tolist() == [1, 0, 1, 0, 1, 0]
    assert stats.mean.dtype == torch.float64
    assert stats.mean.tolist() == pytest.approx([0.25, 0.5])
    assert stats.std.tolist() == pytest.approx([0.0, math.sqrt(1 / 6)])
