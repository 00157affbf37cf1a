"""Solvers against the analytic Gaussian flow, whose exact ODE endpoint is known, plus the dpm2 step structure."""

import math

import pytest
import torch

from nftcore.sampling import (
    GaussianFlow,
    dpm2,
    dpm2_step,
    euler,
    euler_step,
    flux_sigmas,
    qwen_image_sigmas,
    sample,
)

BATCH, DIM = 8, 64


@pytest.fixture(scope="module")
def flow():
    return GaussianFlow(mean=0.7 * torch.ones(DIM, dtype=torch.float64), std=0.5)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def uniform_sigmas(num_steps):
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def endpoint_error(flow, noise, sigmas, solver):
    final = sample(flow.velocity, noise, sigmas, solver=solver)
    return (final - flow.exact_endpoint(noise)).pow(2).mean().sqrt().item()


# --- the analytic flow itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.95, 0.6, 0.3, 0.05])
def test_gaussian_flow_velocity_is_the_derivative_of_its_exact_path(flow, noise, sigma):
    step = 1e-6
    derivative = (flow.exact_state(noise, sigma + step) - flow.exact_state(noise, sigma - step)) / (2 * step)
    x = flow.exact_state(noise, sigma)
    torch.testing.assert_close(flow.velocity(x, sigma), derivative, rtol=0, atol=1e-7)
    torch.testing.assert_close(flow.x0_posterior_mean(x, sigma), x - sigma * flow.velocity(x, sigma))


def test_gaussian_flow_path_runs_from_noise_to_data(flow, noise):
    torch.testing.assert_close(flow.exact_state(noise, 1.0), noise, rtol=0, atol=0)
    torch.testing.assert_close(flow.exact_state(noise, 0.0), 0.7 + 0.5 * noise, rtol=0, atol=1e-15)
    torch.testing.assert_close(flow.exact_endpoint(noise), 0.7 + 0.5 * noise, rtol=0, atol=1e-15)


def test_gaussian_flow_rejects_nonpositive_std():
    with pytest.raises(ValueError, match="std"):
        GaussianFlow(mean=0.0, std=0.0)


# --- convergence --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", ["uniform", "flux_1024"])
def test_euler_is_first_order(flow, noise, grid):
    sigmas_for = uniform_sigmas if grid == "uniform" else (lambda n: flux_sigmas(n, 1024))
    errors = [endpoint_error(flow, noise, sigmas_for(n), "euler") for n in (6, 12, 24, 48)]
    ratios = [coarse / fine for coarse, fine in zip(errors, errors[1:])]
    # Measured: uniform 1.90, 1.95, 1.97; flux_1024 1.89, 1.93, 1.96.
    assert all(1.7 <= ratio <= 2.3 for ratio in ratios), ratios


def test_dpm2_beats_euler_on_uniform_grid(flow, noise):
    errors = {n: {s: endpoint_error(flow, noise, uniform_sigmas(n), s) for s in ("euler", "dpm2")} for n in (6, 12, 24)}
    # Measured dpm2/euler: 0.45 at 6 steps, 0.045 at 12, 0.16 at 24.
    assert errors[6]["dpm2"] < errors[6]["euler"]
    assert errors[12]["dpm2"] <= errors[12]["euler"] / 3
    assert errors[24]["dpm2"] <= errors[24]["euler"] / 4


def test_dpm2_error_shrinks_faster_than_euler_with_many_steps(flow, noise):
    dpm2_errors = [endpoint_error(flow, noise, uniform_sigmas(n), "dpm2") for n in (96, 192, 384)]
    ratios = [coarse / fine for coarse, fine in zip(dpm2_errors, dpm2_errors[1:])]
    # Measured: 3.36, 3.47 (approaching 4 = second order).
    assert all(ratio > 3.0 for ratio in ratios), ratios


@pytest.mark.parametrize(
    "sigmas",
    [uniform_sigmas(12), flux_sigmas(6, 1024), qwen_image_sigmas(6, 1024)],
    ids=["uniform_12", "flux_6", "qwen_6"],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dpm2_matches_reference_multistep_dpm_solver(flow, noise, sigmas):
    """Cross-check against an independent DPM-Solver++(2M) (first-order last step, second-order second-to-last)."""
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DPMSolverMultistepScheduler(
        solver_order=2,
        algorithm_type="dpmsolver++",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        lower_order_final=False,
        final_sigmas_type="zero",
    )
    num_steps = len(sigmas) - 1
    reference.set_timesteps(num_steps)
    reference.sigmas = sigmas.clone()
    reference.timesteps = torch.arange(num_steps)
    x = noise.clone()
    for index in range(num_steps):
        velocity = flow.velocity(x, sigmas[index].item())
        x = reference.step(velocity, index, x).prev_sample.to(torch.float64)
    # The reference steps in float32.
    torch.testing.assert_close(dpm2(flow.velocity, noise, sigmas), x, rtol=0, atol=1e-5)


# --- dpm2 step structure -------------------------------------------------------------------------------------------


def test_dpm2_first_step_is_an_euler_step(flow, noise):
    sigmas = qwen_image_sigmas(6, 1024)
    _, trajectory = dpm2(flow.velocity, noise, sigmas, return_trajectory=True)
    sigma_1 = sigmas[1].item()
    expected = euler_step(noise, flow.velocity(noise, 1.0), 1.0, sigma_1)
    torch.testing.assert_close(trajectory.latents[1], expected, rtol=0, atol=1e-14)


def test_dpm2_second_step_has_no_correction_from_the_pure_noise_predecessor(flow, noise):
    sigmas = flux_sigmas(6, 1024)
    _, trajectory = dpm2(flow.velocity, noise, sigmas, return_trajectory=True)
    x_2 = trajectory.latents[2]
    assert torch.isfinite(x_2).all()
    sigma_1, sigma_2 = sigmas[1].item(), sigmas[2].item()
    first_order = dpm2_step(trajectory.latents[1], trajectory.x0_predictions[1], sigma_1, sigma_2)
    torch.testing.assert_close(x_2, first_order, rtol=0, atol=0)
    # Same thing through the public step: a predecessor at sigma = 1 contributes nothing (and no NaN).
    with_predecessor = dpm2_step(
        trajectory.latents[1],
        trajectory.x0_predictions[1],
        sigma_1,
        sigma_2,
        prev_x0_pred=trajectory.x0_predictions[0],
        prev_sigma=1.0,
    )
    torch.testing.assert_close(with_predecessor, first_order, rtol=0, atol=0)


def test_dpm2_second_to_last_step_is_second_order(flow, noise):
    sigmas = flux_sigmas(6, 1024)
    _, trajectory = dpm2(flow.velocity, noise, sigmas, return_trajectory=True)
    i = len(sigmas) - 3  # step from sigmas[-3] to sigmas[-2]
    args = (trajectory.latents[i], trajectory.x0_predictions[i], sigmas[i].item(), sigmas[i + 1].item())
    second_order = dpm2_step(*args, prev_x0_pred=trajectory.x0_predictions[i - 1], prev_sigma=sigmas[i - 1].item())
    torch.testing.assert_close(trajectory.latents[i + 1], second_order, rtol=0, atol=0)
    assert not torch.allclose(second_order, dpm2_step(*args))


@pytest.mark.parametrize("solver", ["dpm2", "euler"])
def test_last_step_returns_the_x0_prediction(flow, noise, solver):
    final, trajectory = sample(flow.velocity, noise, qwen_image_sigmas(6, 1024), solver=solver, return_trajectory=True)
    last_x, last_sigma = trajectory.latents[-2], trajectory.sigmas[-2]
    if solver == "dpm2":
        assert torch.equal(final, trajectory.x0_predictions[-1])
    torch.testing.assert_close(final, last_x - last_sigma * flow.velocity(last_x, last_sigma), rtol=0, atol=1e-15)


@pytest.mark.parametrize("solver", ["dpm2", "euler"])
def test_trajectory_and_velocity_calls(flow, noise, solver):
    sigmas = flux_sigmas(6, 1024)
    calls = []

    def velocity_fn(x, sigma):
        calls.append(sigma)
        return flow.velocity(x, sigma)

    final, trajectory = sample(velocity_fn, noise, sigmas, solver=solver, return_trajectory=True)
    assert len(trajectory.latents) == len(sigmas) == 7
    assert len(trajectory.x0_predictions) == 6
    assert trajectory.latents[0] is noise and trajectory.final is final
    assert trajectory.sigmas == tuple(sigmas.tolist())
    assert all(type(sigma) is float for sigma in calls)
    assert calls == sigmas[:-1].tolist()
    torch.testing.assert_close(sample(flow.velocity, noise, sigmas, solver=solver), final, rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["dpm2", "euler"])
def test_math_stays_in_the_dtype_of_x(flow, noise, solver):
    final = sample(flow.velocity, noise.float(), flux_sigmas(6, 1024), solver=solver)
    assert final.dtype == torch.float32
    reference = sample(flow.velocity, noise, flux_sigmas(6, 1024), solver=solver)
    torch.testing.assert_close(final.double(), reference, rtol=0, atol=1e-5)


def test_euler_accepts_a_partial_grid(flow, noise):
    x_start = flow.exact_state(noise, 0.8)
    x_end = euler(flow.velocity, x_start, torch.linspace(0.8, 0.2, 400, dtype=torch.float64))
    torch.testing.assert_close(x_end, flow.exact_state(noise, 0.2), rtol=0, atol=5e-3)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_unknown_solver_lists_valid_ones(flow, noise):
    with pytest.raises(ValueError, match=r"unknown solver 'heun'.*dpm2, euler"):
        sample(flow.velocity, noise, uniform_sigmas(4), solver="heun")


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([0.9, 0.5, 0.0], "start at exactly 1.0"),
        ([1.0, 0.5, 0.1], "end at exactly 0.0"),
        ([1.0, 0.5, 0.6, 0.0], "strictly decreasing"),
        ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
        ([1.5, 0.5, 0.0], r"\[0, 1\]"),
        ([1.0, math.nan, 0.0], r"\[0, 1\]"),
        ([1.0], "at least 2"),
        (torch.ones(2, 3), "1-D"),
    ],
)
def test_bad_sigmas_raise(flow, noise, sigmas, message):
    with pytest.raises(ValueError, match=f"sigmas.*{message}"):
        dpm2(flow.velocity, noise, sigmas)


def test_wrongly_shaped_velocity_raises(noise):
    with pytest.raises(ValueError, match="velocity_fn"):
        sample(lambda x, sigma: x[:, :3], noise, uniform_sigmas(4))


def test_non_tensor_noise_raises(flow):
    with pytest.raises(ValueError, match="noise"):
        sample(flow.velocity, [0.0, 1.0], uniform_sigmas(4))
