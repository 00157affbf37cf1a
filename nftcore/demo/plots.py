"""The demo's reward curve (PIL only: matplotlib is not a dependency): rollout reward per epoch, its moving average,
and the base / final / periodic evaluation rewards."""

from __future__ import annotations

import math
from pathlib import Path


def save_reward_curve(path: str | Path, epoch_rewards: list[float], base: float | None = None,
                      final: float | None = None, evals: list[tuple[int, float]] = (),
                      size: tuple[int, int] = (480, 300)) -> Path:
    """Mean rollout reward per epoch as a thin polyline and its moving average (over ~10% of the epochs: one epoch's
    G prompts differ a lot in difficulty, so the raw curve is noisy) as a thick one, with the base and final eval
    rewards as dashed levels and the periodic EMA evals (after `epoch` epochs, reward) as green circles."""
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 50, 10, 20, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [v for v in [*epoch_rewards, base, final, *(r for _, r in evals)] if v is not None and math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-6 else (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * (h - top - bottom)

    def x(i: int) -> float:
        return left + i / max(len(epoch_rewards) - 1, 1) * (w - left - right)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for v in (lo, (lo + hi) / 2, hi):
        draw.text((2, y(v) - 6), f"{v:.3f}", fill="black")
    draw.text((left, h - bottom + 8), f"epoch 0 … {max(len(epoch_rewards) - 1, 0)}", fill="black")
    window = max(1, len(epoch_rewards) // 10) | 1  # odd, so the average is centred on its epoch
    draw.text((left + 4, 4), f"rollout reward, {window}-epoch mean (blue); eval: base grey, EMA green", fill="black")
    for level, color in ((base, "grey"), (final, "green")):
        if level is not None and math.isfinite(level):
            for x0 in range(left, w - right, 8):
                draw.line([(x0, y(level)), (min(x0 + 4, w - right), y(level))], fill=color)
    points = [(x(i), y(v)) for i, v in enumerate(epoch_rewards)]
    if len(points) > 1:
        draw.line(points, fill=(150, 175, 240) if window > 1 else "blue", width=1 if window > 1 else 2)
    if window > 1:
        smooth = [(x(i), y(v)) for i, v in enumerate(moving_average(epoch_rewards, window)) if v is not None]
        draw.line(smooth, fill="blue", width=3)
    else:
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill="blue")
    for epoch, reward in evals:
        if math.isfinite(reward):
            px, py = x(epoch - 1), y(reward)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], outline="green")
    path = Path(path)
    image.save(path)
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
