"""Trainer configuration: typed sections (`sections`), named recipes (`recipes`), argv (`cli`, parsed by tyro), TOML
and dicts (`serialize`) and the epoch's batch arithmetic (`batching`). Importing it does not import torch.

    cfg = load_config(["--config", "qwen_image_edit_r1", "--run.out", "runs/q1"])   # a validated TrainConfig
    plan = batch_plan(cfg, world_size)   # per-rank batches, accumulation, T_train; error if it cannot split
    print(config_to_toml(cfg))           # `--config` reads it back to an equal config
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
