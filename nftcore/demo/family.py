"""The embedded demo as a policy family (`nftcore.family.PolicyFamily`, model.family = 'demo'), and its reward.

`DemoFamily` wraps `DemoPolicy` (a tiny FLUX-shaped MMDiT in pixel-patch space) and the procedural editing world;
`DemoReward` is the exact verifier as a reward callable. Nothing here imports the trainer: the trainer imports this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nftcore.family import MODEL_DTYPES, cat_conditioning, index_conditioning
from nftcore.reward.base import RewardResult

if TYPE_CHECKING:
    from nftcore.config import TrainConfig

DEMO_TRAIN_TASKS = 256  # enough distinct (scene, instruction) pairs that G = 8 groups per epoch rarely repeat
DEMO_EVAL_TASKS = 64  # eval rewards spread ≈ 0.25 per task: 16 tasks left ±0.06 of sampling noise on the mean
DEMO_DATA_SEED = 0  # the task set is part of the demo, not of the run: changing --run.seed must not change it
DEMO_EVAL_SEED = 1


class DemoReward:
    """The demo's programmatic judge as a reward callable: `nftcore.demo.verify` against the exact target.

    The ground-truth task travels in the metadata (`"task"`), so the judge stays a plain reward function of
    (edited, sources, prompts, metadata) like the MLLM and HTTP ones.
    """

    def __call__(self, edited, sources, prompts, metadata: Sequence[Mapping[str, Any]]) -> RewardResult:
        from nftcore.demo import verify

        scores = verify(torch.as_tensor(edited).float().cpu(), [m["task"] for m in metadata])
        return RewardResult.from_scores(scores)


class DemoFamily:
    """The embedded demo: `nftcore.demo.model.DemoPolicy` (a tiny FLUX-shaped MMDiT in pixel-patch space) on the
    procedural editing world, judged by the exact verifier.

    `model.path`: empty loads the shipped base checkpoint; "random" (or "random:SEED") builds a randomly initialised
    policy (independent of the shipped asset); "tiny[:SEED]" is a random policy with one double and one single block
    of width 32, which is what the tests use; anything else is a checkpoint file.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from nftcore.demo import DemoDataset
        from nftcore.demo.model import DemoPolicy, default_transformer_config

        path = cfg.model.path
        kind, _, seed = path.partition(":")
        if kind in ("random", "tiny"):
            transformer = None
            if kind == "tiny":
                transformer = default_transformer_config(double=1, single=1, head_dim=16)
            # PyTorch's default init rather than `fresh`'s adaLN-zero: a zero output layer would give LoRA no gradient.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed or 0))
                self.policy = DemoPolicy(None, transformer)
        else:
            self.policy = DemoPolicy.from_pretrained(path or None)
        self.policy.to(device).requires_grad_(False)
        # model.dtype: the frozen base transformer's storage; the tiny text encoder stays fp32 (it runs once per sample)
        self.policy.transformer.to(MODEL_DTYPES[cfg.model.dtype])
        self.device = device
        size = self.policy.demo.image_size
        if cfg.sampling.resolution != size:
            import warnings

            warnings.warn(f"sampling.resolution = {cfg.sampling.resolution}, but this demo policy works at {size} px; "
                          f"using {size} (set --sampling.resolution={size} to silence this)", stacklevel=2)
        self.train_dataset = DemoDataset(DEMO_TRAIN_TASKS, seed=DEMO_DATA_SEED, size=size)
        self.eval_dataset = DemoDataset(DEMO_EVAL_TASKS, seed=DEMO_EVAL_SEED, size=size)
        self.identity = _demo_identity(cfg, size)

    def conditioning_identity(self) -> dict[str, Any]:
        """What the conditioning depends on besides the row (the conditioning cache's key and check): the policy's
        text encoder (its checkpoint, or the random seed) and the dtype the source tokens are cast to."""
        return dict(self.identity)

    @property
    def transformer(self) -> nn.Module:
        return self.policy.transformer

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.policy.latent_shape

    def conditioning(self, samples):
        with torch.no_grad():
            return self.policy.conditioning(self.source_images(samples), [s.prompt for s in samples])

    def index_conditioning(self, cond, index: torch.Tensor):
        return index_conditioning(cond, index)

    def cat_conditioning(self, conds):
        return cat_conditioning(conds)

    def velocity_fn(self, cond, transformer: nn.Module | None = None):
        from nftcore.models import edit_velocity_fn

        return edit_velocity_fn(transformer if transformer is not None else self.policy.transformer, cond)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return self.policy.sigmas(num_steps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.policy.decode(latents)

    def source_images(self, samples) -> torch.Tensor:
        return torch.stack([s.image for s in samples]).to(self.device)

    def target_images(self, samples) -> torch.Tensor:
        return torch.stack([s.task.target_image for s in samples])

    def reward_metadata(self, sample) -> dict[str, Any]:
        return {**sample.metadata, "requirement": sample.requirement, "sample_id": sample.sample_id,
                "task": sample.task}

    def default_reward(self):
        return DemoReward()


def _demo_identity(cfg: TrainConfig, size: int) -> dict[str, Any]:
    import hashlib
    from pathlib import Path

    from nftcore.demo.model import ASSET

    kind, _, seed = cfg.model.path.partition(":")
    if kind in ("random", "tiny"):
        model = f"{kind}:{int(seed or 0)}"
    else:  # a checkpoint: its bytes (a few MB) name the trained text encoder
        path = Path(cfg.model.path or ASSET).resolve()
        model = f"{path}#{hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()}"
    return {"family": "demo", "model": model, "dtype": cfg.model.dtype, "resolution": size}
