"""Reading a DCP checkpoint without running what a crafted file asks for.

A DCP checkpoint is partly pickle: `.metadata` is a pickled object and the optimizer's non-tensor settings are pickled
items inside the shards. Here `.metadata` goes through an unpickler that admits only DCP's own metadata classes
(`SafeFileSystemReader`; anything else is refused with the file and the global it named, before any of it runs), and
the non-tensor items through `torch.load(weights_only=True)` (`SafeLoadPlanner`). `storage_problems` names a shard
that is missing or shorter than `.metadata` says, which DCP would report as a bare EOFError.

See docs/DESIGN.md §7 and docs/TRAINING.md, "Stopping, crashing and resuming".
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from nftcore.trainer.checkpoint_errors import CheckpointError, one_line

METADATA = ".metadata"


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
            raise CheckpointError(f"{file} is unreadable ({one_line(err)})") from None
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


def storage_problems(path: Path, metadata) -> list[str]:
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
