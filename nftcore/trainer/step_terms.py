"""The logged terms of one optimizer step (`StepTerms`): what each means, and how it adds up over micro-batches,
timesteps and ranks (`StepSums`) without reading anything back from the device before the step ends.

Two kinds of term, so that no name means two things:

- **nftcore's loss terms**, normalised as the loss is (each (sample, timestep) pair weighs 1 / the step's global
  count of pairs, §7): `loss`, `policy_loss`, `kl_loss`, and `x0_pred_norm` = mean((x_t − t·v_θ)²), the
  energy of θ's clean-sample prediction (a drift in image brightness shows here).
- **The official scripts' diagnostics**, under their names and computed their way: a *pass* is one micro-batch at
  one timestep, each pass gives one value over its samples, and the step logs the mean over its passes (on every
  rank; passes of a rank's zero-weight padding micro-batches do not count): `x0_norm` = mean(x0²) and
  `x0_norm_max` = max(x0²) of the clean rollout latents, `old_deviate` = mean((v_θ − v_old)²) and
  `old_deviate_max` = max((v_θ − v_old)²), and `old_kl_div` = mean((v_old − v_ref)²), the last only when the
  reference runs (nft.kl_weight > 0). nftcore trains the surviving samples only, so its passes hold no filtered
  samples where the official ones do (masked).

See docs/TRAINING.md, "Metrics".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from nftcore.trainer.distributed import DistEnv, all_reduce_sum

LOSS_TERMS = ("loss", "policy_loss", "kl_loss", "x0_pred_norm")
DIAGNOSTICS = ("x0_norm", "x0_norm_max", "old_deviate", "old_deviate_max", "old_kl_div")


@dataclass
class StepTerms:
    """One optimizer step's terms, summed over every rank (see the module docstring)."""

    loss: float
    policy_loss: float
    kl_loss: float
    x0_pred_norm: float
    x0_norm: float
    x0_norm_max: float
    old_deviate: float
    old_deviate_max: float
    old_kl_div: float | None  # None: no reference forward (kl_weight = 0), so nothing to compare θ_old with

    def logged(self) -> dict[str, float]:
        """The terms as metrics-row fields (`old_kl_div` only when there is one)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class PassVelocities(NamedTuple):
    """The three velocities of one training pass: θ (with grad), θ_old and the reference (None when not run)."""

    theta: torch.Tensor
    old: torch.Tensor
    ref: torch.Tensor | None


class StepSums:
    """Running sums of one step's terms on the device; `total` reads them back once and reduces over ranks."""

    def __init__(self, device: torch.device, *, reference: bool):
        self.sums = torch.zeros(len(LOSS_TERMS) + len(DIAGNOSTICS), dtype=torch.float64, device=device)
        self.passes = 0  # this rank's (micro-batch, timestep) passes, padding excluded
        self.reference = reference

    def add_loss(self, out: Any, scale: float) -> None:
        """`nft_loss`'s masked means of one stacked pass, weighted by the rows' share of the step's pairs."""
        terms = torch.stack([out.loss, out.policy_loss, out.kl_loss, out.x0_norm])
        self.sums[:len(LOSS_TERMS)] += terms.detach().double() * scale

    @torch.no_grad()
    def add_diagnostics(self, x0: torch.Tensor, v: PassVelocities, rows: int) -> None:
        """The official diagnostics of `rows` passes stacked in one forward: `x0` [B, ...] the micro-batch's clean
        latents, `v` the velocities of its rows·B rows, timestep-major (row j·B + b: sample b at its j-th)."""
        dtype = torch.promote_types(v.theta.dtype, torch.float32)
        x0_sq = x0.detach().to(dtype).square()
        deviate = (v.theta.detach().to(dtype) - v.old.to(dtype)).square().reshape(rows, -1)  # one row per pass
        old_kl = (torch.zeros((), dtype=dtype, device=x0.device) if v.ref is None
                  else (v.old.to(dtype) - v.ref.to(dtype)).square().reshape(rows, -1).mean(dim=1).sum())
        terms = torch.stack([x0_sq.mean() * rows, x0_sq.amax() * rows, deviate.mean(dim=1).sum(),
                             deviate.amax(dim=1).sum(), old_kl])
        self.sums[len(LOSS_TERMS):] += terms.double()
        self.passes += rows

    def total(self, env: DistEnv) -> StepTerms:
        """Sum over ranks (one read back from the device), the diagnostics divided by the global pass count."""
        host = torch.cat([self.sums.cpu(), torch.tensor([float(self.passes)], dtype=torch.float64)])
        values = all_reduce_sum(host, env).tolist()
        passes = values[-1]
        losses = values[:len(LOSS_TERMS)]
        diagnostics = [v / passes if passes else math.nan for v in values[len(LOSS_TERMS):-1]]
        if not self.reference:
            diagnostics[-1] = None
        return StepTerms(*losses, *diagnostics)
