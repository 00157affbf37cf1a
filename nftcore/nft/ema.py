"""Exponential moving average of the trained weights, for evaluation and checkpoints.

This is *not* the sampling policy (that is the old policy, `old_policy.py`): it is a smoothed copy of θ, updated
once per optimizer step and swapped into the live weights only while evaluating or saving. Its decay warms up so
the first updates follow θ closely instead of anchoring to the initial weights:

    decay_eff(s) = min((1 + s) / (10 + s), decay)        ema ← decay_eff·ema + (1 − decay_eff)·θ

With the default decay 0.9 the warm-up reaches the cap at s = 80.

Counting s: by default the k-th call to `step()` (k = 0, 1, …) uses s = k, so the first update uses 0.1. The
reference training loop increments its optimizer-step counter *before* updating the EMA, so its first update uses
s = 1 (2/11); pass `first_step=1` to reproduce that exactly.

See docs/ALGORITHM.md §1.6 and §11.17.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from nftcore.nft.old_policy import TensorCollection, lerp_pairs_, local_pair, pair_tensors


def _check_decay(decay: float) -> float:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    return float(decay)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int ≥ 0, got {value!r}")
    return int(value)


class EMA:
    """EMA shadows of a tensor collection (an iterable of tensors, or a name→tensor mapping).

    Shadows are kept in fp32 (fp64 tensors stay fp64) whatever the live dtype, because bf16 cannot represent the
    small per-step moves an average makes. FSDP2-sharded weights get sharded shadows, updated and swapped shard by
    shard (`local_pair`): nothing is gathered. They live on `device` if given (e.g. "cpu" to save accelerator memory),
    else next to each tensor. Every later call must pass a collection of the same kind and structure as the one
    given here; mismatches are ValueErrors naming the entry (see `pair_tensors`).

        ema = EMA(lora_params)                      # decay 0.9, warm-up from s = 0
        ...; optimizer.step(); ema.step(lora_params)
        with ema.swapped(lora_params):              # evaluate / save with the averaged weights
            evaluate(model)
    """

    def __init__(
        self,
        params: TensorCollection,
        decay: float = 0.9,
        *,
        first_step: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        self.decay = _check_decay(decay)
        self.first_step = _check_count("first_step", first_step)
        self.num_updates = 0
        if isinstance(params, torch.Tensor):
            raise ValueError("params must be a collection of tensors, got a single Tensor (wrap it in a list)")
        if isinstance(params, Mapping):
            self._shadow: dict[str, torch.Tensor] | list[torch.Tensor] = {
                name: self._make_shadow(f"params[{name!r}]", tensor, device) for name, tensor in params.items()
            }
        else:
            self._shadow = [
                self._make_shadow(f"params[{index}]", tensor, device) for index, tensor in enumerate(params)
            ]

    @staticmethod
    def _make_shadow(label: str, tensor: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{label} is a {type(tensor).__name__}, not a torch.Tensor")
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{label} must be floating point, got {tensor.dtype}")
        dtype = torch.promote_types(tensor.dtype, torch.float32)
        return tensor.detach().to(device=tensor.device if device is None else device, dtype=dtype, copy=True)

    @staticmethod
    def warmup_decay(s: int, decay: float) -> float:
        """`min((1 + s) / (10 + s), decay)`: the decay used at optimizer step s."""
        return min((1 + s) / (10 + s), decay)

    @property
    def current_decay(self) -> float:
        """The decay the next `step()` will use."""
        return self.warmup_decay(self.first_step + self.num_updates, self.decay)

    @property
    def shadow(self) -> dict[str, torch.Tensor] | list[torch.Tensor]:
        """The averaged tensors (live references in a new container), in the structure given at construction."""
        return dict(self._shadow) if isinstance(self._shadow, dict) else list(self._shadow)

    def step(self, params: TensorCollection) -> float:
        """Fold the current weights into the average (call once per optimizer step); return the decay used."""
        decay = self.current_decay
        triples = pair_tensors(self._shadow, params, target_name="ema", source_name="params")
        lerp_pairs_([shadow for _, shadow, _ in triples], [live for _, _, live in triples], 1.0 - decay)
        self.num_updates += 1
        return decay

    @torch.no_grad()
    def copy_to(self, params: TensorCollection) -> None:
        """Overwrite `params` with the averaged weights (cast to each tensor's dtype and device)."""
        for _, live, shadow in pair_tensors(params, self._shadow, target_name="params", source_name="ema"):
            local, average = local_pair(live, shadow)
            local.copy_(average)

    @contextmanager
    def swapped(self, params: TensorCollection) -> Iterator[None]:
        """Temporarily load the averaged weights into `params`; the originals come back on exit, even on error.

        Holds one copy of `params` meanwhile (on their own device; FSDP2 shards: of the local shards), which restores
        them bit-exactly.
        """
        triples = pair_tensors(params, self._shadow, target_name="params", source_name="ema")
        with torch.no_grad():
            pairs = [local_pair(live, shadow) for _, live, shadow in triples]
            backups = [live.clone() for live, _ in pairs]
        try:
            with torch.no_grad():
                for live, shadow in pairs:
                    live.copy_(shadow)
            yield
        finally:
            with torch.no_grad():
                for (live, _), backup in zip(pairs, backups):
                    live.copy_(backup)

    def state_dict(self) -> dict[str, Any]:
        """Config, update count and shadows (live references, as `nn.Module.state_dict` does; for `torch.save`)."""
        return {
            "decay": self.decay,
            "first_step": self.first_step,
            "num_updates": self.num_updates,
            "shadow": self.shadow,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()`; the saved shadows must match this EMA's structure and shapes.

        Values are copied into the existing shadows, so they stay on this EMA's device and dtype.
        """
        missing = {"decay", "first_step", "num_updates", "shadow"} - set(state)
        if missing:
            raise ValueError(f"EMA state is missing {sorted(missing)}")
        decay = _check_decay(state["decay"])
        first_step = _check_count("first_step", state["first_step"])
        num_updates = _check_count("num_updates", state["num_updates"])
        triples = pair_tensors(self._shadow, state["shadow"], target_name="ema", source_name="state['shadow']")
        for _, shadow, saved in triples:
            shadow.copy_(saved)
        self.decay, self.first_step, self.num_updates = decay, first_step, num_updates

    def __repr__(self) -> str:
        return (
            f"EMA(decay={self.decay}, first_step={self.first_step}, num_updates={self.num_updates}, "
            f"tensors={len(self._shadow)})"
        )
