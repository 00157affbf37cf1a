"""The trainer: composes config, data, rollouts, rewards, NFT updates, FSDP2, checkpoints and metrics.

    from nftcore.config import load_config
    from nftcore.trainer import Trainer
    Trainer(load_config(["--config", "demo", "--run.out", "runs/d"])).train()

Modules: `loop` (the epoch: rollouts → rewards → advantages/filter → update → old policy), `family` (what a model
family provides, and the demo family), `distributed` (process group, FSDP2, collectives), `checkpoint` (DCP state
and LoRA export), `metrics` (metrics.jsonl, console lines, progress, the demo's plots), `perf` (FLOPs, MFU, peak
memory), `trackers` (optional TensorBoard / wandb).
"""

from nftcore.trainer.distributed import DistEnv, init_distributed, shutdown
from nftcore.trainer.family import DemoFamily, PolicyFamily, build_family, build_reward
from nftcore.trainer.loop import NonFiniteLossError, Trainer
from nftcore.trainer.metrics import REQUIRED_KEYS, MetricsLogger, read_metrics

__all__ = ["REQUIRED_KEYS", "DemoFamily", "DistEnv", "MetricsLogger", "NonFiniteLossError", "PolicyFamily", "Trainer",
           "build_family", "build_reward", "init_distributed", "read_metrics", "shutdown"]
