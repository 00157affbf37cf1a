"""FSDP2 sharding of the frozen text encoders (`parallel.shard_text_encoder`), as the official code does: every
transformer layer of each encoder is one shard group (T5 blocks, CLIP encoder layers, Qwen2.5-VL decoder layers and
vision blocks), then the encoder's root; parameters are gathered for each layer's forward and freed after it
(`reshard_after_forward`). Inference only: the encoders are frozen.

Why it is safe in this trainer: FSDP2's forward is a collective, so every rank must call each encoder the same number
of times. Rollouts compute conditioning once per rollout batch and every rank has the same number of batches (the
batch plan), and evaluation runs the whole eval split on every rank.
"""

from __future__ import annotations

from torch import nn

# Layer classes of the encoders the editing families load (transformers' names).
LAYER_CLASSES = frozenset({"T5Block", "CLIPEncoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"})


def shard_encoder(encoder: nn.Module, mesh) -> int:
    """`fully_shard` each layer of `encoder` whose class is in LAYER_CLASSES, then the root; returns the number of
    layer groups (0 means only the root was sharded)."""
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in encoder.modules() if type(m).__name__ in LAYER_CLASSES]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(encoder, mesh=mesh, reshard_after_forward=True)
    return len(layers)


def shard_text_encoders(family_model, device) -> list[str]:
    """Shard the text encoder(s) of a `nftcore.models.families` object over all ranks (one 1-D mesh); returns the
    attribute names sharded. Needs an initialised process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = [name for name in ("t5", "clip", "text_encoder") if isinstance(getattr(family_model, name, None), nn.Module)]
    if not names:
        raise ValueError(f"parallel.shard_text_encoder: {type(family_model).__name__} has no text encoder to shard")
    for name in names:
        shard_encoder(getattr(family_model, name), mesh)
    return names
