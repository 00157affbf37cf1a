"""Sigma schedules of the rollout sampler.

Training noises clean rollouts at exactly the sampler's sigmas, so these grids must match, value for value, the
ones the FLUX.1-Kontext and Qwen-Image(-Edit) inference pipelines use:

1. ``linspace(1, 1/N, N)``;
2. resolution-dependent exponential time shift ``e^mu / (e^mu + (1/sigma - 1))``, with ``mu`` linear in the
   *target* image token count (source-image tokens do not count);
3. optionally, a stretch that makes the last nonzero sigma equal ``shift_terminal`` (Qwen-Image: 0.02);
4. a final 0 appended.

All functions return float64 1-D tensors of length ``N + 1`` (sigma at every sampler state, first 1.0, last 0.0).
Float64 keeps the sigma arithmetic exact enough that solvers and trainers can use the values as Python floats.

See docs/ALGORITHM.md §2.1; the training timesteps taken from these grids: §1.4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ScheduleConfig",
    "FLUX_SCHEDULE",
    "QWEN_IMAGE_SCHEDULE",
    "calculate_mu",
    "exponential_time_shift",
    "stretch_to_terminal",
    "flow_sigmas",
    "flux_sigmas",
    "qwen_image_sigmas",
]


@dataclass(frozen=True)
class ScheduleConfig:
    """Resolution-dependent shift parameters of one model family.

    ``mu`` runs linearly from ``base_shift`` at ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` tokens
    (and keeps going linearly outside that range). ``shift_terminal``, when set, is the value the last nonzero
    sigma is stretched to.
    """

    base_shift: float
    max_shift: float
    base_seq_len: int
    max_seq_len: int
    shift_terminal: float | None = None

    def __post_init__(self):
        if self.base_seq_len == self.max_seq_len:
            raise ValueError(f"base_seq_len and max_seq_len must differ, both are {self.base_seq_len}")
        if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must lie in (0, 1) (None or 0: no stretch), got {self.shift_terminal}")

    def mu(self, image_seq_len: int) -> float:
        return calculate_mu(
            image_seq_len,
            base_shift=self.base_shift,
            max_shift=self.max_shift,
            base_seq_len=self.base_seq_len,
            max_seq_len=self.max_seq_len,
        )

    def sigmas(self, num_steps: int, image_seq_len: int) -> torch.Tensor:
        return flow_sigmas(
            num_steps,
            image_seq_len,
            base_shift=self.base_shift,
            max_shift=self.max_shift,
            base_seq_len=self.base_seq_len,
            max_seq_len=self.max_seq_len,
            shift_terminal=self.shift_terminal,
        )


FLUX_SCHEDULE = ScheduleConfig(base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096)
"""FLUX.1 and FLUX.1-Kontext."""

QWEN_IMAGE_SCHEDULE = ScheduleConfig(
    base_shift=0.5, max_shift=0.9, base_seq_len=256, max_seq_len=8192, shift_terminal=0.02
)
"""Qwen-Image and Qwen-Image-Edit."""


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    return num_steps


def _check_seq_len(image_seq_len) -> None:
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, (int, float)) or not image_seq_len > 0:
        raise ValueError(f"image_seq_len must be a positive number of target image tokens, got {image_seq_len!r}")


def calculate_mu(
    image_seq_len: int,
    *,
    base_shift: float,
    max_shift: float,
    base_seq_len: int,
    max_seq_len: int,
) -> float:
    """Shift exponent ``mu`` for a target of ``image_seq_len`` packed latent tokens (1024 at 512x512)."""
    _check_seq_len(image_seq_len)
    if base_seq_len == max_seq_len:
        raise ValueError(f"base_seq_len and max_seq_len must differ, both are {base_seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def exponential_time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """``e^mu / (e^mu + (1/sigma - 1))``: larger ``mu`` keeps more steps at high noise. Maps 1 to 1 and 0 to 0."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    # A tensor numerator: `float / tensor` multiplies by the reciprocal, which can map 1 to 1 - 2⁻⁵², and dpm2
    # needs the grid to start at exactly 1.
    exp_mu = torch.full_like(sigmas, math.exp(mu))
    return exp_mu / (exp_mu + (1.0 / sigmas - 1.0))


def stretch_to_terminal(sigmas: torch.Tensor, shift_terminal: float) -> torch.Tensor:
    """Affinely rescale ``1 - sigma`` so the last entry becomes ``shift_terminal`` while 1 stays 1.

    ``sigmas`` are the nonzero sampler sigmas (no trailing 0). With a single sigma equal to 1 there is nothing to
    anchor the stretch to (it would divide 0 by 0); the schedule is then returned unchanged, so one step still
    starts from pure noise.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    one_minus = 1.0 - sigmas
    last = float(one_minus[-1])
    if last == 0.0:
        return sigmas.clone()
    scale = last / (1.0 - shift_terminal)
    return 1.0 - one_minus / scale


def flow_sigmas(
    num_steps: int,
    image_seq_len: int,
    *,
    base_shift: float,
    max_shift: float,
    base_seq_len: int,
    max_seq_len: int,
    shift_terminal: float | None = None,
) -> torch.Tensor:
    """Sampler sigmas, float64, length ``num_steps + 1``, from 1.0 down to a final 0.0."""
    num_steps = _check_num_steps(num_steps)
    if shift_terminal is not None and not 0.0 <= shift_terminal < 1.0:
        raise ValueError(f"shift_terminal must lie in (0, 1) (None or 0: no stretch), got {shift_terminal}")
    mu = calculate_mu(
        image_seq_len, base_shift=base_shift, max_shift=max_shift, base_seq_len=base_seq_len, max_seq_len=max_seq_len
    )
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigmas = exponential_time_shift(sigmas, mu)
    if shift_terminal:
        sigmas = stretch_to_terminal(sigmas, shift_terminal)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def flux_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """FLUX.1(-Kontext) sampler sigmas for a target of ``image_seq_len`` tokens."""
    return FLUX_SCHEDULE.sigmas(num_steps, image_seq_len)


def qwen_image_sigmas(num_steps: int, image_seq_len: int) -> torch.Tensor:
    """Qwen-Image(-Edit) sampler sigmas for a target of ``image_seq_len`` tokens."""
    return QWEN_IMAGE_SCHEDULE.sigmas(num_steps, image_seq_len)
