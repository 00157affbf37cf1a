"""Deterministic ODE solvers for rectified-flow rollouts.

Convention: ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity ``v = eps - x0``, clean estimate
``x0_hat = x - sigma v``. ``sigma = 1`` is pure noise, ``sigma = 0`` clean data; sigmas run downwards.

A solver only needs ``velocity_fn(x, sigma) -> v`` with ``sigma`` a Python float, so the same code drives a real
transformer (the caller turns the float into whatever timestep tensor its model wants), an analytic flow in tests,
or anything else. Tensor math runs in the dtype of ``x``; step coefficients are computed in Python float64.

Solvers:

- ``"euler"``: ``x_next = x + (sigma_next - sigma) v``.
- ``"dpm2"``: the NFT rollout sampler. First step from sigma = 1 is first order (DDIM in x0 form, identical to
  Euler there); middle steps are multistep DPM-Solver++(2M) in x0 form with ``lambda = log((1 - sigma)/sigma)``;
  the step to sigma = 0 returns the x0 estimate at the last nonzero sigma. The second-to-last step stays second
  order. The step right after sigma = 1 has a predecessor at ``lambda = -inf``: its step-size ratio is infinite,
  so the second-order correction is exactly zero and that step is first order too.

See docs/ALGORITHM.md §2.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = [
    "VelocityFn",
    "SOLVERS",
    "Trajectory",
    "x0_prediction",
    "euler_step",
    "dpm2_step",
    "euler",
    "dpm2",
    "sample",
]

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
"""``velocity_fn(x, sigma)``: predicted ``eps - x0`` at state ``x``; ``sigma`` is a Python float in (0, 1]."""


@dataclass
class Trajectory:
    """Everything a rollout visited: ``latents[i]`` is x at ``sigmas[i]`` (N + 1 entries, first the noise, last the
    final sample); ``x0_predictions[i]`` is the clean estimate made at ``sigmas[i]`` (N entries, one per model call).
    """

    sigmas: tuple[float, ...]
    latents: list[torch.Tensor] = field(default_factory=list)
    x0_predictions: list[torch.Tensor] = field(default_factory=list)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def x0_prediction(x: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """Clean estimate implied by a velocity: ``x - sigma * v``."""
    return x - sigma * velocity


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One explicit Euler step of ``dx/dsigma = v``."""
    return x + (sigma_next - sigma) * velocity


def _log_snr(sigma: float) -> float:
    """``lambda = log((1 - sigma)/sigma)`` for sigma in (0, 1); -inf at 1, +inf at 0."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def dpm2_step(
    x: torch.Tensor,
    x0_pred: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    prev_x0_pred: torch.Tensor | None = None,
    prev_sigma: float | None = None,
) -> torch.Tensor:
    """One DPM-Solver++ step in x0 form from ``sigma`` to ``sigma_next``.

    Without a predecessor (``prev_x0_pred`` None) this is the first-order DDIM step. With one, the 2M update uses
    ``D0 + D1/2`` with ``D1 = (x0_pred - prev_x0_pred) / r0``, ``r0 = h_prev / h``. A predecessor at sigma = 1
    (lambda = -inf) makes ``r0`` infinite, so ``D1`` is exactly zero. Stepping to sigma = 0 returns ``x0_pred``.
    """
    if sigma_next <= 0.0:
        return x0_pred
    # e^{-h} with h = lambda_next - lambda, written as a ratio so sigma = 1 gives exactly 0 instead of inf arithmetic.
    exp_neg_h = ((1.0 - sigma) / sigma) * (sigma_next / (1.0 - sigma_next))
    data_term = x0_pred
    if prev_x0_pred is not None and prev_sigma is not None and prev_sigma < 1.0:
        h = _log_snr(sigma_next) - _log_snr(sigma)
        h_prev = _log_snr(sigma) - _log_snr(prev_sigma)
        r0 = h_prev / h
        data_term = x0_pred + (0.5 / r0) * (x0_pred - prev_x0_pred)
    return (sigma_next / sigma) * x - (1.0 - sigma_next) * (exp_neg_h - 1.0) * data_term


def _sigma_list(sigmas: torch.Tensor | Sequence[float], *, solver: str) -> list[float]:
    """Validate a sigma grid and return it as Python floats (float64)."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
        values = [float(s) for s in sigmas.detach().to("cpu", torch.float64).tolist()]
    else:
        values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError(f"sigmas must hold at least 2 values (start and end), got {len(values)}")
    if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in values):
        raise ValueError(f"sigmas must lie in [0, 1], got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {values}")
    if solver == "dpm2":
        if values[0] != 1.0:
            raise ValueError(f"dpm2 needs sigmas to start at exactly 1.0 (pure noise), got sigmas[0] = {values[0]}")
        if values[-1] != 0.0:
            raise ValueError(f"dpm2 needs sigmas to end at exactly 0.0, got sigmas[-1] = {values[-1]}")
    return values


def _velocity(velocity_fn: VelocityFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    velocity = velocity_fn(x, sigma)
    if not isinstance(velocity, torch.Tensor) or velocity.shape != x.shape:
        got = tuple(velocity.shape) if isinstance(velocity, torch.Tensor) else type(velocity).__name__
        raise ValueError(f"velocity_fn must return a tensor shaped like x {tuple(x.shape)}, got {got}")
    return velocity.to(x.dtype)


def _check_noise(noise: torch.Tensor) -> None:
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got {type(noise).__name__}")


def _run(velocity_fn, noise, sigma_values, return_trajectory, step):
    trajectory = Trajectory(sigmas=tuple(sigma_values), latents=[noise]) if return_trajectory else None
    x = noise
    prev_x0_pred, prev_sigma = None, None
    for sigma, sigma_next in zip(sigma_values, sigma_values[1:]):
        velocity = _velocity(velocity_fn, x, sigma)
        x0_pred = x0_prediction(x, velocity, sigma)
        x = step(x, velocity, x0_pred, sigma, sigma_next, prev_x0_pred, prev_sigma)
        prev_x0_pred, prev_sigma = x0_pred, sigma
        if trajectory is not None:
            trajectory.latents.append(x)
            trajectory.x0_predictions.append(x0_pred)
    return (x, trajectory) if return_trajectory else x


def euler(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` with explicit Euler; any strictly decreasing grid in [0, 1]."""
    _check_noise(noise)
    sigma_values = _sigma_list(sigmas, solver="euler")

    def step(x, velocity, x0_pred, sigma, sigma_next, prev_x0_pred, prev_sigma):
        return euler_step(x, velocity, sigma, sigma_next)

    return _run(velocity_fn, noise, sigma_values, return_trajectory, step)


def dpm2(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Integrate from sigma = 1 to sigma = 0 with the NFT rollout solver (see module docstring)."""
    _check_noise(noise)
    sigma_values = _sigma_list(sigmas, solver="dpm2")

    def step(x, velocity, x0_pred, sigma, sigma_next, prev_x0_pred, prev_sigma):
        return dpm2_step(x, x0_pred, sigma, sigma_next, prev_x0_pred=prev_x0_pred, prev_sigma=prev_sigma)

    return _run(velocity_fn, noise, sigma_values, return_trajectory, step)


SOLVERS: dict[str, Callable[..., torch.Tensor | tuple[torch.Tensor, Trajectory]]] = {"euler": euler, "dpm2": dpm2}


def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    solver: str = "dpm2",
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Trajectory]:
    """Run ``solver`` over ``sigmas`` starting from ``noise``.

    Returns the final sample, or ``(final_sample, Trajectory)`` when ``return_trajectory`` is set.
    ``velocity_fn`` is called once per step, N times for N + 1 sigmas, always with a Python float sigma.
    """
    try:
        solve = SOLVERS[solver]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(sorted(SOLVERS))}") from None
    return solve(velocity_fn, noise, sigmas, return_trajectory=return_trajectory)
