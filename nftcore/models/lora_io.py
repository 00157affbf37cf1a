"""LoRA adapters on disk, in the two layouts the ecosystem reads, via safetensors directly (no peft at run time).

- PEFT (`save_pretrained` layout; the released Edit-R1 checkpoints): a folder with `adapter_model.safetensors`, keys
  `base_model.model.<diffusers module>.lora_A.weight` / `.lora_B.weight`, and `adapter_config.json` (r, lora_alpha,
  target_modules, ...). Edit-R1 checkpoints hold "default" in `lora/` and "old" in `lora/old/`.
- diffusers (`save_lora_weights` layout; what `pipe.load_lora_weights` reads): `pytorch_lora_weights.safetensors`,
  keys `transformer.<diffusers module>.lora_A.weight`, and the LoRA config as JSON under the safetensors header key
  `lora_adapter_metadata` (keys `transformer.r`, `transformer.lora_alpha`, ...). Without that metadata diffusers
  assumes alpha = r, i.e. scale 1, which would silently halve Edit-R1's α = 2r update; so it is always written.

Fused layers are un-fused on the way out and re-fused on the way in: the keys are the diffusers module names that
`adapter_state` already uses, so nothing here knows about the model's own layout.

See docs/ALGORITHM.md §11.14; when the EMA is exported: §5.5.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lora import adapter_state, lora_config, lora_layers

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PEFT_PREFIX = "base_model.model."
DIFFUSERS_PREFIX = "transformer."
_MAX_LISTED = 50  # keys listed per problem kind in an error message (the count is always given)


def peft_config_dict(model: torch.nn.Module, name: str, *, base_model_name_or_path: str | None = None) -> dict:
    """A PEFT `LoraConfig` dict for adapter `name`: target_modules are the full diffusers module paths, so PEFT
    matches exactly those modules; gaussian init, no dropout, no bias, plain (not rs-) LoRA scaling."""
    rank, alpha = lora_config(model, name)
    modules = sorted({seg.name for layer in lora_layers(model).values() for seg in layer.segments})
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": "gaussian",
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _export_tensors(model: torch.nn.Module, name: str, prefix: str, dtype: torch.dtype | None) -> dict:
    """CPU copies of the adapter under `prefix` (a sharded DTensor is gathered first)."""
    out = {}
    for key, tensor in adapter_state(model, name).items():
        t = tensor.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[prefix + key] = t.to(device="cpu", dtype=dtype or t.dtype).contiguous()
    return out


def save_peft_adapter(model: torch.nn.Module, name: str, directory: str | Path, *, dtype: torch.dtype | None = None,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a PEFT adapter folder (loadable by `PeftModel.from_pretrained` on a diffusers
    transformer, and by `load_adapter`). Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_export_tensors(model, name, PEFT_PREFIX, dtype), directory / PEFT_WEIGHTS, metadata={"format": "pt"})
    config = peft_config_dict(model, name, base_model_name_or_path=base_model_name_or_path)
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def save_diffusers_lora(model: torch.nn.Module, name: str, directory: str | Path, *,
                        dtype: torch.dtype | None = None) -> Path:
    """Write adapter `name` in diffusers' `save_lora_weights` layout (`pipe.load_lora_weights(directory)` for
    FluxKontextPipeline / QwenImageEditPlusPipeline). Returns the weights file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = peft_config_dict(model, name)
    metadata = {"format": "pt",
                DIFFUSERS_METADATA_KEY: json.dumps({DIFFUSERS_PREFIX + k: v for k, v in config.items()},
                                                   indent=2, sort_keys=True)}
    path = directory / DIFFUSERS_WEIGHTS
    save_file(_export_tensors(model, name, DIFFUSERS_PREFIX, dtype), path, metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------------------ loading


def _resolve_file(path: Path) -> Path:
    if path.is_file():
        return path
    for candidate in (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS):
        if (path / candidate).is_file():
            return path / candidate
    raise FileNotFoundError(f"no {PEFT_WEIGHTS} or {DIFFUSERS_WEIGHTS} in {path}")


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(tensors with the layout prefix removed, LoRA config or None) from a PEFT folder, a diffusers folder or a
    .safetensors file. The config comes from `adapter_config.json` next to the file or from diffusers' header
    metadata."""
    file = _resolve_file(Path(path))
    with safe_open(str(file), framework="pt") as f:
        raw = {key: f.get_tensor(key) for key in f.keys()}
        header = f.metadata() or {}
    config = None
    if (file.parent / PEFT_CONFIG).is_file():
        config = json.loads((file.parent / PEFT_CONFIG).read_text())
    elif DIFFUSERS_METADATA_KEY in header:
        packed = json.loads(header[DIFFUSERS_METADATA_KEY])
        config = {k[len(DIFFUSERS_PREFIX):]: v for k, v in packed.items() if k.startswith(DIFFUSERS_PREFIX)}
    prefixes = [p for p in (PEFT_PREFIX, DIFFUSERS_PREFIX) if raw and all(k.startswith(p) for k in raw)]
    prefix = prefixes[0] if prefixes else ""
    return {key[len(prefix):]: value for key, value in raw.items()}, config


def _file_scale(config: dict[str, Any], file: str) -> float:
    unsupported = [k for k in ("use_dora", "lora_bias") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA":
        unsupported.append(f"peft_type={config['peft_type']}")
    if unsupported:
        raise ValueError(f"{file}: LoRA config uses {unsupported}, which nftcore's LoRA does not support")
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


@torch.no_grad()
def load_adapter(model: torch.nn.Module, name: str, path: str | Path, *, alpha: float | None = None,
                 rescale: bool = False) -> None:
    """Load a PEFT- or diffusers-layout LoRA into the existing adapter `name` (created by `apply_lora`).

    Every adapter tensor must be in the file with its shape, and the file may hold nothing else; otherwise a
    ValueError lists the missing keys, the unexpected keys and the shape mismatches. The file's LoRA scale (alpha/r
    from its config; `alpha` overrides/supplies it when the file has none) must equal the adapter's; with
    `rescale=True` B is rescaled instead so the loaded update is the file's exact update.
    """
    file = str(_resolve_file(Path(path)))
    tensors, config = read_adapter_file(path)
    target = adapter_state(model, name)
    missing = [k for k in target if k not in tensors]
    unexpected = [k for k in tensors if k not in target]
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs adapter {tuple(target[k].shape)}"
              for k in target if k in tensors and tensors[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        parts = [_listing(t, items) for t, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                                     ("shape mismatches", shapes)) if items]
        raise ValueError(f"cannot load {file} into adapter {name!r}:\n" + "\n".join(parts))

    rank, our_alpha = lora_config(model, name)
    if alpha is not None:
        file_scale = alpha / rank
    elif config is not None:
        file_scale = _file_scale(config, file)
    else:
        raise ValueError(f"{file} has no LoRA config ({PEFT_CONFIG} or diffusers '{DIFFUSERS_METADATA_KEY}' "
                         "metadata), so its scale is unknown; pass alpha= (the checkpoint's lora_alpha)")
    our_scale = our_alpha / rank
    factor = 1.0
    if not math.isclose(file_scale, our_scale, rel_tol=1e-6):
        if not rescale:
            raise ValueError(f"{file}: LoRA scale {file_scale:g} (alpha/r) differs from adapter {name!r}'s "
                             f"{our_scale:g} (alpha={our_alpha:g}, r={rank}); apply_lora with the checkpoint's "
                             "alpha, or pass rescale=True to fold the difference into B")
        factor = file_scale / our_scale
    for key, param in target.items():
        value = tensors[key].to(device=param.device, dtype=torch.float32)
        if factor != 1.0 and key.endswith(".lora_B.weight"):
            value = value * factor
        param.copy_(value)
