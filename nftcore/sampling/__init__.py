"""Model-agnostic rollout sampling: sigma schedules, deterministic flow solvers, true classifier-free
guidance (inference only), and an analytic test flow.

Everything here works on plain tensors and a ``velocity_fn(x, sigma)`` callable, so every trainer shares one
sampler and one definition of the training timesteps.

See docs/ALGORITHM.md §2.
"""

from nftcore.sampling.analytic import GaussianFlow
from nftcore.sampling.guidance import combine_cfg, true_cfg
from nftcore.sampling.schedules import (
    FLUX_SCHEDULE,
    QWEN_IMAGE_SCHEDULE,
    ScheduleConfig,
    calculate_mu,
    exponential_time_shift,
    flow_sigmas,
    flux_sigmas,
    qwen_image_sigmas,
    stretch_to_terminal,
)
from nftcore.sampling.solvers import (
    SOLVERS,
    Trajectory,
    VelocityFn,
    dpm2,
    dpm2_step,
    euler,
    euler_step,
    sample,
    x0_prediction,
)

__all__ = [
    "FLUX_SCHEDULE",
    "QWEN_IMAGE_SCHEDULE",
    "SOLVERS",
    "GaussianFlow",
    "ScheduleConfig",
    "Trajectory",
    "VelocityFn",
    "calculate_mu",
    "combine_cfg",
    "dpm2",
    "dpm2_step",
    "euler",
    "euler_step",
    "exponential_time_shift",
    "flow_sigmas",
    "flux_sigmas",
    "qwen_image_sigmas",
    "sample",
    "stretch_to_terminal",
    "true_cfg",
    "x0_prediction",
]
