"""Sigma schedules must equal the inference pipelines' grids, since training noises at exactly those sigmas."""

import numpy as np
import pytest
import torch

from nftcore.sampling import (
    FLUX_SCHEDULE,
    QWEN_IMAGE_SCHEDULE,
    ScheduleConfig,
    calculate_mu,
    flow_sigmas,
    flux_sigmas,
    qwen_image_sigmas,
)

diffusers = pytest.importorskip("diffusers")

# Scheduler configs shipped with FLUX.1-Kontext-dev and Qwen-Image(-Edit).
SCHEDULER_CONFIGS = {
    "flux": dict(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0,
        time_shift_type="exponential",
    ),
    "qwen": dict(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
    ),
}
PRESETS = {"flux": FLUX_SCHEDULE, "qwen": QWEN_IMAGE_SCHEDULE}
OUR_SIGMAS = {"flux": flux_sigmas, "qwen": qwen_image_sigmas}


@pytest.fixture(scope="module")
def schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return {family: FlowMatchEulerDiscreteScheduler(**config) for family, config in SCHEDULER_CONFIGS.items()}


@pytest.mark.parametrize("family", ["flux", "qwen"])
def test_presets_match_scheduler_configs(family, schedulers):
    config, preset = schedulers[family].config, PRESETS[family]
    assert preset.base_shift == config.base_shift
    assert preset.max_shift == config.max_shift
    assert preset.base_seq_len == config.base_image_seq_len
    assert preset.max_seq_len == config.max_image_seq_len
    assert preset.shift_terminal == config.shift_terminal


@pytest.mark.parametrize("family", ["flux", "qwen"])
def test_mu_is_linear_between_base_and_max(family):
    preset = PRESETS[family]
    assert preset.mu(preset.base_seq_len) == pytest.approx(preset.base_shift, abs=1e-12)
    assert preset.mu(preset.max_seq_len) == pytest.approx(preset.max_shift, abs=1e-12)
    mid = (preset.base_seq_len + preset.max_seq_len) / 2
    assert preset.mu(mid) == pytest.approx((preset.base_shift + preset.max_shift) / 2, abs=1e-12)
    beyond = 2 * preset.max_seq_len - preset.base_seq_len  # linear extrapolation, no clamping
    assert preset.mu(beyond) == pytest.approx(2 * preset.max_shift - preset.base_shift, abs=1e-12)


@pytest.mark.parametrize("family", ["flux", "qwen"])
@pytest.mark.parametrize("num_steps", [1, 2, 6, 15, 28])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 16384])
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_sigmas_equal_diffusers_scheduler(family, num_steps, image_seq_len, schedulers):
    scheduler = schedulers[family]
    pipeline_sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=pipeline_sigmas, mu=PRESETS[family].mu(image_seq_len))
    expected = scheduler.sigmas.to(torch.float64)

    ours = OUR_SIGMAS[family](num_steps, image_seq_len)

    assert ours.dtype == torch.float64
    assert ours.shape == (num_steps + 1,)
    assert ours[0].item() == 1.0 and ours[-1].item() == 0.0
    if family == "qwen" and num_steps == 1 and not torch.isfinite(expected).all():
        # One step: the terminal stretch has no anchor (0/0 in the reference). We keep the only sigma at 1.
        torch.testing.assert_close(ours, torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=0, atol=0)
        return
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_grids_start_at_exactly_one_at_every_resolution():
    """Regression: the shift computed `e^mu / tensor`, which PyTorch evaluates as a multiplication by the reciprocal,
    so at some token counts (16: a 64 px Qwen target) the grid started at 1 - 3e-16 and dpm2 refused it."""
    for schedule in PRESETS.values():
        for tokens in range(1, 4097, 5):
            assert schedule.sigmas(2, tokens)[0].item() == 1.0, tokens


def test_known_edit_r1_grids_at_512():
    # 512x512 target -> 32x32 packed latent tokens = 1024.
    assert QWEN_IMAGE_SCHEDULE.mu(1024) == pytest.approx(0.539, abs=5e-4)
    assert FLUX_SCHEDULE.mu(1024) == pytest.approx(0.63, abs=1e-12)
    qwen = [1.000, 0.8625, 0.7028, 0.5151, 0.2913, 0.0200, 0.0]
    kontext = [1.000, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0.0]
    torch.testing.assert_close(qwen_image_sigmas(6, 1024), torch.tensor(qwen, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(flux_sigmas(6, 1024), torch.tensor(kontext, dtype=torch.float64), rtol=0, atol=1e-4)


def test_generic_entry_point_and_config_agree():
    config = ScheduleConfig(base_shift=0.3, max_shift=1.0, base_seq_len=100, max_seq_len=1000, shift_terminal=0.05)
    direct = flow_sigmas(
        9, 640, base_shift=0.3, max_shift=1.0, base_seq_len=100, max_seq_len=1000, shift_terminal=0.05
    )
    torch.testing.assert_close(config.sigmas(9, 640), direct, rtol=0, atol=0)
    assert direct[-2].item() == pytest.approx(0.05, abs=1e-12)
    assert bool((direct[1:] < direct[:-1]).all())


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, "6"])
def test_bad_num_steps_raises(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        flux_sigmas(num_steps, 1024)


@pytest.mark.parametrize("image_seq_len", [0, -1024, float("nan"), "1024"])
def test_bad_image_seq_len_raises(image_seq_len):
    with pytest.raises(ValueError, match="image_seq_len"):
        qwen_image_sigmas(6, image_seq_len)
    with pytest.raises(ValueError, match="image_seq_len"):
        calculate_mu(image_seq_len, base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096)


def test_bad_schedule_config_raises():
    with pytest.raises(ValueError, match="max_seq_len"):
        ScheduleConfig(base_shift=0.5, max_shift=1.0, base_seq_len=256, max_seq_len=256)
    with pytest.raises(ValueError, match="shift_terminal"):
        ScheduleConfig(base_shift=0.5, max_shift=1.0, base_seq_len=256, max_seq_len=4096, shift_terminal=1.5)
