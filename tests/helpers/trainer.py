"""The tiny demo run most trainer tests start from (the tiny random policy, `--model.path tiny`: 1 double + 1 single
block, on the demo's 16 px tasks with K = 2: a few seconds on two cores), in this process or as job arguments."""

from __future__ import annotations

from pathlib import Path

import torch

from nftcore.config import load_config
from nftcore.trainer import Trainer, read_metrics


def tiny_args(out, **overrides) -> list[str]:
    """A tiny fixed-seed demo run: 2 epochs × 2 optimizer steps, K = 2, G = 2, 3 sampler steps (T_train = 2)."""
    options = {
        "run.out": str(out), "run.epochs": 2, "run.seed": 7, "model.path": "tiny", "sampling.resolution": 16,
        "sampling.group_size": 2, "sampling.groups_per_epoch": 2, "sampling.batch_size": 1, "sampling.num_steps": 3,
        "optim.steps_per_epoch": 2, "optim.lr": 1e-3, "lora.rank": 2, "lora.alpha": 4.0, "nft.decay_type": 0,
        "filter.rule": "none", "checkpoint.save_every": 1, "eval.every": 0, "metrics.progress": False,
    }
    options.update(overrides)
    return [f"--{k}={v}" for k, v in options.items()]


def run_tiny(out, *, reward_fn=None, loss_fn=None, finetune=None, **overrides) -> tuple[Trainer, dict]:
    """`tiny_args(out, **overrides)` trained in this process, one torch thread: (trainer, its train() result)."""
    cfg = load_config(tiny_args(out, **overrides))
    torch.set_num_threads(1)  # as the jobs run (OMP_NUM_THREADS=1), so in-process and subprocess numbers agree
    kwargs = {"echo": False, "finetune": finetune}
    if reward_fn is not None:
        kwargs["reward_fn"] = reward_fn
    if loss_fn is not None:
        kwargs["loss_fn"] = loss_fn
    trainer = Trainer(cfg, **kwargs)
    return trainer, trainer.train()


def loss_trace(out) -> list[float]:
    """The loss of every optimizer step of the run in `out`, in order."""
    return [row["loss"] for row in read_metrics(Path(out) / "metrics.jsonl")]
