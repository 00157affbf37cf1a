"""Process groups, FSDP2 wrapping and the few collectives the trainer needs.

One process without torchrun's environment runs with no process group at all: every helper here degrades to the
identity, so the single-process path is the distributed path with world_size 1, not a separate code path.

FSDP2 (`fully_shard`) goes per transformer block, then on the root, with a `MixedPrecisionPolicy`
of bf16 parameters and fp32 gradient reduction on GPU, and plain fp32 on CPU (gloo has no bf16 reduce worth having,
and the CPU tests compare 1 vs 2 ranks in fp32). LoRA must be applied before wrapping: FSDP2 shards every parameter
of a block, frozen base weights and both adapters alike, and gathers them around each forward. Full fine-tuning's
trained model is sharded as fp32 masters and gathered in model.dtype (`shard_transformer`'s `master_dtype`).

Gradient reduction: FSDP2 *averages* gradients over ranks, so each rank's loss, normalised by the step's global
count of (sample, timestep) pairs, is multiplied by world_size (`loss_scale_for_reduction`; docs/DESIGN.md §4 and
docs/ALGORITHM.md §7).

With `parallel.shard_transformer = false` the model is replicated instead (the official code's DDP) and
`average_gradients` all-reduces the trainable gradients once per optimizer step, with the same averaging, so the
two modes compute the same update. Not DDP itself: the loop runs three forwards (θ, θ_old, reference) through one
module per backward, which DDP's reducer does not expect, and one flat all-reduce per step of LoRA-sized gradients
leaves nothing to overlap.

Shutdown always runs `dist.barrier()` before `destroy_process_group()`: without it gloo aborts at exit now and then.

How a run is distributed: docs/ALGORITHM.md §5.4.
Why any world size gives the same result: docs/TRAINING.md, "Any world size runs a recipe unchanged".
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nftcore.config import TrainConfig


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or (dist.is_available() and dist.is_initialized())


def init_distributed(cfg: TrainConfig) -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), if any.

    Backend: `parallel.backend`, where 'auto' is NCCL with CUDA and gloo without. Each rank uses cuda:LOCAL_RANK
    when CUDA is available, else the CPU.
    """
    use_cuda = torch.cuda.is_available()
    if not use_cuda and "OMP_NUM_THREADS" not in os.environ:
        # One intra-op thread per process on CPU (torchrun sets OMP_NUM_THREADS=1 too): the demo's matrices are tiny,
        # and with several ranks sharing the cores, extra threads per rank only wait for each other.
        torch.set_num_threads(1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(device=device)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def current_env(device: torch.device) -> DistEnv:
    """This process's place in the process group it has already joined (one process if none), computing on
    `device`: for code handed a device rather than the trainer's `DistEnv`."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)
    return DistEnv(device=device)


def shutdown(env: DistEnv) -> None:
    """Leave the process group: barrier first, always (see the module docstring)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_transformer(model: nn.Module, env: DistEnv, cfg: TrainConfig, *, master_dtype: torch.dtype | None = None,
                      compute_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: `fully_shard` every block of `model.blocks` (the MMDiT's double then single blocks), then the root;
    HSDP when `parallel.replicate_degree` > 1.

    The last block keeps its parameters gathered after forward (its backward comes right next). No sharding on one
    rank, and with `parallel.shard_transformer = false` (replicated; see `average_gradients`).

    `master_dtype` (full fine-tuning's trained model): the parameters are held in it, fp32 masters. Each block is
    cast just before it is sharded, so no full-precision copy of the whole model ever exists on one rank; the
    forward then computes in `compute_dtype` (the MixedPrecisionPolicy's param_dtype: each gathered block is cast,
    gradients are reduce-scattered in fp32 into the fp32 shards). Unsharded, the model is cast whole and the trainer
    autocasts instead.
    """
    if env.world_size == 1 or not cfg.parallel.shard_transformer:
        if master_dtype is not None:
            model.to(master_dtype)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    # A Linear on [B, N, C] returns a view of its 2-D GEMM output, which FSDP2 warns about on every forward of the
    # root: an in-place op on it would skip the pre-backward hook. The trainer never modifies velocities in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = _mesh(env, cfg.parallel.replicate_degree, init_device_mesh)
    if compute_dtype is None and env.device.type == "cuda" and cfg.optim.mixed_precision == "bf16":
        compute_dtype = torch.bfloat16
    if compute_dtype == master_dtype:
        compute_dtype = None
    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32))
    if cfg.parallel.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if master_dtype is not None:
        _cast_outside(model, master_dtype, skip=model.blocks)  # the root's own weights: embedders, final layer
    for block in model.blocks:
        if master_dtype is not None:
            block.to(master_dtype)
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    training_resharding(model)
    return model


def _cast_outside(module: nn.Module, dtype: torch.dtype, skip: list[nn.Module]) -> None:
    """Cast `module`'s parameters to `dtype` in place, except those of the modules in `skip` (cast separately)."""
    if any(module is other for other in skip):
        return
    for name, param in list(module._parameters.items()):
        if param is not None and param.dtype != dtype:
            module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
    for child in module.children():
        _cast_outside(child, dtype, skip)


def training_resharding(model: nn.Module) -> None:
    """The training schedule of gathers: every block reshards after its forward except the last, whose backward comes
    right next; the root (embedders, final layer) stays gathered, as FSDP2 does for a root by default."""
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        block.set_reshard_after_forward(i < len(blocks) - 1, recurse=False)
    model.set_reshard_after_forward(False, recurse=False)


def fsdp_modules(models: list[nn.Module]) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def weights_held(models: list[nn.Module]):
    """No-grad forwards inside keep every FSDP2 block's weights gathered after its first forward: a denoising loop
    of S steps all-gathers each block once instead of S times (the memory of one unsharded model for the time).
    On exit the training schedule is restored and every gathered copy dropped, so the next forward gathers whatever
    weights are then in place (after an EMA swap, say). A no-op for unsharded models."""
    modules = fsdp_modules(models)
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for model in models:
            if any(m is model for m in modules):
                training_resharding(model)
        for module in modules:
            module.reshard()


def _mesh(env: DistEnv, replicas: int, init_device_mesh):
    """1-D mesh over all ranks (FSDP), or (replicate, shard) for HSDP: `fully_shard` on a 2-D mesh shards along the
    second dim and all-reduces gradients along the first."""
    if replicas == 1:
        return init_device_mesh(env.device.type, (env.world_size,))
    if env.world_size % replicas:
        raise ValueError(f"parallel.replicate_degree={replicas} does not divide the world size {env.world_size}")
    return init_device_mesh(env.device.type, (replicas, env.world_size // replicas),
                            mesh_dim_names=("replicate", "shard"))


def average_gradients(params: list[nn.Parameter], env: DistEnv) -> None:
    """Replace each gradient by its mean over ranks (replicated training), in one flat all-reduce. Every rank runs
    the same graph (padding micro-batches included), so the same parameters have gradients everywhere."""
    if env.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(env.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def loss_scale_for_reduction(env: DistEnv) -> float:
    """Multiply each rank's loss by this so FSDP2's gradient *average* becomes the global sum (module docstring)."""
    return float(env.world_size)


def all_gather_cat(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0, in rank order. The ranks' lengths may differ (uneven shares of
    an epoch): they are exchanged first and each part is padded to the longest for the gather, then trimmed.

    Bool tensors travel as uint8 (gloo has no bool all-gather)."""
    if env.world_size == 1:
        return tensor
    is_bool = tensor.dtype == torch.bool
    local = (tensor.to(torch.uint8) if is_bool else tensor).contiguous().to(env.device)
    lengths = torch.zeros(env.world_size, dtype=torch.int64, device=env.device)
    lengths[env.rank] = local.shape[0]
    dist.all_reduce(lengths)
    lengths = lengths.tolist()
    longest = max(lengths)
    if local.shape[0] < longest:
        local = torch.cat([local, local.new_zeros((longest - local.shape[0], *local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(parts, local)
    out = torch.cat([part[:n] for part, n in zip(parts, lengths)]).cpu()
    return out.bool() if is_bool else out


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum of `tensor` over ranks (a new CPU tensor; float64 in, float64 out)."""
    if env.world_size == 1:
        return tensor.clone()
    local = tensor.to(env.device).clone()
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return local.cpu()


def all_reduce_max(value: float, env: DistEnv) -> float:
    if env.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def _broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank (picklable objects)."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-item list on one process)."""
    if env.world_size == 1:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def on_rank0(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """`fn()` run on rank 0 and its result shared with every rank; an exception there is raised on every rank
    (ConfigError and CheckpointError as themselves, anything else as a RuntimeError naming it), so no rank is left
    waiting in a collective the others skipped."""
    if env.world_size == 1:
        return fn()
    outcome = None
    if env.is_main:
        try:
            outcome = ("ok", fn())
        except BaseException as err:  # noqa: BLE001 - re-raised as soon as the others have been told
            outcome = ("error", type(err).__name__, str(err))
            _broadcast_object(outcome, env)
            raise
    outcome = _broadcast_object(outcome, env)
    if outcome[0] == "ok":
        return outcome[1]
    _, name, message = outcome
    from nftcore.config import ConfigError
    from nftcore.trainer.checkpoint_errors import CheckpointError

    kind = {"ConfigError": ConfigError, "CheckpointError": CheckpointError}.get(name)
    raise kind(message) if kind else RuntimeError(f"rank 0 failed: {name}: {message}")
