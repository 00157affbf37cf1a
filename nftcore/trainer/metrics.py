"""Metrics: `OUT/metrics.jsonl` (one JSON object per optimizer step) and one readable console line per step.

Only rank 0 writes. Every row carries at least `epoch`, `step`, `loss`, `reward_mean`, `reward_std` and
`filtered_fraction`; the rest (loss terms, grad norm, throughput, phase times, counts) is added by the loop.
Evaluations go to `OUT/eval.jsonl` (one object per evaluation: `epoch`, `step`, `eval_reward`, `eval_samples`), and
one summary per epoch to `OUT/epochs.jsonl` (rewards, filtering, phase times and the epoch's samples/s per rank, the
throughput unit peers publish). On resume, `truncate_from(epoch)` drops the rows of these files the checkpoint does
not cover, so they read like an uninterrupted run's (a killed run may have logged steps past its last checkpoint).

Rows also go to the trackers the config switches on (`trackers.py`: TensorBoard, wandb), and `progress(label,
total)` shows a phase's progress: one line redrawn in place on a terminal, a plain line per finished phase in a
log file (no tqdm: one line of ANSI is all it takes).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

REQUIRED_KEYS = ("epoch", "step", "loss", "reward_mean", "reward_std", "filtered_fraction")


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null, so every line parses with a strict reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}, sort_keys=False) + "\n")
        f.flush()


def _truncate(path: Path, epoch: int) -> int:
    """Keep the JSONL rows of `path` whose epoch is before `epoch`; return how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
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
    path.write_text("".join(f"{line}\n" for line in kept))
    return dropped


class MetricsLogger:
    """Append-only JSONL writer plus console lines, trackers and progress; a no-op on ranks other than 0.

    `progress`: show phase progress (`metrics.progress`); `tty`: redraw it in place (default: stdout is a terminal).
    """

    def __init__(self, path: str | Path, *, enabled: bool = True, log_every: int = 1, echo: bool = True,
                 trackers: list | None = None, progress: bool = False, tty: bool | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.log_every = max(1, int(log_every))
        self.echo = echo
        self.trackers = list(trackers or []) if enabled else []
        self.show_progress = progress and enabled and echo
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._live: Progress | None = None  # the in-place line now on screen, cleared before any other print
        self.eval_path = self.path.with_name("eval.jsonl")
        self.epochs_path = self.path.with_name("epochs.jsonl")
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_from(self, epoch: int) -> int:
        """Keep only rows of epochs before `epoch` (0 removes every row) in the metrics and eval files; return how
        many metrics rows were dropped.

        By epoch, not step: checkpoints sit at epoch boundaries, and a NaN-skipped step repeats its step number."""
        if not self.enabled:
            return 0
        _truncate(self.eval_path, epoch)
        _truncate(self.epochs_path, epoch)
        return _truncate(self.path, epoch)

    def log_step(self, row: dict[str, Any]) -> None:
        """Write one optimizer step's row (every `log_every` steps) and its console line."""
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise KeyError(f"metrics row lacks {missing}")
        if not self.enabled or row["step"] % self.log_every:
            return
        _append(self.path, row)
        for tracker in self.trackers:
            tracker.log(row)
        if self.echo:
            self._print(format_step(row))

    def log_eval(self, row: dict[str, Any]) -> None:
        """Write one evaluation's row (`epoch`, `step`, `eval_reward`, ...) to eval.jsonl and the trackers."""
        if not self.enabled:
            return
        _append(self.eval_path, row)
        for tracker in self.trackers:
            tracker.log(row, prefix="eval")

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Write one epoch's summary (`epoch`, `step`, rewards, phase times, samples/s per rank) to epochs.jsonl and
        the trackers."""
        if not self.enabled:
            return
        _append(self.epochs_path, row)
        for tracker in self.trackers:
            tracker.log(row, prefix="epoch")

    def info(self, message: str) -> None:
        if self.enabled and self.echo:
            self._print(message)

    def warn(self, message: str, *, every_rank: bool = False) -> None:
        """`warning: message` on stderr: rank 0's, or with `every_rank` any rank's (for what only that rank saw)."""
        if (self.enabled or every_rank) and self.echo:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def log_images(self, tag: str, step: int, path: str | Path, *columns) -> None:
        """A grid (one row per sample, one column per [B, 3, H, W] batch in [0, 1]) to `path` and the trackers."""
        if not self.enabled:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_before_after(path, *columns, scale=max(1, 128 // columns[0].shape[-1]))
        grid = image_grid(*columns)
        for tracker in self.trackers:
            tracker.image(tag, grid, step)

    def progress(self, label: str, total: int) -> Progress:
        return Progress(self, label, total)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def _print(self, message: str) -> None:
        live = self._live
        if live is not None:
            sys.stdout.write("\r\x1b[K")  # clear the progress line, print, then redraw it below
        print(message, flush=True)
        if live is not None:
            live.draw()


class Progress:
    """One phase's progress (`with logger.progress("epoch 0 rollout", 8) as bar: ... bar.advance()`): on a terminal
    `epoch 0 rollout [######      ] 4/8 1.2 s`, redrawn in place and erased at the end; otherwise one plain line
    when the phase ends; nothing when progress is off."""

    WIDTH = 20

    def __init__(self, logger: MetricsLogger, label: str, total: int):
        self.logger, self.label, self.total, self.count = logger, label, max(0, int(total)), 0
        self.start = time.perf_counter()
        self.on = logger.show_progress
        if self.on and logger.tty:
            logger._live = self
            self.draw()

    def advance(self, n: int = 1) -> None:
        self.count += n
        if self.on and self.logger.tty:
            self.draw()

    def text(self) -> str:
        filled = self.WIDTH * min(self.count, self.total) // max(self.total, 1)
        bar = "#" * filled + " " * (self.WIDTH - filled)
        return f"{self.label} [{bar}] {self.count}/{self.total} {time.perf_counter() - self.start:.1f} s"

    def draw(self, stream: TextIO | None = None) -> None:
        stream = stream or sys.stdout
        stream.write("\r\x1b[K" + self.text())
        stream.flush()

    def close(self) -> None:
        if not self.on:
            return
        if self.logger._live is self:
            self.logger._live = None
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
        else:
            print(f"{self.label}: {self.count}/{self.total} in {time.perf_counter() - self.start:.1f} s", flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_step(row: dict[str, Any]) -> str:
    """`epoch 1 step 4 | loss 0.1234 (pol 0.1230 kl 4.00e-04) | reward 0.512±0.101 | filtered 0.00 invalid 0 |
    |g| 0.310 | dev 1.20e-03 x0 0.52 | 3.1 samples/s (1.55/rank) 0.01 TFLOP/s [MFU 35.2%] | rollout 1.2 s reward
    0.1 s train 0.4 s | peak 1.23 GB` (a missing value reads `nan`; MFU only where the device peak is known)."""
    def num(key: str, fmt: str = ".4f") -> str:
        value = row.get(key)
        return "nan" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:{fmt}}"

    speed = (f"{num('samples_per_s', '.1f')} samples/s ({num('samples_per_s_per_rank', '.3g')}/rank) "
             f"{num('tflops', '.3g')} TFLOP/s")
    if row.get("mfu") is not None:
        speed += f" MFU {100 * row['mfu']:.1f}%"
    parts = [
        f"epoch {row['epoch']} step {row['step']}",
        f"loss {num('loss')} (pol {num('policy_loss')} kl {num('kl_loss', '.2e')})",
        f"reward {num('reward_mean', '.3f')}±{num('reward_std', '.3f')}",
        f"filtered {num('filtered_fraction', '.2f')} invalid {row.get('invalid_rewards', 'nan')}",
        f"|g| {num('grad_norm', '.3f')}",
        f"dev {num('old_deviate', '.2e')} x0 {num('x0_norm', '.3g')}",
        speed,
        f"rollout {num('time_rollout', '.1f')} s reward {num('time_reward_wait', '.1f')} s "
        f"train {num('time_train', '.1f')} s",
        f"peak {num('peak_memory_gb', '.2f')} GB",
    ]
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


def image_grid(*columns, pad: int = 2):
    """[3, H', W'] in [0, 1] on white: one row per sample, one column per image batch ([B, 3, H, W] in [0, 1];
    None columns are skipped)."""
    import torch

    columns = [c for c in columns if c is not None]
    rows, _, h, w = columns[0].shape
    grid = torch.ones(3, rows * (h + pad) + pad, len(columns) * (w + pad) + pad)
    for j, col in enumerate(columns):
        for i in range(rows):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y0:y0 + h, x0:x0 + w] = col[i].float().cpu().clamp(0, 1)
    return grid


def save_before_after(path: str | Path, *columns, scale: int = 4) -> Path:
    """A grid with one row per sample and one column per image batch ([B, 3, H, W] in [0, 1]): e.g. source | base
    edit | final edit | target. Upscaled by `scale` (nearest) so 32 px demo images are visible."""
    import torch
    from PIL import Image

    grid = image_grid(*columns)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
    path = Path(path)
    image.save(path)
    return path
