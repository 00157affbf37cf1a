"""Tiny Edit-R1 data folders and the command lines of tiny runs on the real families (the tiny random pipelines of
nftcore.testing.tiny_pipelines): training (tests/test_trainer_edit_families.py, test_conditioning_cache.py,
test_full_finetune.py) and `python -m nftcore.edit` (tests/test_edit_cli.py, test_edit_cli_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nftcore.testing.tiny_judge import random_image

PROMPTS = ["make the sky blue", "add a hat to the dog", "remove the cat from the sofa and keep everything else"]
TINY = ["--max-area", "4096", "--steps", "2", "--no-progress"]  # nftcore.edit: 64x64 edits, 2 Euler steps


def write_dataset(root, prompts):
    """The Edit-R1 layout: images/ (non-square, so the centre crop runs), train and test metadata."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(prompts):
        random_image(rng, 48 + 8 * i, 40).save(root / "images" / f"{i}.png")
        rows.append({"prompt": prompt, "image": f"images/{i}.png", "requirement": f"requirement {i}"})
    (root / "train_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "test_metadata.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return root


def edit_args(tmp_path, folder, family, prompts=PROMPTS[:2], **overrides) -> list[str]:
    """One tiny epoch (K = G = 2, 32 px, 2 steps, LoRA r2) of `family` on the pipeline `folder`, its data written
    under `tmp_path`; `overrides` (dotted keys) on top."""
    options = {
        "run.out": tmp_path / "out", "run.epochs": 1, "run.seed": 3, "model.family": family, "model.path": folder,
        "model.dtype": "fp32", "data.path": write_dataset(tmp_path / "data", prompts), "sampling.resolution": 32,
        "sampling.group_size": 2, "sampling.groups_per_epoch": 2, "sampling.batch_size": 2, "sampling.num_steps": 2,
        "optim.steps_per_epoch": 1, "lora.rank": 2, "lora.alpha": 4.0, "filter.rule": "none", "eval.every": 0,
        "metrics.progress": False, "reward.max_retries": 0, "reward.timeout_s": 60.0,
    }
    if family == "flux":
        options["sampling.guidance_scale"] = 2.5
    options.update(overrides)
    return [f"--{k}={v}" for k, v in options.items()]


def write_split(root: Path, n: int = 3) -> Path:
    """An Edit-R1 split of `n` non-square sources; returns the metadata file."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        random_image(rng, 48 + 16 * (i % 2), 48).save(root / "images" / f"{i}.png")
        rows.append({"prompt": f"make the sky blue {i}", "image": f"images/{i}.png", "requirement": f"req {i}"})
    path = root / "test_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
