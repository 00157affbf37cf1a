"""Checkpoints: everything needed to continue bit for bit, with `torch.distributed.checkpoint` (DCP).

Layout, under OUT/checkpoints/ (STYLE.md §8.14):

    epoch-000004/            state after 4 complete epochs
        .metadata, __*_*.distcp   DCP: both LoRA adapters, the EMA shadows, the optimizer state, the torch RNG
        trainer.json          step, epoch, EMA update count, the prompt ban, NaN counters, lora|full (rank 0, JSON)
        config.toml           the effective config (`config_to_toml`)
        lora_ema/peft/        EMA weights as a PEFT adapter folder (adapter_model.safetensors + adapter_config.json)
        lora_ema/diffusers/   EMA weights for `pipe.load_lora_weights` (pytorch_lora_weights.safetensors)
        ema/transformer/      instead of lora_ema/ for full fine-tuning: the EMA transformer in diffusers' layout
        checksums.json        size and sha256 of every other file, written after every rank finished
        COMPLETE              written last: a folder without it is ignored

Why epoch boundaries only: every random draw of an epoch (prompts, rollout noise, timesteps, training noise) is seeded
from (run seed, epoch, global sample index), so replaying an epoch from its start reproduces it exactly; a
checkpoint mid-epoch would have to capture rollouts and reward futures for no gain. Resume never parses folder
names for state: the step and epoch come from trainer.json.

DCP saves sharded (FSDP2 DTensor) and plain tensors alike, so one code path serves 1 and N ranks, and a checkpoint
may be loaded on a different world size.

**Checkpoints are for resuming, exports are for sharing.** A DCP checkpoint is partly pickle: `.metadata` is a
pickled object and the optimizer's non-tensor settings are pickled items inside the shards, and plain unpickling runs
whatever a crafted file asks for. Loading here is restricted: `.metadata` goes through an unpickler that admits only
DCP's own metadata classes (`SafeFileSystemReader`; anything else is refused with the file and the global it named,
before any of it runs), tensors and the non-tensor items through `torch.load(weights_only=True)`
(`SafeLoadPlanner`). Still, hand others the safetensors exports (lora_ema/, ema/transformer/), which hold only
tensors, not a checkpoint folder.

**Damage.** checksums.json lists the size and sha256 of every file of the folder. At save time each rank hashes the
DCP shards it wrote itself (`__<rank>_*.distcp`, read back from the page cache, several files in parallel), and rank 0
the rest (.metadata, trainer.json, config.toml, the exports): the cost is one extra read of the checkpoint, spread
over the ranks, at sha256's ~1.5 GB/s per thread (a LoRA checkpoint: well under a second; a full fine-tuning one of a
large model, θ + θ_old + EMA + two Adam moments, is the case where it shows). On resume the files the resume reads
(those directly in the folder; the exports are listed but not read back) are verified before DCP loads them, split
over the ranks, and all ranks agree on the verdict (`verify_checkpoint`): a truncated or flipped file is named
instead of surfacing as an EOFError deep in DCP, and no rank loads a different checkpoint from the others. That is a
second read of the state at resume (the first warms the page cache for DCP's). Shards shorter than `.metadata`
says are named even without a manifest. `--resume latest` skips a checkpoint that fails verification or loading
and takes the next older one (logging each one skipped and why); `--resume PATH` fails with the reason (the user
asked for that one). A checkpoint from before checksums.json existed is loaded unverified. An unparseable
trainer.json makes listing and pruning skip that folder with a warning, never fail.

Errors: `CheckpointError` (a RuntimeError) for a damaged, crafted or unloadable checkpoint, `ConfigError` for a
`--resume` that names no checkpoint; both carry one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from nftcore.config import ConfigError
from nftcore.trainer.distributed import DistEnv, barrier, broadcast_object

PREFIX = "epoch-"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
CONFIG_FILE = "config.toml"
CHECKSUMS = "checksums.json"
METADATA = ".metadata"
HASH_CHUNK = 8 << 20
HASH_THREADS = 4  # hashlib releases the GIL on large buffers: files hash in parallel


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged (checksum, truncation), crafted (a refused pickle global), missing a
    file, or failing to load. The message is one line naming the checkpoint folder or file."""


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
            skipped.append((path, f"{path / TRAINER_STATE} is unreadable ({_one_line(err)})"))
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


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """'' → None (fresh start); 'latest' → the newest complete checkpoint under `root` (None if there is none yet,
    so a restarted job with --resume latest starts fresh the first time); otherwise the named folder, which must be a
    complete checkpoint. Nothing is verified: `resume_from` does that."""
    if not resume:
        return None
    if resume == "latest":
        done = complete_checkpoints(root)
        return done[-1] if done else None
    return named_checkpoint(resume)


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
    hashed = _all_gather(own, env)  # also the barrier: every rank's files are written
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


def checkpoint_files(path: Path) -> list[str]:
    """Every file under `path` except COMPLETE and checksums.json, as sorted relative POSIX paths."""
    skip = {COMPLETE, CHECKSUMS}
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if p.is_file() and p.relative_to(path).as_posix() not in skip)


def _hash_file(path: Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def file_checksums(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{name: {"size", "sha256"}} for the files `names` under `folder`, hashed a few at a time."""
    names = list(names)
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(names))) as pool:
        return dict(zip(names, pool.map(lambda name: _hash_file(folder / name), names)))


def write_checksums(path: Path, entries: dict[str, dict[str, Any]], files: list[str] | None = None) -> None:
    """checksums.json for `files` (default: all of `entries`), written to a temporary name and renamed."""
    files = sorted(entries) if files is None else files
    manifest = {"algorithm": "sha256", "files": {name: entries[name] for name in files}}
    scratch = path / f".{CHECKSUMS}.tmp"
    scratch.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(scratch, path / CHECKSUMS)


# ---------------------------------------------------------------------------------------------------------------
# Verifying


def _read_manifest(path: Path) -> tuple[dict[str, dict[str, Any]] | None, list[str]]:
    """(the files checksums.json lists that a resume reads, problems); (None, []) if the folder has no manifest."""
    file = path / CHECKSUMS
    if not file.is_file():
        return None, []
    try:
        entries = json.loads(file.read_text())["files"]
        needed = {name: {"size": int(e["size"]), "sha256": str(e["sha256"])} for name, e in entries.items()
                  if "/" not in name}  # the exports (subfolders) are not read by a resume
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, [f"{file} is unreadable ({_one_line(err)})"]
    absent = [name for name in (METADATA, TRAINER_STATE, CONFIG_FILE) if name not in needed]
    if absent:
        return None, [f"{file} does not list {', '.join(absent)}"]
    return needed, []


def _check_files(path: Path, entries: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    for name, expected in entries.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            problems.append(f"{file} is missing")
            continue
        if size != expected["size"]:
            problems.append(f"{file} has {size} bytes, {CHECKSUMS} says {expected['size']} (truncated or damaged)")
        elif _hash_file(file)["sha256"] != expected["sha256"]:
            problems.append(f"{file}: sha256 differs from {CHECKSUMS} (the file changed after it was saved)")
    return problems


def verify_checkpoint(path: str | Path, env: DistEnv | None = None, log: Log | None = None) -> list[str]:
    """Problems with the files a resume of `path` reads, checked against checksums.json; [] if none.

    Collective: rank 0 reads the manifest and shares it, each rank checks every world_size-th file, and every rank
    returns the same list. Without checksums.json (a checkpoint from before manifests) nothing can be checked:
    [] with a note through `log`."""
    env, path = env or DistEnv(), Path(path)
    manifest, problems = on_rank0(env, lambda: _read_manifest(path))
    if problems:
        return problems
    if manifest is None:
        if env.is_main:
            (log or _warn)(f"# note: {path} has no {CHECKSUMS} (saved before checksums existed): loading it "
                           "unverified")
        return []
    names = sorted(manifest)
    mine = {name: manifest[name] for name in names[env.rank::env.world_size]}
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        found = [p for part in pool.map(lambda item: _check_files(path, dict([item])), mine.items()) for p in part]
    return [problem for part in _all_gather(found, env) for problem in part]


# ---------------------------------------------------------------------------------------------------------------
# Loading: no pickle that can run code


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "complex", "bytearray", "slice"},
}
"""What a DCP `.metadata` holds, found by unpickling the ones nftcore writes (LoRA and full fine-tuning, 1 and 2
ranks, optimizer state included): DCP's metadata dataclasses and enums, torch.Size, torch dtypes (`torch.float32`, ...,
admitted by type below), the layout helper, the checkpoint id (a path), and plain containers. Each is a constructor
with no side effects."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, handle, file: Path):
        super().__init__(handle)
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.file}: refused to unpickle the global {module}.{name}: a DCP .metadata holds "
                              "only torch.distributed.checkpoint's metadata classes, so this file was not written by "
                              "nftcore (or was altered); nothing in it was run")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read by an unpickler that admits only DCP's metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        file = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with self.fs.create_stream(file, "rb") as handle:
                metadata = _MetadataUnpickler(handle, file).load()
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing") from None
        except Exception as err:  # truncated or garbled: pickle raises any of a dozen types
            raise CheckpointError(f"{file} is unreadable ({_one_line(err)})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{file} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, except that non-tensor items (the optimizer's lr, betas, ...) are read with
    `torch.load(weights_only=True)` instead of plain pickle."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)  # only what weights_only admits gets through
        checked.seek(0)
        super().load_bytes(read_item, checked)  # which unpickles it freely and puts it in place


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
            raise CheckpointError(f"{path / TRAINER_STATE} is unreadable ({_one_line(err)})") from None
        reader = SafeFileSystemReader(path)
        # Refuse a crafted or damaged .metadata, or a shard shorter than it says, here: inside DCP the error would be
        # wrapped (a bare EOFError, with no file name).
        problems = _storage_problems(path, reader.read_metadata())
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
        failure = f"checkpoint {path} failed to load ({_one_line(err)})"
    failures = [f for f in _all_gather(failure, env) if f]
    if failures:
        raise CheckpointError(failure or failures[0])
    return content


def _storage_problems(path: Path, metadata) -> list[str]:
    """Shards that .metadata names but that are missing, shorter than the data it places in them, or outside the
    folder (a crafted relative path)."""
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(ends.items()):
        file = path / name
        if Path(name).name != name or name in ("", ".", ".."):
            problems.append(f"{path / METADATA} names a data file outside the checkpoint folder: {name!r}")
        elif not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size < end:
            problems.append(f"{file} has {file.stat().st_size} bytes, {METADATA} places data up to byte {end} "
                            "(truncated)")
    return problems


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


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _one_line(err: BaseException) -> str:
    """`Type: message` on one line; for DCP's CheckpointException, the first rank's underlying error."""
    if isinstance(err, CheckpointException) and err.failures:
        inner = next(iter(err.failures.values()))
        err = inner[0] if isinstance(inner, tuple) else inner
    text = " ".join(str(err).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _all_gather(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-item list on one process)."""
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def on_rank0(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """`fn()` run on rank 0 and its result shared with every rank; an exception there is raised on every rank
    (ConfigError and CheckpointError as themselves, anything else as a RuntimeError naming it), so no rank is left
    waiting in a collective the others skipped."""
    if env.world_size == 1:
        return fn()
    outcome = None
    if env.is_main:
        try:
            outcome = ("ok", fn())
        except BaseException as err:  # noqa: BLE001 - re-raised as soon as the others have been told
            outcome = ("error", type(err).__name__, str(err))
            broadcast_object(outcome, env)
            raise
    outcome = broadcast_object(outcome, env)
    if outcome[0] == "ok":
        return outcome[1]
    _, name, message = outcome
    kind = {"ConfigError": ConfigError, "CheckpointError": CheckpointError}.get(name)
    raise kind(message) if kind else RuntimeError(f"rank 0 failed: {name}: {message}")


@contextmanager
def _single_process_is_intended():
    """DCP warns on every single-process save/load; without a process group that is exactly what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
