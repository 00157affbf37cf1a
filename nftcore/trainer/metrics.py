"""Metrics: `OUT/metrics.jsonl` (one JSON object per optimizer step) and one readable console line per step.

Only rank 0 writes. Every row carries at least `epoch`, `step`, `loss`, `reward_mean`, `reward_std` and
`filtered_fraction`; the rest (loss terms, grad norm, throughput, phase times, counts) is added by the loop. Evaluations
go to `OUT/eval.jsonl` (one object per evaluation: `epoch`, `step`, `eval_reward`, `eval_samples`), and one summary per
epoch to `OUT/epochs.jsonl` (rewards, filtering, phase times and the epoch's samples/s per rank, the throughput unit
other trainers publish). On resume, `truncate_from(epoch)` drops the rows of these files the checkpoint does not cover,
so they read like an uninterrupted run's (a killed run may have logged steps past its last checkpoint).

Rows also go to the trackers the config switches on (`trackers.py`: TensorBoard, wandb), and `progress(label,
total)` shows a phase's progress: one line redrawn in place on a terminal, a plain line per finished phase in a
log file (no tqdm: one line of ANSI is all it takes).

What each name means: docs/TRAINING.md, "Metrics".
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from nftcore.utils.images import image_grid, save_image_grid

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
        save_image_grid(path, *columns, scale=max(1, 128 // columns[0].shape[-1]))
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
