"""`python -m nftcore.train`: nftcore's main job.

The Edit-R1 trainer is not built yet. Until it is, the main job exercises what exists end to end: the rollout
sampler (`nftcore.sampling`) on an analytic Gaussian flow whose exact ODE solution is known, at the schedules the
training recipes use, and prints each solver's error. The trainer replaces this with the embedded demo.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from nftcore.sampling import GaussianFlow, flux_sigmas, qwen_image_sigmas, sample

TARGET_TOKENS_512 = 1024  # (512 / 16)² packed latent tokens at 512²: the length the schedule's shift is keyed on


def solver_errors(steps: int, *, schedule: str, seed: int, dim: int = 4096) -> dict[str, float]:
    """Max abs error of euler and dpm2 against the exact endpoint mean + std·z, from the same noise."""
    generator = torch.Generator().manual_seed(seed)
    flow = GaussianFlow(mean=0.7, std=0.5)
    noise = torch.randn(4, dim, generator=generator, dtype=torch.float64)
    if schedule == "uniform":
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    else:
        sigmas = {"qwen_image": qwen_image_sigmas, "flux": flux_sigmas}[schedule](steps, TARGET_TOKENS_512)
    exact = flow.exact_state(noise, 0.0)
    return {
        solver: (sample(flow.velocity, noise, sigmas, solver=solver) - exact).abs().max().item()
        for solver in ("euler", "dpm2")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nftcore.train", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 12, 24], help="sampler step counts to compare")
    args = parser.parse_args(argv)

    print("nftcore: the Edit-R1 trainer is not built yet; running the dpm2 rollout sampler on an analytic Gaussian flow")
    print("(x0 ~ N(0.7, 0.5²), exact ODE endpoint known) on a uniform grid and the recipes' 512² schedules instead.")
    print("(Qwen-Image's grid ends with a fixed 0.02 -> 0 step, which bounds every solver's error there.)\n")
    print(f"{'schedule':<11} {'steps':>5} {'euler err':>11} {'dpm2 err':>11} {'euler/dpm2':>10}")
    start = time.perf_counter()
    for schedule in ("uniform", "flux", "qwen_image"):
        for steps in args.steps:
            err = solver_errors(steps, schedule=schedule, seed=args.seed)
            ratio = err["euler"] / err["dpm2"] if err["dpm2"] > 0 else float("inf")
            print(f"{schedule:<11} {steps:>5} {err['euler']:>11.3e} {err['dpm2']:>11.3e} {ratio:>10.1f}")
    print(f"\ndone in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
