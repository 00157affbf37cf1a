"""Checkpoints: everything needed to continue bit for bit, with `torch.distributed.checkpoint` (DCP).

Layout, under OUT/checkpoints/ (STYLE.md §8.14):

    epoch-000004/            state after 4 complete epochs
        .metadata, __*_*.distcp   DCP: both LoRA adapters, the EMA shadows, the optimizer state, the torch RNG
        trainer.json          step, epoch, EMA update count, the prompt ban, NaN counters (rank 0, plain JSON)
        config.toml           the effective config (`config_to_toml`)
        lora_ema/peft/        EMA weights as a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)
        lora_ema/diffusers/   EMA weights for `pipe.load_lora_weights` (pytorch_lora_weights.safetensors)
        ema/transformer/      instead of lora_ema/ for full fine-tuning: the EMA transformer in diffusers' layout
        COMPLETE              written last, after every rank finished: a folder without it is ignored

Why epoch boundaries only: every random draw of an epoch (prompts, rollout noise, timesteps, training noise) is seeded
from (run seed, epoch, global sample index), so replaying an epoch from its start reproduces it exactly; a
checkpoint mid-epoch would have to capture rollouts and reward futures for no gain. Resume never parses folder
names for state: the step and epoch come from trainer.json.

DCP saves sharded (FSDP2 DTensor) and plain tensors alike, so one code path serves 1 and N ranks, and a checkpoint
may be loaded on a different world size.
"""

from __future__ import annotations

import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from nftcore.trainer.distributed import DistEnv, barrier

PREFIX = "epoch-"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
CONFIG_FILE = "config.toml"


def checkpoint_name(epoch: int) -> str:
    return f"{PREFIX}{epoch:06d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoint folders under `root`, oldest first (by the epoch in trainer.json)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and (path / COMPLETE).is_file() and (path / TRAINER_STATE).is_file():
            found.append((json.loads((path / TRAINER_STATE).read_text())["epoch"], path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """'' → None (fresh start); 'latest' → the newest complete checkpoint under `root` (None if there is none yet,
    so a restarted job with --resume latest starts fresh the first time); otherwise the named folder, which must be a
    complete checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return path


def tensor_state(weights, optimizer: torch.optim.Optimizer, ema) -> dict[str, Any]:
    """The DCP state: live references, so `dcp.load` writes straight into the model(s), the EMA and the optimizer
    (the optimizer's part is applied by `load_checkpoint` through `set_optimizer_state_dict`). `weights` is the
    trainer's LoRAWeights / FullWeights: θ and θ_old (the frozen base is the pretrained model, not saved)."""
    return {
        "weights": weights.checkpoint_tensors(),
        "ema": ema.shadow,
        "optim": get_optimizer_state_dict(weights.model, optimizer),
        "rng": torch.get_rng_state(),
    }


def save_checkpoint(root: str | Path, epoch: int, *, weights, optimizer, ema,
                    trainer_state: dict[str, Any], config_toml: str, env: DistEnv, keep_latest: int = 0,
                    export=None) -> Path:
    """Write checkpoint `epoch-{epoch}` (all ranks call this), then prune to the newest `keep_latest` (0: keep all).

    `export(path)` runs on every rank with the EMA weights swapped in (the caller supplies it; rank 0 writes the
    LoRA or transformer files).
    """
    path = Path(root) / checkpoint_name(epoch)
    if env.is_main:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    barrier(env)
    with _single_process_is_intended():
        dcp.save(tensor_state(weights, optimizer, ema), checkpoint_id=str(path), no_dist=not env.distributed)
    if export is not None:
        export(path)  # collective under FSDP2 (full_tensor), so every rank calls it
    if env.is_main:
        (path / TRAINER_STATE).write_text(json.dumps({**trainer_state, "epoch": epoch}, indent=2) + "\n")
        (path / CONFIG_FILE).write_text(config_toml)
    barrier(env)
    if env.is_main:
        (path / COMPLETE).write_text("ok\n")
        if keep_latest > 0:
            for old in complete_checkpoints(root)[:-keep_latest]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return path


def load_checkpoint(path: str | Path, *, weights, optimizer, ema) -> dict[str, Any]:
    """Restore adapters, EMA shadows, optimizer and RNG from `path` in place; return trainer.json's contents."""
    path = Path(path)
    state = tensor_state(weights, optimizer, ema)
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=not (dist.is_available() and dist.is_initialized()))
    set_optimizer_state_dict(weights.model, optimizer, state["optim"])
    torch.set_rng_state(state["rng"])
    return json.loads((path / TRAINER_STATE).read_text())


@contextmanager
def _single_process_is_intended():
    """DCP warns on every single-process save/load; without a process group that is exactly what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
