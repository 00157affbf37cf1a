"""The demo's reward curve, drawn with matplotlib when it is installed (the `dev` extra has it): rollout reward per
epoch (raw and smoothed), the base and final evaluation rewards as levels and the periodic EMA evaluations."""

from __future__ import annotations

import math
from pathlib import Path


def save_reward_curve(path: str | Path, epoch_rewards: list[float], base: float | None = None,
                      final: float | None = None, evals: list[tuple[int, float]] = ()) -> Path | None:
    """Write the curve to `path`; None (nothing written) without matplotlib. The moving average spans ~10% of the
    epochs: one epoch's G prompts differ a lot in difficulty, so the raw curve is noisy."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a training node
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = list(range(1, len(epoch_rewards) + 1))
    window = max(1, len(epoch_rewards) // 10) | 1  # odd, so the average is centred on its epoch
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, epoch_rewards, color="tab:blue", alpha=0.35, linewidth=1, label="rollout reward (epoch mean)")
    if window > 1:
        ax.plot(epochs, moving_average(epoch_rewards, window), color="tab:blue", linewidth=2.5,
                label=f"rollout reward, {window}-epoch moving average")
    for level, color, name in ((base, "grey", "eval: base model"), (final, "tab:green", "eval: trained (EMA)")):
        if level is not None and math.isfinite(level):
            ax.axhline(level, color=color, linestyle="--", linewidth=1.5, label=f"{name} {level:.3f}")
    points = [(e, r) for e, r in evals if math.isfinite(r)]
    if points:
        ax.plot(*zip(*points), "o", color="tab:green", markerfacecolor="none", label="eval during training (EMA)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("verifier reward (source 0.4, ground truth 1.0)")
    ax.set_title("DiffusionNFT on the demo world")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def moving_average(values: list[float | None], window: int) -> list[float | None]:
    """Centred moving average of the finite values in each window of `window` (narrower at the ends); None where a
    window holds none."""
    half = window // 2
    out = []
    for i in range(len(values)):
        xs = [v for v in values[max(0, i - half):i + half + 1] if v is not None and math.isfinite(v)]
        out.append(sum(xs) / len(xs) if xs else None)
    return out
