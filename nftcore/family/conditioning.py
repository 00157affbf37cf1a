"""Batch operations on the editing conditionings: rows of one (`index_conditioning`) and several concatenated
(`cat_conditioning`), for `FluxEditConditioning` and `QwenEditConditioning` alike.

Why the trainer needs them: conditioning is computed once per rollout batch and kept; the update then builds
micro-batches from surviving samples of any rollout batch, so it concatenates the epoch's conditionings once and
indexes rows per micro-batch.

Qwen-Image's text length varies with the instruction, so rollout batches have different `Nt`: concatenation
right-pads to the longest with zero embeddings and a 0 mask (masked keys get no attention weight, and text RoPE
positions depend only on a token's own index, so padding changes no real token's output); indexing trims the
columns no selected row uses, so a micro-batch of short instructions does not pay for a long one elsewhere.
FLUX pads T5 to a fixed length, so its rows always line up; its ids are shared by the whole batch.

Where the conditioning comes from and goes: docs/DESIGN.md §2 (steps 2 and 6).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from nftcore.models.editing import FluxEditConditioning, QwenEditConditioning

# The fields with a batch dimension (FLUX ids and Qwen img_shapes are shared by every sample).
_FLUX_BATCH_FIELDS = ("prompt_embeds", "pooled_prompt_embeds", "source_latents")
_QWEN_BATCH_FIELDS = ("prompt_embeds", "prompt_embeds_mask", "source_latents")

Conditioning = FluxEditConditioning | QwenEditConditioning


def _flux_batch_fields(cond: FluxEditConditioning) -> tuple[str, ...]:
    per_sample_guidance = torch.is_tensor(cond.guidance) and cond.guidance.dim() > 0
    return _FLUX_BATCH_FIELDS + (("guidance",) if per_sample_guidance else ())


def index_conditioning(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    """Rows `index` of a conditioning (any device; moved to each field's)."""
    fields = _flux_batch_fields(cond) if isinstance(cond, FluxEditConditioning) else _QWEN_BATCH_FIELDS
    changes = {name: getattr(cond, name)[index.to(getattr(cond, name).device)] for name in fields
               if getattr(cond, name) is not None}
    if isinstance(cond, QwenEditConditioning) and changes.get("prompt_embeds_mask") is not None:
        used = int(changes["prompt_embeds_mask"].sum(dim=1).max())  # one host sync per micro-batch
        changes["prompt_embeds"] = changes["prompt_embeds"][:, :used]
        changes["prompt_embeds_mask"] = changes["prompt_embeds_mask"][:, :used]
    return dataclasses.replace(cond, **changes)  # Qwen: an all-ones mask is dropped again in __post_init__


def cat_conditioning(conds: Sequence[Conditioning]) -> Conditioning:
    """The conditionings one after another along the batch; they must describe the same image layout."""
    first = conds[0]
    if isinstance(first, FluxEditConditioning):
        if any(not torch.equal(c.img_ids, first.img_ids) for c in conds[1:]):
            raise ValueError("cannot concatenate FLUX conditionings with different image ids (target/source sizes)")
        fields = _flux_batch_fields(first)
        return dataclasses.replace(first, **{name: torch.cat([getattr(c, name) for c in conds]) for name in fields
                                             if getattr(first, name) is not None})
    if any(list(c.img_shapes) != list(first.img_shapes) for c in conds[1:]):
        raise ValueError(f"cannot concatenate Qwen conditionings with different img_shapes "
                         f"{sorted({str(c.img_shapes) for c in conds})}")
    longest = max(c.prompt_embeds.shape[1] for c in conds)
    embeds, masks = [], []
    for c in conds:
        batch, length = c.prompt_embeds.shape[:2]
        mask = c.prompt_embeds_mask
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=c.prompt_embeds.device)
        embeds.append(torch.nn.functional.pad(c.prompt_embeds, (0, 0, 0, longest - length)))
        masks.append(torch.nn.functional.pad(mask, (0, longest - length)))
    source = None if first.source_latents is None else torch.cat([c.source_latents for c in conds])
    return QwenEditConditioning(torch.cat(embeds), torch.cat(masks), list(first.img_shapes), source)
