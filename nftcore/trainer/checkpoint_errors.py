"""The one error a checkpoint can raise, and how errors are shown on one line (shared by the checkpoint modules)."""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged (checksum, truncation), crafted (a refused pickle global), missing a
    file, or failing to load. The message is one line naming the checkpoint folder or file."""


def one_line(err: BaseException) -> str:
    """`Type: message` on one line; for DCP's CheckpointException, the first rank's underlying error."""
    if isinstance(err, CheckpointException) and err.failures:
        inner = next(iter(err.failures.values()))
        err = inner[0] if isinstance(inner, tuple) else inner
    text = " ".join(str(err).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
