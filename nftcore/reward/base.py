"""One interface for every reward: `reward_fn(edited, sources, prompts, metadata) -> RewardResult`.

Why a validity mask (§3.4, §11.4): the official Edit-R1 code turns any scoring failure into a score of 0.0, which then
enters the group statistics as a real, very bad sample. Here a failed sample is *invalid*: its score is NaN and `valid`
is False, so the trainer can drop (and count) its group instead of learning from a fake zero. NaN also makes an
accidental use of an invalid score loud instead of silent.

Why each invalid sample carries a reason (`RewardResult.reasons`): a run that loses a tenth of its rewards must say
why, once per epoch, without a log line per sample. `summarize_errors(results)` counts the invalid samples of an
epoch by reason and `format_error_summary(counts)` makes that one log line.

The argument order mirrors the official code's `_fn(images, ref_images, prompts, metadatas)` and TRL's callable
rewards:
- edited: the B edited images (PIL images, HWC uint8 arrays, or a [B, 3, H, W] / list of [3, H, W] tensors, float
  in [0, 1] or uint8);
- sources: the B source images, same forms;
- prompts: the B edit instructions;
- metadata: B dicts (e.g. the dataset row's `requirement`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class RewardResult:
    """Scores [B] float32 (NaN where invalid) and valid [B] bool; `details` holds named per-sample parts [B]
    (e.g. each term of a weighted sum), `errors` one message per distinct failure (with sample indices, for a
    reader), `reasons` why each sample is invalid ([B], None where valid; () when the reward gives none), worded
    without sample indices so that equal causes count together in `summarize_errors`."""

    scores: torch.Tensor
    valid: torch.Tensor
    details: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    reasons: tuple[str | None, ...] = ()

    def __post_init__(self):
        if self.scores.dim() != 1 or self.valid.shape != self.scores.shape or self.valid.dtype != torch.bool:
            raise ValueError(f"RewardResult needs scores [B] and a bool valid [B], got {tuple(self.scores.shape)} "
                             f"and {tuple(self.valid.shape)} {self.valid.dtype}")
        if self.reasons and len(self.reasons) != len(self.scores):
            raise ValueError(f"RewardResult.reasons must hold one entry per sample ({len(self.scores)}), "
                             f"got {len(self.reasons)}")

    @classmethod
    def from_scores(cls, scores: Sequence[float] | torch.Tensor, **kwargs) -> "RewardResult":
        """Valid where the score is finite; non-finite scores (a NaN from the judge) become invalid NaNs, with the
        reason NONFINITE_REASON unless `reasons` names one."""
        s = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).cpu()
        valid = torch.isfinite(s)
        given = tuple(kwargs.pop("reasons", ()) or (None,) * len(s))
        if len(given) != len(s):
            raise ValueError(f"from_scores: {len(given)} reasons for {len(s)} scores")
        reasons = tuple(r if ok else r or NONFINITE_REASON for r, ok in zip(given, valid.tolist()))
        return cls(torch.where(valid, s, torch.nan), valid, reasons=reasons if any(reasons) else (), **kwargs)

    @classmethod
    def invalid(cls, n: int, error: str) -> "RewardResult":
        """All n samples failed, for the reason `error`."""
        return cls(torch.full((n,), math.nan), torch.zeros(n, dtype=torch.bool), errors=(error,), reasons=(error,) * n)

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())

    def sample_reasons(self) -> list[str | None]:
        """Why each sample is unusable (None where it is usable): its own reason, else this result's errors joined
        (a reward that gives no per-sample reasons), else NONFINITE_REASON / "no reason given"."""
        fallback = "; ".join(self.errors) or "no reason given"
        usable = (self.valid & torch.isfinite(self.scores)).tolist()  # what the trainer keeps
        own = self.reasons or (None,) * len(usable)
        return [None if ok else (r or (fallback if not v else NONFINITE_REASON))
                for ok, v, r in zip(usable, self.valid.tolist(), own)]


NONFINITE_REASON = "non-finite score"
MAX_REASON_CHARS = 300  # one reason stays readable in a one-line summary


def summarize_errors(results: Iterable[RewardResult]) -> dict[str, int]:
    """Invalid samples counted by reason over `results` (e.g. one epoch's), most frequent first.

    A reason is normalised (whitespace runs collapsed, cut at MAX_REASON_CHARS) so that a multi-line server
    message counts as one key; an empty dict means every sample was usable."""
    counts: Counter[str] = Counter()
    for result in results:
        for reason in result.sample_reasons():
            if reason is not None:
                counts[_normalise_reason(reason)] += 1
    return dict(counts.most_common())


def format_error_summary(counts: Mapping[str, int]) -> str:
    """`summarize_errors`'s counts as one log line: "5 invalid rewards: 3 x HTTP 503: ...; 2 x non-finite score"
    (most frequent first); "no invalid rewards" when empty."""
    if not counts:
        return "no invalid rewards"
    total = sum(counts.values())
    parts = "; ".join(f"{n} x {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{total} invalid reward{'s' if total != 1 else ''}: {parts}"


def _normalise_reason(reason: str) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS - 3] + "..."


class RewardFn(Protocol):
    def __call__(self, edited: Sequence[Any], sources: Sequence[Any], prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> RewardResult: ...


class WeightedSum:
    """A weighted sum of named rewards, itself a reward: scores = sum_n w_n s_n, invalid where any part is invalid.

    `WeightedSum({"mllm": (mllm_reward, 1.0), "ocr": (ocr_reward, 0.5)})`; each part's raw scores are kept in
    `details` under its name (NaN where that part failed), like Edit-R1's `score_details`.
    """

    def __init__(self, parts: Mapping[str, tuple[RewardFn, float]]):
        if not parts:
            raise ValueError("WeightedSum needs at least one reward")
        for name, part in parts.items():
            if not (isinstance(part, tuple) and len(part) == 2 and callable(part[0])
                    and isinstance(part[1], (int, float))):
                raise ValueError(f"WeightedSum part {name!r} must be (reward_fn, weight), got {part!r}")
        self.parts = dict(parts)

    def __call__(self, edited, sources, prompts, metadata) -> RewardResult:
        n = len(prompts)
        total = torch.zeros(n)
        valid = torch.ones(n, dtype=torch.bool)
        details, errors = {}, []
        reasons: list[list[str]] = [[] for _ in range(n)]  # each sample's failed parts, "name: reason"
        for name, (fn, weight) in self.parts.items():
            part = fn(edited, sources, prompts, metadata)
            if len(part) != n:
                raise ValueError(f"reward {name!r} returned {len(part)} scores for {n} samples")
            details[name] = part.scores
            valid &= part.valid
            total += weight * torch.where(part.valid, part.scores, 0.0)  # masked below; avoids NaN * 0 = NaN
            errors += [f"{name}: {e}" for e in part.errors]
            for mine, why in zip(reasons, part.sample_reasons()):
                if why is not None:
                    mine.append(f"{name}: {why}")
        joined = tuple("; ".join(r) or None for r in reasons)
        return RewardResult(torch.where(valid, total, torch.nan), valid, details, tuple(errors),
                            joined if any(joined) else ())


def check_batch(edited: Sequence[Any], sources: Sequence[Any], prompts: Sequence[str],
                metadata: Sequence[Mapping[str, Any]] | None) -> int:
    """The batch size B; ValueError naming the argument whose length differs."""
    n = len(prompts)
    lengths = {"edited": len(edited), "sources": len(sources), "prompts": n}
    if metadata is not None:
        lengths["metadata"] = len(metadata)
    bad = {k: v for k, v in lengths.items() if v != n}
    if bad:
        raise ValueError(f"reward inputs must all have the same length, got {lengths}")
    return n


def to_pil(image: Any) -> Image.Image:
    """One image as an RGB PIL image. Accepts PIL, an HWC uint8 array, or a CHW tensor (float in [0, 1] is
    rounded to uint8 the way the trainer's decoded images would be saved; uint8 is taken as is)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be [3, H, W] (or [1, H, W]), got {tuple(image.shape)}")
        x = image.detach().cpu()
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        image = x.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ValueError(f"an image array must be HWC uint8 with 1 or 3 channels, got {image.shape} {image.dtype}")
        return Image.fromarray(image if image.shape[2] == 3 else image[..., 0]).convert("RGB")
    raise TypeError(f"unsupported image type {type(image).__name__}")


def to_pil_list(images: Any) -> list[Image.Image]:
    """A batch ([B, 3, H, W] tensor or a sequence of single images) as RGB PIL images."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return [to_pil(x) for x in images]
    return [to_pil(x) for x in images]
