"""Inference and evaluation of the editing models (`python -m nftcore.edit`).

- `presets`: the official pipelines' settings (steps, guidance, true CFG, resolution rules) per model.
- `lora`: a trained LoRA into a loaded transformer, checked against it, merged for speed.
- `editor`: `Editor`, one loaded model turning (sources, instructions, per-item seeds) into edits.
- `run`: prompt lists over batches and torchrun ranks, resume, the manifest and the summary.
- `report`: score tables, the paired base-vs-trained t interval, the comparison grid.

See docs/INFERENCE.md.
"""

from nftcore.inference.editor import Editor, item_seed
from nftcore.inference.lora import LoRAMismatchError, apply_lora_file
from nftcore.inference.presets import PRESETS, Preset, preset_for, resolve

__all__ = ["PRESETS", "Editor", "LoRAMismatchError", "Preset", "apply_lora_file", "item_seed", "preset_for",
           "resolve"]
