"""Optional experiment trackers behind one interface: TensorBoard and Weights & Biases (after torchtitan's
`LoggerContainer`). Each is imported only when its `metrics.*` switch is on, so neither is a dependency; a switch
that is on without its package is an error at start-up that says what to install, not a silent no-op.

A tracker has `log(row, prefix="train")` (one metrics row: its finite numbers are logged at `row["step"]`, under
`train/` or, for evaluation rows, `eval/`), `image(tag, image, step)` (a [3, H, W] float image in [0, 1]) and
`close()`. Only rank 0 builds any.

The logged names: docs/TRAINING.md, "Metrics".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nftcore.config import TrainConfig, config_to_dict


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers (booleans, strings and NaN/inf left out: trackers plot scalars)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    """Event files under OUT/tensorboard/, scalars as `train/<key>` (evaluations `eval/<key>`)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("metrics.tensorboard = true needs the tensorboard package: `pip install tensorboard`, "
                              "or turn it off with --metrics.tensorboard=false") from err
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict[str, Any], prefix: str = "train") -> None:
        step = int(row["step"])
        for key, value in _numbers(row).items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, image.float().clamp(0, 1), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One wandb run (project `metrics.wandb_project`, name `run.name`, the effective config), files under OUT/."""

    def __init__(self, cfg: TrainConfig):
        try:
            import wandb
        except ImportError as err:
            raise ImportError("metrics.wandb = true needs the wandb package: `pip install wandb` (and `wandb login` "
                              "or WANDB_API_KEY / WANDB_MODE=offline), or turn it off with --metrics.wandb=false"
                              ) from err
        self.wandb = wandb
        out = Path(cfg.run.out)
        out.mkdir(parents=True, exist_ok=True)  # wandb wants its dir to exist
        self.run = wandb.init(project=cfg.metrics.wandb_project, name=cfg.run.name, config=config_to_dict(cfg),
                              dir=str(out))

    def log(self, row: dict[str, Any], prefix: str = "train") -> None:
        # No `step=`: a NaN-skipped step repeats its step number, which wandb would drop; "step" is a logged value.
        # Training keys stay bare (as before); evaluation keys are `eval/<key>` beside their "step".
        numbers = _numbers(row)
        if prefix != "train":
            numbers = {"step": numbers["step"], **{f"{prefix}/{k}": v for k, v in numbers.items() if k != "step"}}
        self.run.log(numbers)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        array = (image.float().clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        self.run.log({tag: self.wandb.Image(array), "step": step})

    def close(self) -> None:
        self.run.finish()


def build_trackers(cfg: TrainConfig) -> list[TensorBoardTracker | WandbTracker]:
    """The trackers `cfg.metrics` switches on (call on rank 0 only)."""
    trackers: list[TensorBoardTracker | WandbTracker] = []
    if cfg.metrics.tensorboard:
        trackers.append(TensorBoardTracker(Path(cfg.run.out) / "tensorboard"))
    if cfg.metrics.wandb:
        trackers.append(WandbTracker(cfg))
    return trackers
