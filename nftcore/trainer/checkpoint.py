"""Checkpoints: everything needed to continue bit for bit, with `torch.distributed.checkpoint` (DCP).

Layout, under OUT/checkpoints/:

    epoch-000004/            state after 4 complete epochs
        .metadata, __*_*.distcp   DCP: both LoRA adapters, the EMA shadows, the optimizer state, the torch RNG
        trainer.json          step, epoch, EMA update count, the prompt ban, NaN counters, lora|full (rank 0, JSON)
        config.toml           the effective config (`config_to_toml`)
        lora_ema/peft/        EMA weights as a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)
        lora_ema/diffusers/   EMA weights for `pipe.load_lora_weights` (pytorch_lora_weights.safetensors)
        ema/transformer/      instead of lora_ema/ for full fine-tuning: the EMA transformer in diffusers' layout
        checksums.json        size and sha256 of every other file, written after every rank finished
        COMPLETE              written last: a folder without it is ignored

Epoch boundaries only: per-sample seeding replays an epoch exactly from its start, so a checkpoint mid-epoch would
capture rollouts and reward futures for no gain. Resume never parses folder names: the step and epoch come from
trainer.json. DCP saves sharded (FSDP2 DTensor) and plain tensors alike, so one code path serves 1 and N ranks, and a
checkpoint may be loaded on a different world size. See docs/DESIGN.md §7 and docs/ALGORITHM.md §5.5.

**Checkpoints are for resuming, exports are for sharing.** A DCP checkpoint is partly pickle; loading here admits
only DCP's own metadata classes and tensors (`safe_dcp`). Still, hand others the safetensors exports (lora_ema/,
ema/transformer/), which hold only tensors, not a checkpoint folder.

**Damage.** checksums.json (`checkpoint_integrity`) is verified before a resume loads anything. `--resume latest`
skips a checkpoint that fails verification or loading and takes the next older one (logging each one skipped and
why); `--resume PATH` fails with the reason (the user asked for that one). A checkpoint from before checksums.json
existed is loaded unverified. An unparseable trainer.json makes listing and pruning skip that folder with a warning,
never fail.

Errors: `CheckpointError` (a RuntimeError) for a damaged, crafted or unloadable checkpoint, `ConfigError` for a
`--resume` that names no checkpoint; both carry one line.
What a user sees: docs/TRAINING.md, "Stopping, crashing and resuming".
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from nftcore.config import ConfigError
from nftcore.trainer.checkpoint_errors import CheckpointError, one_line
from nftcore.trainer.checkpoint_integrity import (
    CHECKSUMS,
    COMPLETE,
    CONFIG_FILE,
    METADATA,
    TRAINER_STATE,
    checkpoint_files,
    file_checksums,
    verify_checkpoint,
    write_checksums,
)
from nftcore.trainer.distributed import DistEnv, all_gather_object, barrier, on_rank0
from nftcore.trainer.safe_dcp import SafeFileSystemReader, SafeLoadPlanner, storage_problems

__all__ = ["CHECKSUMS", "COMPLETE", "CONFIG_FILE", "METADATA", "TRAINER_STATE", "CheckpointError",
           "SafeFileSystemReader", "SafeLoadPlanner", "checkpoint_files", "file_checksums", "load_checkpoint",
           "resume_from", "save_checkpoint", "verify_checkpoint", "write_checksums"]

PREFIX = "epoch-"


Log = Callable[[str], None]


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def checkpoint_name(epoch: int) -> str:
    return f"{PREFIX}{epoch:06d}"


# ---------------------------------------------------------------------------------------------------------------
# Listing


def scan_checkpoints(root: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(finished checkpoint folders under `root` oldest first by trainer.json's epoch, [(folder, why skipped)]).

    A folder counts once it has COMPLETE; one whose trainer.json is missing or unparseable is skipped, not fatal."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    found, skipped = [], []
    for path in sorted(root.iterdir()):
        if not (path.is_dir() and (path / COMPLETE).is_file()):
            continue
        try:
            epoch = json.loads((path / TRAINER_STATE).read_text())["epoch"]
            if not isinstance(epoch, int) or isinstance(epoch, bool):
                raise ValueError(f"epoch is {epoch!r}, not an integer")
        except (OSError, ValueError, KeyError, TypeError) as err:
            skipped.append((path, f"{path / TRAINER_STATE} is unreadable ({one_line(err)})"))
            continue
        found.append((epoch, path))
    return [path for _, path in sorted(found)], skipped


def complete_checkpoints(root: str | Path, log: Log | None = None) -> list[Path]:
    """Finished checkpoint folders under `root`, oldest first (by the epoch in trainer.json); folders that cannot be
    read are left out with a warning through `log`."""
    found, skipped = scan_checkpoints(root)
    for _, why in skipped:
        (log or _warn)(f"# warning: ignoring checkpoint folder: {why}")
    return found


def named_checkpoint(resume: str) -> Path:
    """The folder `--resume PATH` names, which must be a finished checkpoint; ConfigError saying what it is if not."""
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such checkpoint folder")
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: not a folder; pass a checkpoint folder (OUT/checkpoints/epoch-NNNNNN) "
                          "or 'latest'")
    if (path / COMPLETE).is_file():
        return path
    for root in (path / "checkpoints", path):  # a run folder, or its checkpoints/ folder
        found, _ = scan_checkpoints(root)
        if found:
            run = path if root != path else path.parent
            raise ConfigError(f"--resume {resume}: not a checkpoint folder but the run's; its newest checkpoint is "
                              f"{found[-1]} (or pass --resume latest with --run.out {run})")
    raise ConfigError(f"--resume {resume}: not a complete checkpoint folder (no {COMPLETE} marker: the save did not "
                      "finish); pass a finished one, or 'latest'")


# ---------------------------------------------------------------------------------------------------------------
# Saving


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
                    export=None, log: Log | None = None) -> Path:
    """Write checkpoint `epoch-{epoch}` (all ranks call this), then prune to the newest `keep_latest` (0: keep all).

    `export(path)` runs on every rank with the EMA weights swapped in (the caller supplies it; rank 0 writes the
    LoRA or transformer files). Order: DCP shards and .metadata, each rank hashes its own shards, exports,
    trainer.json and config.toml, then (after every rank is done) rank 0 writes checksums.json and last COMPLETE.
    """
    path = Path(root) / checkpoint_name(epoch)
    if env.is_main:
        if path.exists():
            _remove_checkpoint(path)
        path.mkdir(parents=True)
    barrier(env)
    with _single_process_is_intended():
        dcp.save(tensor_state(weights, optimizer, ema), checkpoint_id=str(path), no_dist=not env.distributed)
    own = file_checksums(path, sorted(p.name for p in path.glob(f"__{env.rank}_*.distcp")))
    if export is not None:
        export(path)  # collective under FSDP2 (full_tensor), so every rank calls it
    if env.is_main:
        (path / TRAINER_STATE).write_text(json.dumps({**trainer_state, "epoch": epoch}, indent=2) + "\n")
        (path / CONFIG_FILE).write_text(config_toml)
    hashed = all_gather_object(own, env)  # also the barrier: every rank's files are written
    if env.is_main:
        known = {name: entry for part in hashed for name, entry in part.items()}
        files = checkpoint_files(path)
        missing = [name for name in files if name not in known or known[name]["size"] != (path / name).stat().st_size]
        write_checksums(path, {**known, **file_checksums(path, missing)}, files)
        (path / COMPLETE).write_text("ok\n")
        if keep_latest > 0:
            for old in complete_checkpoints(root, log)[:-keep_latest]:
                _remove_checkpoint(old)
    barrier(env)
    return path


def _remove_checkpoint(path: Path) -> None:
    """COMPLETE first, so a kill halfway leaves an unfinished folder (ignored), never a finished-looking husk."""
    (path / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: str | Path, *, weights, optimizer, ema, env: DistEnv | None = None) -> dict[str, Any]:
    """Restore adapters, EMA shadows, optimizer and RNG from `path` in place; return trainer.json's contents.

    Any failure is a one-line CheckpointError naming `path` (or the file), raised on every rank when any rank failed.
    A failed load may have overwritten some tensors: load another checkpoint, or stop."""
    path, env = Path(path), env or DistEnv()
    distributed = dist.is_available() and dist.is_initialized()
    failure = None
    try:
        try:
            content = json.loads((path / TRAINER_STATE).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path / TRAINER_STATE} is unreadable ({one_line(err)})") from None
        reader = SafeFileSystemReader(path)
        # Refuse a crafted or damaged .metadata, or a shard shorter than it says, here: inside DCP the error would be
        # wrapped (a bare EOFError, with no file name).
        problems = storage_problems(path, reader.read_metadata())
        if problems:
            raise CheckpointError("; ".join(problems))
        state = tensor_state(weights, optimizer, ema)
        with _single_process_is_intended():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not distributed)
        set_optimizer_state_dict(weights.model, optimizer, state["optim"])
        torch.set_rng_state(state["rng"])
    except CheckpointError as err:
        failure = str(err)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        failure = f"checkpoint {path} failed to load ({one_line(err)})"
    failures = [f for f in all_gather_object(failure, env) if f]
    if failures:
        raise CheckpointError(failure or failures[0])
    return content


# ---------------------------------------------------------------------------------------------------------------
# Resuming


def resume_from(resume: str, root: str | Path, env: DistEnv, *, load: Callable[[Path], Any],
                check: Callable[[Path], Any] | None = None, log: Log | None = None) -> Path | None:
    """Resume as `checkpoint.resume` says; return the checkpoint loaded, or None for a fresh start.

    '' → None. A PATH must be a finished checkpoint (ConfigError) that verifies, passes `check` and loads (otherwise
    CheckpointError with the reason, no fallback). 'latest' → the newest finished checkpoint under `root` that
    verifies, passes `check` and loads; each one skipped is logged with the reason; none at all → None (a restarted
    job starts fresh); some, all unusable → CheckpointError listing them. `check(path)` raising ConfigError (the
    config changed) stops at once: an older checkpoint would not make the config match. `load(path)` must raise
    CheckpointError on failure. Collective: every rank takes the same path."""
    log = log or _warn
    if not resume:
        return None

    def use(path: Path) -> None:
        problems = verify_checkpoint(path, env, log)
        if problems:
            raise CheckpointError("; ".join(problems))
        if check is not None:
            check(path)
        load(path)

    if resume != "latest":
        path = on_rank0(env, lambda: named_checkpoint(resume))
        try:
            use(path)
        except CheckpointError as err:
            raise CheckpointError(f"cannot resume: {err}") from None
        return path
    candidates = on_rank0(env, lambda: complete_checkpoints(root, log))
    if not candidates:
        log(f"# --resume latest: no finished checkpoint under {root} yet; starting fresh")
        return None
    skipped = []
    for path in reversed(candidates):
        try:
            use(path)
        except CheckpointError as err:
            skipped.append(str(err))
            log(f"# --resume latest: skipping {path}: {err}")
            continue
        if skipped:
            log(f"# --resume latest: resuming from {path}, the newest usable checkpoint ({len(skipped)} newer skipped)")
        return path
    raise CheckpointError(f"--resume latest: none of the {len(candidates)} finished checkpoints under {root} can be "
                          f"used: {' | '.join(skipped)}")


@contextmanager
def _single_process_is_intended():
    """DCP warns on every single-process save/load; without a process group that is exactly what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
