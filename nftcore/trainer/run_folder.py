"""One run per `run.out` folder, checked before any training; and what a resumed run may change in its config.

**The run folder** (`prepare_run_folder`, run by `python -m nftcore.train` before the model is loaded and again by
`Trainer.train` before the first epoch; rank 0 looks, every rank gets the same verdict):

- A folder *holds a run* when its metrics.jsonl, eval.jsonl or epochs.jsonl has content or its checkpoints/ has any
  entry.
- A new run (no `--resume`) there is refused: it would empty the old metrics, keep the old checkpoints, and a later
  `--resume latest` would continue the old run (another seed) as if it were the new one. `run.overwrite=true`
  deletes the old run's outputs first — `OUTPUTS`, nothing else: tensorboard/ and wandb/ are left alone (their
  writers are open by then) — and logs what it removed.
- `--resume latest` continues the folder's own run, whatever the folder holds. With no finished checkpoint yet the
  job died before its first save: it starts fresh and its metrics rows are dropped.
- `--resume PATH` with PATH under OUT/checkpoints/ is the same run. PATH anywhere else starts a branch of another
  run in run.out, so run.out must not hold a run of its own (unless `run.overwrite=true`).
- `run.overwrite=true` with `--resume latest`, or with a PATH under OUT/checkpoints/, would delete what it resumes
  from: a ConfigError.
- Then rank 0 creates run.out and checkpoints/ and writes a probe file there, so an unwritable folder is an error
  now rather than at the first save, after an epoch of work.

**A resumed run's config** (`check_resume_config`, before anything is loaded) is compared key by key with the
checkpoint's config.toml. Refused, each named with old → new, because the saved weights or the run's trajectory
depend on them (a changed LoRA shape would otherwise be a DCP traceback; a changed alpha, seed or objective a silent
change of experiment):

    model.*              family, base weights (path), their dtype, LoRA or full fine-tuning (finetune)
    lora.*               rank, alpha, init, include_mlp: the adapters' shapes and scale
    sampling.*           K, G, ODE steps, solver, resolution, guidance
    nft.*                the objective, the advantages, the old-policy and EMA schedules
    reward.*             which judge and how it sees the images: the reward is the objective
    filter.*             which groups train and which prompts are banned
    optim.*              steps per epoch, AdamW's betas/eps/weight decay, clipping, mixed precision
    data.*               the dataset and how groups are keyed
    run.seed             every random draw
    LoRA vs full fine-tuning (also trainer.json's record, for checkpoints older than model.finetune)
    any section not listed here (a new one is refused until someone decides)

Allowed, and each change logged:

    run.*  (but seed)    epochs (to extend a run), out, name, overwrite
    parallel.*           world-size independent by design: the batch plan and per-sample seeding give the same
                         numbers on any layout
    checkpoint.*, metrics.*, eval.*   what is saved, logged and evaluated, not what is trained
    model.gradient_checkpointing      recomputation only
    sampling.batch_size               per-rank batching: same samples, same noise, same normalised loss
    reward.server_url, reward.timeout_s, reward.max_retries   where the judge runs and how patiently it is asked
    optim.lr                          to rescue a diverging run; applied over the lr stored with the optimizer
    optim.allow_tf32                  a CUDA matmul speed switch
    nft.timestep_chunk                how many timesteps share a forward: the same loss, other memory
    data.num_workers, data.bad_lines, data.verify_images      reading the same data (switching to 'skip' is the way
                                      on after a bad image stopped a run)

The most specific entry wins (`run.seed` over `run`). A checkpoint whose config.toml is missing or unreadable is a
CheckpointError naming the file.

See docs/TRAINING.md, "Stopping, crashing and resuming".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nftcore.config import SECTIONS, ConfigError, TrainConfig, config_to_dict, load_toml
from nftcore.trainer.checkpoint import CONFIG_FILE, TRAINER_STATE, CheckpointError, Log, named_checkpoint, on_rank0
from nftcore.trainer.distributed import DistEnv

LOGS = ("metrics.jsonl", "eval.jsonl", "epochs.jsonl")
OUTPUTS = (*LOGS, "checkpoints", "images", "reward_curve.png", "before_after.png")
"""What nftcore writes into run.out, and all that `run.overwrite=true` deletes."""
PROBE = ".nftcore-write-probe"

REFUSED_ON_RESUME = ("model", "lora", "sampling", "nft", "reward", "filter", "optim", "data", "run.seed")
ALLOWED_ON_RESUME = ("run", "parallel", "checkpoint", "metrics", "eval", "model.gradient_checkpointing",
                     "sampling.batch_size", "reward.server_url", "reward.timeout_s", "reward.max_retries", "optim.lr",
                     "optim.allow_tf32", "data.num_workers", "data.bad_lines", "data.verify_images",
                     "nft.timestep_chunk", "data.cache_conditioning", "data.cache_dir")
NOT_LOGGED = ("checkpoint.resume",)  # differs on every resume
FINETUNE_NAMES = {"lora": "LoRA", "full": "full fine-tuning"}


# ---------------------------------------------------------------------------------------------------- run folder


def held_run(out: str | Path) -> list[str]:
    """What in `out` shows that it holds a run: a log (LOGS) with content, a non-empty checkpoints/."""
    out = Path(out)
    found = [name for name in LOGS if (out / name).is_file() and (out / name).stat().st_size]
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and any(entry.name != PROBE for entry in checkpoints.iterdir()):
        found.append("checkpoints/")
    return found


def _under(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def _remove_outputs(out: Path) -> list[str]:
    removed = []
    for name in OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(f"{name}/")
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed


def _probe(out: Path, checkpoints: Path) -> None:
    for folder in (out, checkpoints):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create {folder} (run.out = {out}): {err.strerror or err}; choose a writable "
                              "--run.out") from None
    probe = checkpoints / PROBE
    try:
        probe.write_bytes(b"ok\n")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write checkpoints to {checkpoints}: {err.strerror or err}; choose a writable "
                          "--run.out") from None


def _prepare(cfg: TrainConfig) -> list[str]:
    out, checkpoints, resume = Path(cfg.run.out), cfg.run.checkpoint_dir, cfg.checkpoint.resume
    if resume not in ("", "latest"):
        named_checkpoint(resume)  # a PATH that is no checkpoint: say so before anything else
    own = resume not in ("", "latest") and _under(Path(resume), checkpoints)
    if cfg.run.overwrite and resume == "latest":
        raise ConfigError(f"run.overwrite=true and --resume latest contradict: the first deletes the run in {out} "
                          "that the second would continue; pass one of them")
    if cfg.run.overwrite and own:
        raise ConfigError(f"run.overwrite=true would delete {resume}, the checkpoint --resume names; pass one of them")
    held = held_run(out)
    removed: list[str] = []
    if held:
        if cfg.run.overwrite:
            removed = _remove_outputs(out)
        elif not resume:
            raise ConfigError(f"{out} already holds a run ({', '.join(held)}); pass --run.overwrite=true to delete "
                              "it and start over, or --resume latest to continue it")
        elif resume != "latest" and not own:
            raise ConfigError(f"{out} already holds a run ({', '.join(held)}), and --resume {resume} is another "
                              f"run's checkpoint: the two would mix; use an empty --run.out, pass "
                              f"--run.overwrite=true to delete the run in {out} first, or --resume latest to "
                              "continue that run")
    _probe(out, checkpoints)
    return removed


def prepare_run_folder(cfg: TrainConfig, env: DistEnv, log: Log = print) -> None:
    """Refuse or clear run.out as the module docstring says, then check that checkpoints can be written there.

    Collective (rank 0 decides and acts, every rank raises the same ConfigError); safe to call more than once."""
    removed = on_rank0(env, lambda: _prepare(cfg))
    if removed and env.is_main:
        log(f"# run.overwrite: removed the previous run's {', '.join(removed)} from {cfg.run.out}")


# ---------------------------------------------------------------------------------------------------- resume config


def resume_allows(key: str) -> bool:
    """Whether `section.key` may differ from the checkpoint's config on resume (the module docstring's lists)."""
    section = key.split(".", 1)[0]
    if key in ALLOWED_ON_RESUME or key in REFUSED_ON_RESUME:
        return key in ALLOWED_ON_RESUME
    return section in ALLOWED_ON_RESUME


def _show(value: Any) -> str:
    from nftcore.config.serialize import toml_literal

    return "none" if value is None else toml_literal(value)


def config_changes(old: TrainConfig, new: TrainConfig) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences from `old` to `new`, each as 'section.key old → new'."""
    before, after = config_to_dict(old), config_to_dict(new)
    refused, allowed = [], []
    for section in SECTIONS:
        for key, value in after[section].items():
            name = f"{section}.{key}"
            if before[section].get(key) == value or name in NOT_LOGGED:
                continue
            change = f"{name} {_show(before[section].get(key))} → {_show(value)}"
            (allowed if resume_allows(name) else refused).append(change)
    return refused, allowed


def _compare(cfg: TrainConfig, path: Path, finetune: str | None) -> list[str]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: cannot check this run's config against the checkpoint's")
    try:
        old = load_toml(file, validate=False)
    except ConfigError as err:
        raise CheckpointError(f"{file} is unreadable: {' '.join(str(err).split())}") from None
    refused, allowed = config_changes(old, cfg)
    try:
        saved = json.loads((path / TRAINER_STATE).read_text()).get("finetune")
    except (OSError, ValueError, AttributeError):
        saved = None  # load_checkpoint names the file
    if saved and finetune and saved != finetune:
        refused.insert(0, f"the checkpoint holds {FINETUNE_NAMES.get(saved, saved)} weights, this run trains "
                          f"{FINETUNE_NAMES.get(finetune, finetune)}")
    if refused:
        raise ConfigError(f"cannot resume from {path}: the config differs from the checkpoint's in what the trained "
                          f"weights or the run's trajectory depend on: {', '.join(refused)}; change them in a new run "
                          "(another --run.out, or --run.overwrite=true)")
    return allowed


def check_resume_config(cfg: TrainConfig, path: str | Path, env: DistEnv, *, finetune: str | None = None,
                        log: Log = print) -> list[str]:
    """Compare `cfg` with checkpoint `path`'s config.toml (and `finetune`, 'lora' or 'full', with its trainer.json):
    ConfigError naming every refused change, CheckpointError if config.toml is missing or unreadable; log and
    return the allowed changes. Collective: rank 0 reads and compares, every rank gets the verdict."""
    allowed = on_rank0(env, lambda: _compare(cfg, Path(path), finetune))
    if allowed and env.is_main:
        log(f"# resuming {path} with these config changes (allowed on resume): {', '.join(allowed)}")
    return allowed
