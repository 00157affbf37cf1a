"""FSDP2 sharding of the frozen models used for inference only: the text encoders (`parallel.shard_text_encoder`, as
the official code does) and the in-process MLLM judge (`parallel.shard_reward_model`).

Every transformer layer is one shard group (T5 blocks, CLIP encoder layers, Qwen2.5-VL decoder layers and vision
blocks); parameters are gathered for each layer's forward and freed after it (`reshard_after_forward`), so a rank
holds 1 / world_size of the weights plus about one layer's gathered weights while the model runs.

Why it is safe in this trainer: FSDP2's forward is a collective, so every rank must make the same calls in the same
order, from one thread.
- Encoders: conditioning is computed once per rollout batch and every rank has the same number of batches (the
  batch plan); evaluation gives every rank an equal slice of the eval split (padded).
- Judge: each rank scores the same number of batches, but how many vision-tower and language-model calls a batch
  needs depends on its images and groups, so the scorer runs in lockstep (`MLLMScorer.lockstep`: one all-reduce of
  the call counts per batch, then one-token dummy calls up to the maximum). The trainer also scores on the main
  thread instead of its reward worker thread: two threads issuing collectives (rollout FSDP2 and judge FSDP2) could
  interleave differently on different ranks, and NCCL forbids concurrent operations on two communicators of one
  device from different threads. It scores the rank's whole share in one call after the rollouts: every call gathers
  each layer once, so fewer, larger calls gather less (`bench/bench_judge_sharding.py`).

See docs/ALGORITHM.md §5.4.
"""

from __future__ import annotations

import torch
from torch import nn

# Layer classes of the encoders and the judge (transformers' names).
LAYER_CLASSES = frozenset({"T5Block", "CLIPEncoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"})


def _shard_layers(module: nn.Module, mesh) -> int:
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in module.modules() if type(m).__name__ in LAYER_CLASSES]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return len(layers)


def _world_mesh(device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_encoder(encoder: nn.Module, mesh) -> int:
    """`fully_shard` each layer of `encoder` whose class is in LAYER_CLASSES, then the root; returns the number of
    layer groups (0 means only the root was sharded)."""
    from torch.distributed.fsdp import fully_shard

    count = _shard_layers(encoder, mesh)
    fully_shard(encoder, mesh=mesh, reshard_after_forward=True)
    return count


def shard_text_encoders(family_model, device) -> list[str]:
    """Shard the text encoder(s) of a `nftcore.models.families` object over all ranks (one 1-D mesh); returns the
    attribute names sharded. Needs an initialised process group."""
    mesh = _world_mesh(device)
    names = [name for name in ("t5", "clip", "text_encoder")
             if isinstance(getattr(family_model, name, None), nn.Module)]
    if not names:
        raise ValueError(f"parallel.shard_text_encoder: {type(family_model).__name__} has no text encoder to shard")
    for name in names:
        shard_encoder(getattr(family_model, name), mesh)
    return names


def shard_judge(scorer, device: torch.device, *, from_rank0: bool = False) -> int:
    """Shard an `nftcore.reward.MLLMScorer`'s Qwen2.5-VL over all ranks and put the scorer in lockstep; returns the
    number of layer groups.

    The scorer calls the vision tower and the language model directly (never the model's own forward), so each is
    a root: the layers, then `visual` (with its patch embedding and merger) and `language_model` (with the token
    embedding and the final norm). The LM head stays whole on every rank: `score_logits` reads its answer rows
    directly (vocab x hidden, 1.6 GB in bf16 for the 32B judge).

    Where the weights come from: with `from_rank0`, rank 0 holds the loaded judge on the CPU and every other rank a
    weightless skeleton (`MLLMScorer.from_pretrained(..., device="meta")`); the shards are filled from rank 0's
    copy one tensor at a time (`set_model_state_dict(broadcast_from_rank0=True)`), so the node needs one judge's
    worth of host memory, not one per rank. Otherwise every rank brings its own full copy (on the CPU or anywhere).
    Either way `fully_shard` moves what it shards to `device` one group at a time, so no rank ever holds the whole
    judge on its GPU.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = scorer.model
    skeleton = any(p.is_meta for p in model.parameters())
    if skeleton and not from_rank0:
        raise ValueError("shard_judge: this rank's judge has no weights (meta device); pass from_rank0=True and "
                         "load the weights on rank 0")
    mesh = _world_mesh(device)
    group = mesh.get_group()
    full = model.state_dict() if from_rank0 and dist.get_rank() == 0 else {}  # rank 0's whole weights, pre-sharding
    inner = model.model
    count = _shard_layers(inner, mesh)
    for root in (inner.visual, inner.language_model):
        fully_shard(root, mesh=mesh, reshard_after_forward=True)
    if skeleton:
        model.to_empty(device=device)  # storage for the shards and the rest; filled from rank 0 below
    else:
        _move_unsharded(model, device, DTensor)
    if from_rank0:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        for buffer in model.buffers():  # non-persistent buffers (rotary frequencies) are not in the state dict
            dist.broadcast(buffer, src=dist.get_global_rank(group, 0), group=group)

    def lockstep(counts: tuple[int, int]) -> tuple[int, int]:
        t = torch.tensor(counts, dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return tuple(t.tolist())

    scorer.lockstep = lockstep
    return count


def _move_unsharded(model: nn.Module, device: torch.device, dtensor_type) -> None:
    """Move what FSDP2 does not manage (the LM head, a tied embedding, stray buffers) to `device`."""
    moved: dict[int, nn.Parameter] = {}  # a tied weight stays one tensor
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not isinstance(p, dtensor_type) and p.device != device:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.to(device), requires_grad=False)
                setattr(module, name, moved[id(p)])
        for name, b in module.named_buffers(recurse=False):
            if b.device != device:
                module._buffers[name] = b.to(device)
