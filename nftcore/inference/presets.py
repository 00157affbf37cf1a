"""Inference presets: the settings of each model's official pipeline defaults, every one overridable.

- `kontext` (FLUX.1-Kontext-dev, `FluxKontextPipeline`): 28 Euler steps, distilled guidance 3.5 (an input of the
  model, one forward per step), no true CFG, T5 at 512 tokens. The edit has ~1024² pixels in the source's aspect
  (`max_area`, sides multiples of 16: what the pipeline does with height/width = the source's); the source enters
  the VAE at the preferred Kontext resolution closest in aspect (`auto_resize`).
- `qwen-image-edit` / `qwen-image-edit-2509` (`QwenImageEditPipeline` / `...PlusPipeline`): 28 Euler steps, true
  CFG 4.0 with negative prompt " " and the pipelines' norm rescale, no guidance embedding; source and edit at
  ~1024² pixels in the source's aspect (`calculate_dimensions`, multiples of 32). The two differ only in the
  variant, which the pipeline folder's model_index.json names.

`preset_for(folder)` picks one from the folder; `resolve(name, **overrides)` applies the command line.

See docs/INFERENCE.md, "Presets".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRESETS", "Preset", "preset_for", "resolve"]


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "flux" (Kontext) or "qwen_image" (transformer config family)
    num_steps: int = 28
    guidance: float | None = None  # Kontext's distilled guidance embedding
    true_cfg_scale: float = 1.0  # 1.0: no negative branch
    negative_prompt: str | None = None
    max_area: int = 1024 * 1024  # pixels of the edit (and of the Qwen VAE source)
    auto_resize: bool = True  # Kontext: source at the preferred resolution closest in aspect
    max_sequence_length: int | None = None  # text tokens (Kontext T5 padding; Qwen truncation, None = none)
    solver: str = "euler"  # the pipelines' FlowMatchEulerDiscreteScheduler

    def settings(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    "kontext": Preset("kontext", "flux", guidance=3.5, max_sequence_length=512),
    "qwen-image-edit": Preset("qwen-image-edit", "qwen_image", true_cfg_scale=4.0, negative_prompt=" "),
    "qwen-image-edit-2509": Preset("qwen-image-edit-2509", "qwen_image", true_cfg_scale=4.0, negative_prompt=" "),
}


def preset_for(folder: str | Path) -> str:
    """The preset a pipeline folder's model_index.json (or transformer config) implies."""
    folder = Path(folder)
    index = folder / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    if "Kontext" in name or "Flux" in name:
        return "kontext"
    if name == "QwenImageEditPlusPipeline":
        return "qwen-image-edit-2509"
    if name.startswith("QwenImage"):
        return "qwen-image-edit"
    from nftcore.models.checkpoint_io import read_config

    return "kontext" if read_config(folder / "transformer").family == "flux" else "qwen-image-edit"


def resolve(name: str, **overrides) -> Preset:
    """Preset `name` with the non-None `overrides` applied (`guidance=0` removes Kontext's guidance)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - {f.name for f in dataclasses.fields(Preset)}
    if unknown:
        raise ValueError(f"unknown preset setting(s) {sorted(unknown)}")
    preset = dataclasses.replace(PRESETS[name], **changes)
    if preset.num_steps < 1:
        raise ValueError(f"steps must be >= 1, got {preset.num_steps}")
    if preset.max_area < 256:
        raise ValueError(f"max area must be at least 256 pixels (one 16x16 patch), got {preset.max_area}")
    if preset.true_cfg_scale != 1.0 and preset.negative_prompt is None:
        raise ValueError(f"true CFG scale {preset.true_cfg_scale:g} needs a negative prompt (the Qwen presets use "
                         "' ')")
    return preset
