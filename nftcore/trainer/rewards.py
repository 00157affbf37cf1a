"""The run's reward as one callable, from `reward.backend`: the family's own ('demo'), the MLLM judge in process
('local', optionally FSDP2-sharded over the ranks) or the HTTP judge server ('server').

See docs/ALGORITHM.md §3.1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nftcore.config import TrainConfig
from nftcore.family import MODEL_DTYPES, PolicyFamily
from nftcore.reward.base import RewardResult
from nftcore.trainer.distributed import DistEnv


def judge_is_sharded(cfg: TrainConfig, env: DistEnv) -> bool:
    """Whether the in-process judge is FSDP2-sharded (`parallel.shard_reward_model` with more than one rank)."""
    return cfg.parallel.shard_reward_model and env.world_size > 1


def build_reward(cfg: TrainConfig, family: PolicyFamily, env: DistEnv | None = None) -> Callable[..., RewardResult]:
    """The reward callable of `cfg.reward.backend`: the family's own ('demo'), the MLLM in process ('local') or the
    HTTP judge ('server', `reward.server_url` or $REWARD_SERVER). `env` (a `DistEnv`, default one process) says
    whether `parallel.shard_reward_model` has ranks to shard the local judge over."""
    backend = cfg.reward.backend
    if backend == "demo":
        reward = family.default_reward()
        if reward is None:
            raise ValueError(f"reward.backend='demo' but the {cfg.model.family} family has no built-in reward")
        return reward
    if backend == "server":
        import os

        from nftcore.reward import HTTPReward

        url = cfg.reward.server_url or os.environ.get("REWARD_SERVER", "")
        if not url:
            raise ValueError("reward.backend='server' needs reward.server_url or REWARD_SERVER=host:port")
        url = url if "://" in url else f"http://{url}"
        return HTTPReward(url, timeout=cfg.reward.timeout_s, retries=cfg.reward.max_retries)
    from nftcore.reward import MLLMReward, MLLMScorer

    # The rank's own device (the policy's), not "cuda" = cuda:0, where every rank's judge would pile up.
    device = getattr(getattr(family, "transformer", None), "device", None)
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    r = cfg.reward
    dtype = MODEL_DTYPES.get(r.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = env or DistEnv()
    shard = judge_is_sharded(cfg, env)
    # Sharded: rank 0 loads the weights on the CPU, the other ranks only the shapes; shard_judge fills every rank's
    # shards from rank 0 and moves them to the device one group at a time.
    load_on = device if not shard else "cpu" if env.is_main else "meta"
    scorer = MLLMScorer.from_pretrained(r.model, dtype=dtype, device=load_on, min_pixels=r.min_pixels or None,
                                        max_pixels=r.max_pixels or None)
    if shard:
        from nftcore.trainer.inference_sharding import shard_judge

        layers = shard_judge(scorer, device, from_rank0=True)
        if env.is_main:
            print(f"# reward model: FSDP2-sharded over {env.world_size} ranks ({layers} layer groups); scoring runs "
                  "in step on the main thread", flush=True)
    return MLLMReward(scorer)
