"""Old-policy soft update and the evaluation EMA (nftcore.nft.old_policy / ema)."""

import io
import json

import pytest
import torch

from nftcore.nft import EMA, OldPolicySchedule, soft_update_

# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "decay_type, expected",
    [
        (0, {0: 0.0, 1: 0.0, 100: 0.0, 10**6: 0.0}),
        (1, {0: 0.0, 1: 0.001, 100: 0.1, 499: 0.499, 500: 0.5, 501: 0.5, 10**6: 0.5}),
        # flat 75: η = 0 up to and including step 75, then 0.0075 per step, capped at 0.999 (reached at step 209).
        (2, {0: 0.0, 74: 0.0, 75: 0.0, 76: 0.0075, 175: 0.75, 208: 0.9975, 209: 0.999, 10**6: 0.999}),
    ],
)
def test_preset_eta_values(decay_type, expected):
    schedule = OldPolicySchedule.preset(decay_type)
    assert {step: schedule.eta(step) for step in expected} == pytest.approx(expected, abs=1e-12)


def test_default_schedule_is_preset_1():
    assert OldPolicySchedule() == OldPolicySchedule.preset(1)
    assert OldPolicySchedule.preset(2) == OldPolicySchedule(flat=75, uprate=0.0075, uphold=0.999)


def test_schedule_rejects_bad_config_and_steps():
    with pytest.raises(ValueError, match=r"decay_type 3.*\[0, 1, 2\]"):
        OldPolicySchedule.preset(3)
    with pytest.raises(ValueError, match="step"):
        OldPolicySchedule().eta(-1)
    with pytest.raises(ValueError, match="step"):
        OldPolicySchedule().eta(1.5)
    with pytest.raises(ValueError, match="uphold"):
        OldPolicySchedule(uphold=1.5)
    with pytest.raises(ValueError, match="flat"):
        OldPolicySchedule(flat=-1)
    with pytest.raises(ValueError, match="uprate"):
        OldPolicySchedule(uprate=float("nan"))


def test_schedule_state_round_trips_through_json():
    saved = OldPolicySchedule.preset(2)
    state = json.loads(json.dumps(saved.state_dict()))
    assert state == {"flat": 75, "uprate": 0.0075, "uphold": 0.999}
    restored = OldPolicySchedule()
    restored.load_state_dict(state)
    assert restored == saved
    assert [restored.eta(s) for s in (0, 80, 300)] == [saved.eta(s) for s in (0, 80, 300)]
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"flat": 0})
    with pytest.raises(ValueError, match="uphold"):
        restored.load_state_dict({"flat": 0, "uprate": 0.1, "uphold": 2.0})
    assert restored == saved  # a rejected state leaves the schedule untouched


# ---------------------------------------------------------------------------------------------- soft update


def _pair(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    old = [torch.randn(3, 4, generator=gen, dtype=dtype), torch.randn(5, generator=gen, dtype=dtype)]
    new = [torch.randn(3, 4, generator=gen, dtype=dtype), torch.randn(5, generator=gen, dtype=dtype)]
    return old, new


def test_soft_update_on_a_list_is_in_place():
    old, new = _pair()
    expected = [0.25 * o + 0.75 * n for o, n in zip(old, new)]
    storage = [o.data_ptr() for o in old]
    soft_update_(old, new, 0.25)
    for o, e, ptr in zip(old, expected, storage):
        torch.testing.assert_close(o, e)
        assert o.data_ptr() == ptr


def test_soft_update_on_a_dict_and_on_module_parameters():
    old, new = _pair()
    old_named = {"a": old[0], "b": old[1]}
    new_named = {"b": new[1], "a": new[0]}  # order does not matter, names do
    expected = {k: 0.4 * old_named[k] + 0.6 * new_named[k] for k in old_named}
    soft_update_(old_named, new_named, 0.4)
    for key in expected:
        torch.testing.assert_close(old_named[key], expected[key])

    # Live parameters (requires_grad) update without autograd complaints; a generator is fine.
    target, source = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    soft_update_(target.parameters(), source.parameters(), 0.0)
    torch.testing.assert_close(target.weight, source.weight, rtol=0, atol=0)


def test_eta_zero_copies_exactly_and_eta_one_is_a_no_op():
    old, new = _pair()
    before = [o.clone() for o in old]
    soft_update_(old, new, 1.0)
    assert all(torch.equal(o, b) for o, b in zip(old, before))
    soft_update_(old, new, 0.0)
    assert all(torch.equal(o, n) for o, n in zip(old, new))


def test_low_precision_targets_blend_in_fp32():
    old, new = _pair(dtype=torch.bfloat16)
    new32 = [n.float() for n in new]
    expected = [o.float().lerp(n, 0.7).bfloat16() for o, n in zip(old, new32)]
    soft_update_(old, new32, 0.3)
    assert all(o.dtype == torch.bfloat16 for o in old)
    assert all(torch.equal(o, e) for o, e in zip(old, expected))


def test_soft_update_mismatches_name_the_entry():
    old, new = _pair()
    with pytest.raises(ValueError, match="old has 2 tensors but new has 1"):
        soft_update_(old, new[:1], 0.5)
    with pytest.raises(ValueError, match=r"shape mismatch at \[1\]: old \(5,\) vs new \(6,\)"):
        soft_update_(old, [new[0], torch.zeros(6)], 0.5)
    with pytest.raises(ValueError, match=r"missing from new: \['b'\].*not in old: \['c'\]"):
        soft_update_({"a": old[0], "b": old[1]}, {"a": new[0], "c": new[1]}, 0.5)
    with pytest.raises(ValueError, match=r"shape mismatch at 'a'"):
        soft_update_({"a": old[0]}, {"a": new[1]}, 0.5)
    with pytest.raises(ValueError, match="mapping"):
        soft_update_({"a": old[0], "b": old[1]}, new, 0.5)
    with pytest.raises(ValueError, match="single Tensor"):
        soft_update_(old[0], new[0], 0.5)
    with pytest.raises(ValueError, match="floating point"):
        soft_update_([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2)], 0.5)
    with pytest.raises(ValueError, match="eta"):
        soft_update_(old, new, 1.5)


def test_schedule_update_applies_and_reports_eta():
    old, new = _pair()
    expected = [0.1 * o + 0.9 * n for o, n in zip(old, new)]
    assert OldPolicySchedule.preset(1).update(old, new, step=100) == pytest.approx(0.1)
    for o, e in zip(old, expected):
        torch.testing.assert_close(o, e)


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_warmup_decays_and_values():
    param = torch.zeros(3)
    ema = EMA([param])
    expected_decays = [min((1 + s) / (10 + s), 0.9) for s in range(100)]
    assert expected_decays[:3] == [0.1, 2 / 11, 3 / 12]
    assert expected_decays[79] < 0.9 and expected_decays[80] == 0.9
    shadow = 0.0
    decays = []
    for s in range(100):
        param.fill_(float(s))
        decays.append(ema.step([param]))
        shadow = expected_decays[s] * shadow + (1 - expected_decays[s]) * float(s)
    assert decays == pytest.approx(expected_decays, abs=0)
    assert ema.num_updates == 100 and ema.current_decay == 0.9
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), shadow))


def test_ema_first_step_offset_and_custom_decay():
    assert EMA([torch.zeros(1)], first_step=1).current_decay == 2 / 11
    ema = EMA([torch.zeros(1)], decay=0.5)
    assert [ema.step([torch.zeros(1)]) for _ in range(3)] == [0.1, 2 / 11, 0.25]
    assert EMA.warmup_decay(10**6, 0.5) == 0.5


def test_ema_shadow_is_fp32_and_follows_the_given_structure():
    params = {"w": torch.ones(2, 2, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.bfloat16)}
    ema = EMA(params)
    assert list(ema.shadow) == ["w", "b"]
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    ema.step({"b": torch.ones(2, dtype=torch.bfloat16), "w": torch.ones(2, 2, dtype=torch.bfloat16)})
    torch.testing.assert_close(ema.shadow["b"], torch.full((2,), 0.9))
    with pytest.raises(ValueError, match="mapping"):
        ema.step(list(params.values()))
    with pytest.raises(ValueError, match=r"shape mismatch at 'b'"):
        ema.step({"w": params["w"], "b": torch.zeros(3)})


def test_ema_copy_to_and_swap_restore():
    live = torch.nn.Linear(3, 2)
    ema = EMA(live.parameters())
    original = [p.detach().clone() for p in live.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    ema.step(live.parameters())  # shadow = 0.1·original + 0.9·(original + 1) = original + 0.9
    trained = [p.detach().clone() for p in live.parameters()]

    with ema.swapped(live.parameters()):
        for p, o in zip(live.parameters(), original):
            torch.testing.assert_close(p.detach(), o + 0.9)
    assert all(torch.equal(p, t) for p, t in zip(live.parameters(), trained))

    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped(live.parameters()):
            raise RuntimeError("boom")
    assert all(torch.equal(p, t) for p, t in zip(live.parameters(), trained))

    ema.copy_to(live.parameters())
    for p, o in zip(live.parameters(), original):
        torch.testing.assert_close(p.detach(), o + 0.9)


def test_ema_state_round_trip():
    gen = torch.Generator().manual_seed(1)
    params = {"a": torch.randn(4, generator=gen), "b": torch.randn(2, 3, generator=gen)}
    ema = EMA(params, decay=0.8, first_step=1)
    for _ in range(3):
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=gen))
        ema.step(params)

    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    restored = EMA({k: torch.zeros_like(v) for k, v in params.items()})
    restored.load_state_dict(torch.load(buffer))
    assert (restored.decay, restored.first_step, restored.num_updates) == (0.8, 1, 3)
    assert restored.current_decay == ema.current_decay
    for key in params:
        assert torch.equal(restored.shadow[key], ema.shadow[key])

    ema.step(params)
    restored.step(params)  # the same next update, bit for bit
    for key in params:
        assert torch.equal(restored.shadow[key], ema.shadow[key])

    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"decay": 0.9})
    with pytest.raises(ValueError, match=r"missing from state\['shadow'\]"):
        restored.load_state_dict({**ema.state_dict(), "shadow": {"a": torch.zeros(4)}})


def test_ema_rejects_bad_construction():
    with pytest.raises(ValueError, match="decay"):
        EMA([torch.zeros(1)], decay=1.5)
    with pytest.raises(ValueError, match="single Tensor"):
        EMA(torch.zeros(3))
    with pytest.raises(ValueError, match=r"params\[0\] must be floating point"):
        EMA([torch.zeros(1, dtype=torch.int64)])
    with pytest.raises(ValueError, match="ema has 1 tensors but params has 2"):
        EMA([torch.zeros(1)]).step([torch.zeros(1), torch.zeros(1)])
