"""Checkpoint integrity: checksums.json (size and sha256 of every file) written at save, verified before a resume.

At save time each rank hashes the DCP shards it wrote itself (read back from the page cache, several files in
parallel) and rank 0 the rest; at resume the files a resume reads are checked, split over the ranks, and every rank
gets the same verdict, so a truncated or flipped file is named instead of surfacing as an EOFError deep in DCP, and no
rank loads a different checkpoint from the others. The cost is one extra read of the checkpoint at save and one at
resume, at sha256's ~1.5 GB/s per thread.

See docs/DESIGN.md §7.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from nftcore.trainer.checkpoint_errors import one_line
from nftcore.trainer.distributed import DistEnv, all_gather_object, on_rank0

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
CONFIG_FILE = "config.toml"
CHECKSUMS = "checksums.json"
METADATA = ".metadata"
HASH_CHUNK = 8 << 20
HASH_THREADS = 4  # hashlib releases the GIL on large buffers: files hash in parallel

Log = Callable[[str], None]


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
        return None, [f"{file} is unreadable ({one_line(err)})"]
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
            (log or print)(f"# note: {path} has no {CHECKSUMS} (saved before checksums existed): loading it "
                           "unverified")
        return []
    names = sorted(manifest)
    mine = {name: manifest[name] for name in names[env.rank::env.world_size]}
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        found = [p for part in pool.map(lambda item: _check_files(path, dict([item])), mine.items()) for p in part]
    return [problem for part in all_gather_object(found, env) for problem in part]
