"""A trained LoRA into a loaded transformer, for inference: checked against the model, then (optionally) merged.

Reads any layout `nftcore.models.lora_io` reads (nftcore's own PEFT and diffusers exports, a PEFT folder). The file
decides which modules get an adapter (any subset of the attention and MLP projections), its rank and its alpha; the
adapter is then loaded with `load_adapter` (strict) and, unless the base model is still needed, merged into the
weights so sampling costs nothing extra. A file that does not fit the model fails before the model is touched,
naming the first key that does not fit.

See docs/INFERENCE.md, "Presets" (its last paragraph); the layouts: §11.14.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["LoRAMismatchError", "apply_lora_file"]

ADAPTER = "default"
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LoRAMismatchError(ValueError):
    """A LoRA file whose keys or shapes do not fit the model."""


def _module_of(key: str) -> tuple[str, str] | None:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:7]
    return None


def _plan(model: nn.Module, tensors: dict[str, torch.Tensor], file: str):
    """(targets for `apply_lora`, rank); raises LoRAMismatchError at the first key that does not fit."""
    from nftcore.models.lora import default_targets

    available = {}  # diffusers module name -> (Linear path, row slice, in_features)
    modules = dict(model.named_modules())
    for path, segments in default_targets(model, include_mlp=True).items():
        for name, rows in segments:
            available[name] = (path, rows, modules[path].in_features)
    wanted: dict[str, dict[str, torch.Size]] = {}
    for key, value in tensors.items():
        parsed = _module_of(key)
        if parsed is None:
            raise LoRAMismatchError(f"{file}: key {key!r} is not a LoRA weight (expected '<module>.lora_A.weight' "
                                    "or '.lora_B.weight')")
        name, kind = parsed
        if name not in available:
            raise LoRAMismatchError(f"{file}: key {key!r} names no adaptable module of this transformer (is the "
                                    "LoRA for another model family?)")
        wanted.setdefault(name, {})[kind] = value.shape
    ranks = set()
    for name, shapes in wanted.items():
        path, rows, in_features = available[name]
        out_features = rows.stop - rows.start
        if set(shapes) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(shapes)).pop()
            raise LoRAMismatchError(f"{file}: key {name}.{missing}.weight is missing (its pair is present)")
        rank = shapes["lora_A"][0]
        ranks.add(rank)
        if tuple(shapes["lora_A"]) != (rank, in_features):
            raise LoRAMismatchError(f"{file}: key {name}.lora_A.weight has shape {tuple(shapes['lora_A'])}, the "
                                    f"model needs ({rank}, {in_features})")
        if tuple(shapes["lora_B"]) != (out_features, rank):
            raise LoRAMismatchError(f"{file}: key {name}.lora_B.weight has shape {tuple(shapes['lora_B'])}, the "
                                    f"model needs ({out_features}, {rank})")
    if not wanted:
        raise LoRAMismatchError(f"{file}: no LoRA weights in the file")
    if len(ranks) != 1:
        raise LoRAMismatchError(f"{file}: mixed LoRA ranks {sorted(ranks)} are not supported")
    targets: dict[str, list[tuple[str, slice]]] = {}
    for name in wanted:
        path, rows, _ = available[name]
        targets.setdefault(path, []).append((name, rows))
    return targets, ranks.pop()


@torch.no_grad()
def apply_lora_file(model: nn.Module, path: str | Path, *, alpha: float | None = None, merge: bool = True) -> dict:
    """Load the LoRA at `path` into `model` (an `MMDiT` without adapters) and merge it unless `merge=False` (then
    it is the active adapter, and `adapters_disabled(model)` gives the base model). Returns {rank, alpha, modules}.

    `alpha` supplies the LoRA alpha for a file without a config (scale = alpha / rank)."""
    from nftcore.models.lora import apply_lora, merge_adapter
    from nftcore.models.lora_io import _file_scale, _resolve_file, load_adapter, read_adapter_file

    file = str(_resolve_file(Path(path)))
    tensors, config = read_adapter_file(path)
    targets, rank = _plan(model, tensors, file)
    if alpha is None:
        if config is None:
            raise LoRAMismatchError(f"{file} has no LoRA config (adapter_config.json or diffusers metadata), so its "
                                    "scale is unknown; pass --lora-alpha")
        alpha = _file_scale(config, file) * rank  # rsLoRA folds into an equivalent plain alpha
    apply_lora(model, targets=targets, rank=rank, alpha=float(alpha), adapter_names=(ADAPTER,), trainable=None,
               init="zeros")
    load_adapter(model, ADAPTER, path, alpha=float(alpha))
    if merge:
        merge_adapter(model, ADAPTER)
    return {"rank": rank, "alpha": float(alpha), "modules": sum(len(s) for s in targets.values())}
