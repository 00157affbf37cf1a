"""Input checks shared by the public ops: every bad input is a `ValueError` that names the op, the argument and the
shapes, never a silent broadcast.

Shape and dtype checks are free. Value checks (ranges, finiteness) cost a device sync, so the ops run them on the
small per-sample tensors only, and check big tensors for non-finite values lazily (on a non-finite result).

Step 1 of the op pattern, docs/DESIGN.md §5.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class NonFiniteError(ValueError):
    """A NaN/inf input or result: a caller that skips diverged steps (the trainer) catches this class alone, so a
    wrong shape or range still stops it."""


def shape_str(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def check_tensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: `{name}` must be float16/bfloat16/float32/float64, got {x.dtype}")


def check_same_shape(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.shape != reference.shape:
            raise ValueError(
                f"{op}: `{name}` has shape {shape_str(x)} but `{reference_name}` has shape {shape_str(reference)}; "
                "they must match exactly (no broadcasting)"
            )


def check_per_sample(op: str, name: str, x: torch.Tensor, batch: int, batch_of: str) -> None:
    if x.shape != (batch,):
        raise ValueError(
            f"{op}: `{name}` must have shape [B] = [{batch}] (one value per sample of `{batch_of}`), "
            f"got {shape_str(x)}"
        )


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: x.device for name, x in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"`{n}` on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_in_unit_interval(op: str, name: str, x: torch.Tensor) -> None:
    """Finite and within [0, 1]; names the first offending index."""
    bad = ~(torch.isfinite(x) & (x >= 0) & (x <= 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: `{name}` must be finite and in [0, 1]; `{name}`[{i}] = {x[i].item()!r}")


def check_binary(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype == torch.bool:
        return
    bad = (x != 0) & (x != 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: `{name}` must be bool or 0/1, `{name}`[{i}] = {x[i].item()!r}")


def raise_first_non_finite(op: str, **tensors: torch.Tensor | None) -> None:
    """Called after a non-finite result: find which input carried the NaN/inf and say where."""
    for name, x in tensors.items():
        if x is None or not x.is_floating_point():
            continue
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise NonFiniteError(f"{op}: `{name}` (shape {shape_str(x)}) has a non-finite value at index {list(idx)}")
