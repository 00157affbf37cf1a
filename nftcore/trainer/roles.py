"""The names of the policy's weights: which θ a velocity, a state or an evaluation means.

String enums, so a role is the string it always was: the LoRA layer (`nftcore.models.lora`) is given `.value`, and
stored names (checkpoint keys, exported adapters) are unchanged. Plain strings are accepted wherever a role is
(`Role("old")`), so callers outside the trainer (the demo showcase, benchmarks) need not import this.

The notation θ, θ_old, the reference: docs/ALGORITHM.md §0.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """One of the three policies of the NFT update."""

    THETA = "default"
    """θ, the trained policy: PEFT's adapter name "default" (full fine-tuning: the model itself)."""
    OLD = "old"
    """θ_old, which samples the rollouts and anchors the loss; soft-updated towards θ after each epoch."""
    REF = "ref"
    """The frozen reference: the base weights (LoRA: adapters disabled), for the KL term and the base evaluation."""


class EvalWeights(StrEnum):
    """Which weights an evaluation samples with."""

    EMA = "ema"
    """The EMA of θ, swapped into θ's place for the evaluation."""
    LIVE = "live"
    """θ as it is."""
    BASE = "base"
    """The reference (the model before training)."""
