"""The policy-family protocol: what the training loop needs from a model family.

Why a protocol instead of importing a model: the loop (rollouts, NFT update, checkpoints) is the same for FLUX.1-
Kontext, Qwen-Image-Edit and the embedded demo; what differs is how a batch of dataset rows becomes conditioning,
which sigma grid the sampler walks, how latents become images, and where the datasets come from. A family
provides exactly that:

    family.transformer                      the nn.Module that gets LoRA adapters, FSDP2 and the optimizer
    family.train_dataset / eval_dataset     indexable, with `sample_ids` and `epoch_prompts(G, epoch, seed, banned)`
    family.conditioning(samples)            once per rollout batch, under no_grad; kept for training (through
                                            `conditioning_cache`: only rows not cached yet are encoded)
    family.conditioning_identity()          optional: what the conditioning depends on besides the row (the cache
                                            key: model, dtype, resolution, ...)
    family.index_conditioning(cond, idx)    rows `idx` of a conditioning (micro-batches mix rollout batches)
    family.cat_conditioning(conds)          concatenate along the batch
    family.velocity_fn(cond, transformer)   `fn(x [B, N, C], sigma float | [B]) -> v` through `transformer` (default:
                                            family.transformer, with whatever LoRA adapter is active)
    family.sigmas(num_steps)                the sampler's grid (float64, 1 → 0); training noises at its first N
    family.latent_shape                     (N, C) of one packed latent
    family.decode(latents)                  [B, 3, H, W] images in [0, 1] for the reward
    family.source_images(samples)           [B, 3, H, W] in [0, 1], what the judge compares against
    family.reward_metadata(sample)          the per-sample dict passed to the reward
    family.default_reward()                 the in-process reward of the family ('demo' backend), or None
    family.target_images(samples)           ground truth for the before/after grid, or None

The families: `nftcore.demo.family.DemoFamily` (model.family = 'demo') and `nftcore.trainer.edit_family.EditFamily`
('flux', 'qwen_image'); `nftcore.trainer.family.build_family` picks one from the config.

See docs/DESIGN.md §1 (layer 3) and, for what the real families compute, docs/ALGORITHM.md §6.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from nftcore.reward.base import RewardResult

MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""`model.dtype` (and `reward.dtype`) names: the dtype a family loads its frozen weights in."""


class PolicyFamily(Protocol):
    """See the module docstring."""

    transformer: nn.Module
    train_dataset: Any
    eval_dataset: Any

    @property
    def latent_shape(self) -> tuple[int, int]: ...

    def conditioning(self, samples: Sequence[Any]) -> Any: ...

    def index_conditioning(self, cond: Any, index: torch.Tensor) -> Any: ...

    def cat_conditioning(self, conds: Sequence[Any]) -> Any: ...

    def velocity_fn(self, cond: Any, transformer: nn.Module | None = None
                    ) -> Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor]: ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def source_images(self, samples: Sequence[Any]) -> torch.Tensor: ...

    def reward_metadata(self, sample: Any) -> dict[str, Any]: ...

    def default_reward(self) -> Callable[..., RewardResult] | None: ...

    def target_images(self, samples: Sequence[Any]) -> torch.Tensor | None: ...
