"""Metrics: `OUT/metrics.jsonl` (one JSON object per optimizer step) and one readable console line per step.

Only rank 0 writes. Every row carries at least `epoch`, `step`, `loss`, `reward_mean`, `reward_std` and
`filtered_fraction`; the rest (loss terms, grad norm, throughput, phase times, counts) is added by the loop.
On resume, `truncate_from(epoch)` drops the rows the checkpoint does not cover, so the file reads like an
uninterrupted run's (a killed run may have logged steps past its last checkpoint).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("epoch", "step", "loss", "reward_mean", "reward_std", "filtered_fraction")


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null, so every line parses with a strict reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Append-only JSONL writer plus console lines; a no-op on ranks other than 0."""

    def __init__(self, path: str | Path, *, enabled: bool = True, log_every: int = 1, echo: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.log_every = max(1, int(log_every))
        self.echo = echo
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_from(self, epoch: int) -> int:
        """Keep only rows of epochs before `epoch` (0 removes every row); return how many rows were dropped.

        By epoch, not step: checkpoints sit at epoch boundaries, and a NaN-skipped step repeats its step number."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill -9 mid-write
                dropped += 1
                continue
            if row.get("epoch", 0) < epoch:
                kept.append(line)
            else:
                dropped += 1
        self.path.write_text("".join(f"{line}\n" for line in kept))
        return dropped

    def log_step(self, row: dict[str, Any]) -> None:
        """Write one optimizer step's row (every `log_every` steps) and its console line."""
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise KeyError(f"metrics row lacks {missing}")
        if not self.enabled or row["step"] % self.log_every:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in row.items()}, sort_keys=False) + "\n")
            f.flush()
        if self.echo:
            print(format_step(row), flush=True)

    def info(self, message: str) -> None:
        if self.enabled and self.echo:
            print(message, flush=True)


def format_step(row: dict[str, Any]) -> str:
    """`epoch 1 step 4 | loss 0.1234 (pol 0.1230 kl 0.0004) | reward 0.512±0.101 | filtered 0.00 | |g| 0.31 | …`"""
    def num(key: str, fmt: str = ".4f") -> str:
        value = row.get(key)
        return "nan" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:{fmt}}"

    parts = [
        f"epoch {row['epoch']} step {row['step']}",
        f"loss {num('loss')} (pol {num('policy_loss')} kl {num('kl_loss', '.2e')})",
        f"reward {num('reward_mean', '.3f')}±{num('reward_std', '.3f')}",
        f"filtered {num('filtered_fraction', '.2f')}",
        f"|g| {num('grad_norm', '.3f')}",
        f"dev {num('old_deviate', '.2e')}",
        f"{num('samples_per_s', '.1f')} samples/s",
    ]
    if row.get("invalid_rewards"):
        parts.append(f"invalid {row['invalid_rewards']}")
    if row.get("nan_skipped"):
        parts.append("NaN: step skipped")
    return " | ".join(parts)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl (tests and plots)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# The demo's pictures (PIL only: matplotlib is not a dependency)


def save_reward_curve(path: str | Path, epoch_rewards: list[float], base: float | None = None,
                      final: float | None = None, evals: list[tuple[int, float]] = (),
                      size: tuple[int, int] = (480, 300)) -> Path:
    """Mean rollout reward per epoch as a polyline, with the base and final eval rewards as dashed levels and the
    periodic EMA evals (after `epoch` epochs, reward) as green dots."""
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
    draw.text((left + 4, 4), "rollout reward (blue), base eval (grey), final eval (green)", fill="black")
    for level, color in ((base, "grey"), (final, "green")):
        if level is not None and math.isfinite(level):
            for x0 in range(left, w - right, 8):
                draw.line([(x0, y(level)), (min(x0 + 4, w - right), y(level))], fill=color)
    points = [(x(i), y(v)) for i, v in enumerate(epoch_rewards)]
    if len(points) > 1:
        draw.line(points, fill="blue", width=2)
    for px, py in points:
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill="blue")
    for epoch, reward in evals:
        if math.isfinite(reward):
            px, py = x(epoch - 1), y(reward)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], outline="green")
    path = Path(path)
    image.save(path)
    return path


def save_before_after(path: str | Path, *columns, scale: int = 4) -> Path:
    """A grid with one row per sample and one column per image batch ([B, 3, H, W] in [0, 1]): e.g. source | base
    edit | final edit | target. Upscaled by `scale` (nearest) so 32 px demo images are visible."""
    import torch
    from PIL import Image

    columns = [c for c in columns if c is not None]
    rows, _, h, w = columns[0].shape
    pad = 2
    grid = torch.ones(3, rows * (h + pad) + pad, len(columns) * (w + pad) + pad)
    for j, col in enumerate(columns):
        for i in range(rows):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y0:y0 + h, x0:x0 + w] = col[i].float().clamp(0, 1)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
    path = Path(path)
    image.save(path)
    return path
