"""The demo world's judge: a programmatic, dense editing reward in [0, 1] against the exact ground truth.

It stands in for the MLLM judge in the CPU demo, and is built to rank outputs the way that judge
is meant to: an output that does not edit at all must score clearly below the requested edit, one that damages the
rest of the picture must lose credit, and near-misses must earn partial credit so that a group of K rollouts has a
spread to learn from (group-relative advantages need differences, not a pass/fail bit).

Every demo edit changes a known set of pixels, so each image splits into regions, computed per task from the
renders: the *edit region* E = {pixels where source s ≠ target t}, itself split into E_paint (the target shows an
object there: a new colour, a moved object's new place) and E_erase (the target shows background: a removed or
moved object's old place), and the *keep region* K = the rest. With x the edited image clamped to [0, 1] (what a
viewer or a JPEG would show), the per-pixel distance d(a, b) = max over RGB of |a − b| (a pixel is as wrong as its
worst channel), and mean_R the mean over region R's pixels:

    keep     = exp(−mean_K d(x, t) / τ)                                preservation: 1 when the rest is untouched
    progress = clamp(1 − mean_R d(x, t) / mean_R d(s, t), 0, 1)     per region R ∈ {E_paint, E_erase}:
                                                                     0 at the source, 1 at the target
    edit     = geometric mean of the progresses over the non-empty regions (a move needs both halves)
    score    = keep · (w + (1 − w) · edit)                            w = source_credit = 0.4, τ = keep_tau = 0.1

Every term compares against the ground-truth target, so together they are a similarity to it, weighted by what the
instruction is about. Why this shape:

- The ground truth scores exactly 1. The unedited source scores exactly w = 0.4: it preserves everything but does
  nothing.
- Along the blend x = (1 − α)·s + α·t, K is untouched and every distance to t scales by (1 − α), so both progresses
  are α and the score is w + (1 − w)·α: linear, hence strictly monotone, 0.7 at α = ½.
- Noise scores ≈ 0: on the black background uniform noise has mean d ≈ 0.75, keep ≈ exp(−7.5). Preservation
  multiplies, because an output that wrecks the picture is not "partly right" however its edit region looks.
- Editing the wrong object leaves E as it was (edit = 0) and damages K, so it scores below doing nothing.
- No shortcut through the background: d is the worst channel, so black is as far from blue as red is (a mean over
  channels would call black halfway from red to blue), and a move is scored as the geometric mean of its two halves
  (an arithmetic mean would pay half for just erasing). So for a recolour or a move a blank image scores at most
  what the source does (the same in a one-object scene, about half in a two-object one).
- Partial credit exists everywhere: keep decays smoothly with blur or stray pixels, and a half-moved or
  half-recoloured object earns a fraction of the edit term.

Not measured: where a moved object went if it went elsewhere (that is only "wrong pixels" in both regions), or
anything perceptual; this is a verifier for a toy world, not a metric for real edits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nftcore.demo.world import BACKGROUND, DemoSample, EditTask, stack_images

SOURCE_CREDIT = 0.4  # w: the score of not editing at all, between "nothing" and "done"
KEEP_TAU = 0.1  # τ: mean distance over the keep region at which preservation has fallen to 1/e


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] × 2 -> [B, H, W]: the largest per-channel absolute difference."""
    return (a - b).abs().amax(dim=1)


def _region_mean(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `value` [B, H, W] over each image's masked pixels -> [B]; 0 where the mask is empty."""
    mask = mask.to(value.dtype)
    return (value * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1.0)


def _progress(err: torch.Tensor, ref: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] in [0, 1], [B] bool): how far x has come from the source towards the target over `region` (1 where the
    region is empty), and whether it is non-empty."""
    reference = _region_mean(ref, region)  # > 0 wherever the region is non-empty: s ≠ t on E by definition
    progress = (1.0 - _region_mean(err, region) / reference.clamp_min(1e-12)).clamp(0.0, 1.0)
    present = region.any(dim=(1, 2))
    return torch.where(present, progress, torch.ones_like(progress)), present


def score_components(
    edited: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    keep_tau: float = KEEP_TAU,
    background: Sequence[float] = BACKGROUND,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, edit), each float32 [B] in [0, 1], for float [B, 3, H, W] images (see the module docstring)."""
    if edited.dim() != 4 or edited.shape[1] != 3:
        raise ValueError(f"edited must be [B, 3, H, W], got shape {tuple(edited.shape)}")
    if source.shape != edited.shape or target.shape != edited.shape:
        raise ValueError(
            f"edited {tuple(edited.shape)}, source {tuple(source.shape)} and target {tuple(target.shape)} must match"
        )
    if not torch.isfinite(edited).all():
        raise ValueError("edited images contain NaN or inf")
    if keep_tau <= 0:
        raise ValueError(f"keep_tau must be > 0, got {keep_tau!r}")
    x = edited.detach().float().clamp(0.0, 1.0)
    source, target = source.to(x.device, torch.float32), target.to(x.device, torch.float32)
    background_color = torch.tensor(background, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)

    edit_region = (source != target).any(dim=1)  # [B, H, W]; never empty for a demo task
    erase_region = edit_region & (target == background_color).all(dim=1)
    err, ref = _distance(x, target), _distance(source, target)  # [B, H, W] each
    keep = torch.exp(-_region_mean(err, ~edit_region) / keep_tau)
    paint, has_paint = _progress(err, ref, edit_region & ~erase_region)
    erase, has_erase = _progress(err, ref, erase_region)
    # Geometric mean over the non-empty halves: a recolour or a removal has one, a move two.
    edit = (paint * erase).pow(1.0 / (has_paint.float() + has_erase.float()).clamp_min(1.0))
    return keep, edit


def verify_images(
    edited: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    source_credit: float = SOURCE_CREDIT,
    keep_tau: float = KEEP_TAU,
) -> torch.Tensor:
    """Reward float32 [B] in [0, 1] of edited [B, 3, H, W] in [0, 1] given the sources and ground-truth targets."""
    if not 0.0 <= source_credit < 1.0:
        raise ValueError(f"source_credit must be in [0, 1), got {source_credit!r}")
    keep, edit = score_components(edited, source, target, keep_tau=keep_tau)
    return keep * (source_credit + (1.0 - source_credit) * edit)


def verify(
    edited: torch.Tensor,
    tasks: Sequence[EditTask | DemoSample],
    *,
    source_credit: float = SOURCE_CREDIT,
    keep_tau: float = KEEP_TAU,
) -> torch.Tensor:
    """Reward float32 [B] in [0, 1] of `edited[i]` as an answer to `tasks[i]` (an EditTask or a DemoSample).

    The result is on `edited`'s device; the tasks' renders are moved there. Vectorised over the batch.
    """
    if edited.dim() != 4 or edited.shape[0] != len(tasks):
        raise ValueError(f"edited must be [B, 3, H, W] with B = len(tasks) = {len(tasks)}, got {tuple(edited.shape)}")
    source, target = stack_images(tasks)
    return verify_images(edited, source, target, source_credit=source_credit, keep_tau=keep_tau)
