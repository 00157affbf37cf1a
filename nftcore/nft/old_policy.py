"""The old (sampling) policy: its soft-update schedule and the in-place update itself.

Rollouts come from a lagged copy of the trained weights, θ_old. After every epoch it moves towards θ:

    θ_old ← η·θ_old + (1 − η)·θ,    η = 0 if step < flat else min(uprate·(step − flat), uphold)

with `step` the number of optimizer steps taken so far. η = 0 is a hard on-policy copy; a larger η keeps the
sampling policy behind θ, which trades learning speed for stability (paper ablation, §1.5). The schedule ramps η
up so early training is on-policy and later training is damped.

`soft_update_` works on any two matching tensor collections, so full weights and LoRA adapters use the same code,
and `ema.py` reuses it for the evaluation EMA (which is the same update with a different weight). FSDP2-sharded
weights (DTensors) are updated shard by shard on each rank: an fp32 θ and a bf16 θ_old of a 20 B model are never
gathered for it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Union

import torch

TensorCollection = Union[Iterable[torch.Tensor], Mapping[str, torch.Tensor]]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def pair_tensors(
    targets: TensorCollection, sources: TensorCollection, *, target_name: str = "old", source_name: str = "new"
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Match two collections entry by entry and check them; return `(label, target, source)` triples.

    Mappings match by key (both must be mappings with the same keys; the targets' order is kept), iterables by
    position (same length). Every pair must have the same shape and the target must be floating point. Errors are
    ValueErrors that name the offending key or position, because a silent zip of mismatched LoRA lists would
    average unrelated weights.
    """
    for name, collection in ((target_name, targets), (source_name, sources)):
        if isinstance(collection, torch.Tensor):
            raise ValueError(f"{name} must be a collection of tensors, got a single Tensor (wrap it in a list)")
    targets_are_mapping, sources_are_mapping = isinstance(targets, Mapping), isinstance(sources, Mapping)
    if targets_are_mapping != sources_are_mapping:
        kinds = {True: "a mapping", False: "an iterable"}
        raise ValueError(
            f"{target_name} is {kinds[targets_are_mapping]} but {source_name} is {kinds[sources_are_mapping]}; "
            "pass two name→tensor mappings or two iterables"
        )
    if targets_are_mapping:
        missing = [key for key in targets if key not in sources]
        extra = [key for key in sources if key not in targets]
        if missing or extra:
            raise ValueError(
                f"{target_name} and {source_name} have different keys: missing from {source_name}: {missing[:10]}, "
                f"not in {target_name}: {extra[:10]}"
            )
        triples = [(repr(key), targets[key], sources[key]) for key in targets]
    else:
        target_list, source_list = list(targets), list(sources)
        if len(target_list) != len(source_list):
            raise ValueError(
                f"{target_name} has {len(target_list)} tensors but {source_name} has {len(source_list)}"
            )
        triples = [(f"[{index}]", t, s) for index, (t, s) in enumerate(zip(target_list, source_list))]

    for label, target, source in triples:
        for name, tensor in ((target_name, target), (source_name, source)):
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name}{label} is a {type(tensor).__name__}, not a torch.Tensor")
        if not target.dtype.is_floating_point:
            raise ValueError(f"{target_name}{label} must be floating point, got {target.dtype}")
        if target.shape != source.shape:
            raise ValueError(
                f"shape mismatch at {label}: {target_name} {tuple(target.shape)} vs {source_name} {tuple(source.shape)}"
            )
    return triples


def local_pair(target: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair as plain tensors for an in-place update. Two FSDP2 shards (DTensors on one mesh with the same
    placements) become their local shards, so the update runs shard by shard on every rank and nothing is gathered;
    plain tensors pass through. A DTensor paired with a plain tensor, or with another layout, is a ValueError rather
    than a silent redistribution (a gather of the whole weight)."""
    sharded = [hasattr(t, "to_local") for t in (target, source)]
    if not any(sharded):
        return target, source
    if all(sharded) and target.device_mesh == source.device_mesh and target.placements == source.placements:
        return target.to_local(), source.to_local()
    layouts = [f"DTensor{tuple(t.placements)}" if d else "a plain tensor" for t, d in zip((target, source), sharded)]
    raise ValueError(f"cannot update {layouts[0]} from {layouts[1]} shard by shard: both must be sharded alike (was "
                     "a model left gathered after a forward?)")


@torch.no_grad()
def lerp_pairs_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """`target ← target + weight·(source − target)` for every pair, in place, batched with foreach kernels.

    Sources are brought to each target's device. Low-precision (fp16/bf16) targets are blended in fp32 and
    rounded once on the way back, so a small step is not lost to bf16 rounding of the difference. FSDP2 shards are
    updated through their local shards (`local_pair`).
    """
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for target, source in (local_pair(t, s) for t, s in zip(targets, sources)):
        group = groups.setdefault((target.device, target.dtype), ([], []))
        group[0].append(target)
        group[1].append(source)
    for (device, dtype), (group_targets, group_sources) in groups.items():
        compute_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
        sources_c = [s.detach().to(device=device, dtype=compute_dtype) for s in group_sources]
        if compute_dtype == dtype:
            torch._foreach_lerp_(group_targets, sources_c, weight)
        else:
            upcast = [t.to(compute_dtype) for t in group_targets]
            torch._foreach_lerp_(upcast, sources_c, weight)
            torch._foreach_copy_(group_targets, upcast)


@torch.no_grad()
def soft_update_(old: TensorCollection, new: TensorCollection, eta: float) -> None:
    """`old ← η·old + (1 − η)·new`, in place on `old`, for two matching collections (see `pair_tensors`).

    η = 0 copies `new` exactly (hard on-policy copy); η = 1 leaves `old` untouched. Any float dtypes and devices
    may be mixed; see `lerp_pairs_` for how low precision is handled.
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    triples = pair_tensors(old, new)
    if eta == 1.0:
        return
    if eta == 0.0:
        for _, target, source in triples:
            local, other = local_pair(target, source)
            local.copy_(other)
        return
    lerp_pairs_([t for _, t, _ in triples], [s for _, _, s in triples], 1.0 - eta)


@dataclass
class OldPolicySchedule:
    """η(step) for the old-policy soft update; defaults are preset 1 (`η = min(0.001·step, 0.5)`), §1.5.

    The schedule holds only its configuration; the optimizer-step count is the trainer's, passed in each call.
    """

    flat: int = 0  # η = 0 while step < flat
    uprate: float = 0.001  # η grows by this per optimizer step after `flat`
    uphold: float = 0.5  # η never exceeds this

    PRESETS: ClassVar[dict[int, tuple[int, float, float]]] = {
        0: (0, 0.0, 0.0),  # η = 0 always: the old policy is a hard copy of θ after every epoch
        1: (0, 0.001, 0.5),  # the default in both reference repos
        2: (75, 0.0075, 0.999),  # DiffusionNFT OCR
    }

    def __post_init__(self) -> None:
        if isinstance(self.flat, bool) or not isinstance(self.flat, numbers.Integral) or self.flat < 0:
            raise ValueError(f"flat must be an int ≥ 0, got {self.flat!r}")
        self.flat = int(self.flat)
        if isinstance(self.uprate, bool) or not isinstance(self.uprate, (int, float)) or not (
            math.isfinite(self.uprate) and self.uprate >= 0
        ):
            raise ValueError(f"uprate must be a finite number ≥ 0, got {self.uprate!r}")
        if isinstance(self.uphold, bool) or not isinstance(self.uphold, (int, float)) or not 0 <= self.uphold <= 1:
            raise ValueError(f"uphold must be a number in [0, 1], got {self.uphold!r}")
        self.uprate, self.uphold = float(self.uprate), float(self.uphold)

    @classmethod
    def preset(cls, decay_type: int) -> OldPolicySchedule:
        """The reference `decay_type` presets: 0 (always on-policy), 1 (default ramp), 2 (delayed slow ramp)."""
        if decay_type not in cls.PRESETS:
            raise ValueError(f"unknown decay_type {decay_type!r}; valid presets are {sorted(cls.PRESETS)}")
        flat, uprate, uphold = cls.PRESETS[decay_type]
        return cls(flat=flat, uprate=uprate, uphold=uphold)

    def eta(self, step: int) -> float:
        """η after `step` optimizer steps."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int ≥ 0, got {step!r}")
        if step < self.flat:
            return 0.0
        return min(self.uprate * (int(step) - self.flat), self.uphold)

    def update(self, old: TensorCollection, new: TensorCollection, step: int) -> float:
        """Soft-update `old` towards `new` with η(step), in place; return the η used (worth logging)."""
        eta = self.eta(step)
        soft_update_(old, new, eta)
        return eta

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the configuration (validated); the step is not part of it."""
        missing = {"flat", "uprate", "uphold"} - set(state)
        if missing:
            raise ValueError(f"OldPolicySchedule state is missing {sorted(missing)}")
        restored = OldPolicySchedule(flat=state["flat"], uprate=state["uprate"], uphold=state["uphold"])
        self.flat, self.uprate, self.uphold = restored.flat, restored.uprate, restored.uphold
