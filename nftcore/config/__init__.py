"""Trainer configuration: typed sections, named recipes, TOML files and `--section.key=value` overrides.

    from nftcore.config import load_config, batch_plan, config_to_toml
    cfg = load_config(["--config", "qwen_image_edit_r1", "--run.out", "runs/q1"])   # a validated TrainConfig
    plan = batch_plan(cfg, world_size)          # per-rank batches, accumulation, T_train; error if it cannot split
    print(config_to_toml(cfg))                  # readable, and `--config` reads it back to an equal config

Modules: `sections` (the dataclasses, their help texts and `validate`), `recipes` (demo, kontext_edit_r1,
qwen_image_edit_r1), `cli` (argv: --config, --resume, --help, and the overrides, parsed by tyro), `serialize`
(dict/JSON and TOML, both directions), `batching` (the epoch's batch arithmetic). Importing this package does not
import torch.
"""

from nftcore.config.batching import batch_plan
from nftcore.config.cli import format_help, load_config
from nftcore.config.errors import ConfigError
from nftcore.config.recipes import RECIPES, build_recipe, demo, kontext_edit_r1, qwen_image_edit_r1
from nftcore.config.sections import SECTIONS, TrainConfig
from nftcore.config.serialize import config_from_dict, config_to_dict, config_to_toml, load_toml

__all__ = ["RECIPES", "SECTIONS", "ConfigError", "TrainConfig", "batch_plan", "build_recipe", "config_from_dict",
           "config_to_dict", "config_to_toml", "demo", "format_help", "kontext_edit_r1", "load_config", "load_toml",
           "qwen_image_edit_r1"]
