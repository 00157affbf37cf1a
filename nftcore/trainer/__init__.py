"""The trainer: composes config, data, rollouts, rewards, NFT updates, FSDP2, checkpoints and metrics.

    from nftcore.config import load_config
    from nftcore.trainer import Trainer
    Trainer(load_config(["--config", "demo", "--run.out", "runs/d"])).train()

Modules, in the order an epoch uses them:

- `loop`: `Trainer`; `run_epoch` is the algorithm, one phase per line;
- `rollout`: the rollout phase (`RolloutWorker` → `Rollouts`: data prefetch, reward overlap, image logging);
- `advantages`: gathered rewards → r, the low-variance filter, the ban, reward statistics (`AdvantageStats`);
- `step_terms`: one optimizer step's logged terms (`StepTerms`) and how they add up;
- `roles`: the names of θ, θ_old and the reference (`Role`) and of the evaluated weights (`EvalWeights`);
- `weights`: LoRA adapters or full model copies as θ / θ_old / reference; `seeding`: per-sample random draws;
- `family`: `build_family` (the protocol is `nftcore.family`, the demo's family `nftcore.demo.family`);
  `edit_family`: FLUX.1-Kontext and Qwen-Image-Edit; `rewards`: the reward callable of `reward.backend`;
- `distributed` (process group, FSDP2, collectives), `checkpoint` (DCP state and LoRA export), `metrics`
  (metrics.jsonl, console lines, progress), `perf` (FLOPs, MFU, peak memory), `trackers` (TensorBoard / wandb).

One epoch's data path through these modules: docs/DESIGN.md §2.
"""

from nftcore.family import PolicyFamily
from nftcore.trainer.distributed import DistEnv, init_distributed, shutdown
from nftcore.trainer.errors import NonFiniteLossError
from nftcore.trainer.family import build_family
from nftcore.trainer.loop import EvalResult, Trainer
from nftcore.trainer.metrics import REQUIRED_KEYS, MetricsLogger, read_metrics
from nftcore.trainer.rewards import build_reward
from nftcore.trainer.roles import EvalWeights, Role

__all__ = ["REQUIRED_KEYS", "DistEnv", "EvalResult", "EvalWeights", "MetricsLogger", "NonFiniteLossError",
           "PolicyFamily", "Role", "Trainer", "build_family", "build_reward", "init_distributed", "read_metrics",
           "shutdown"]
