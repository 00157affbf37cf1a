"""Run by tests/test_judge_sharding.py under torchrun (2 gloo ranks on CPU; NCCL, one rank per GPU, on CUDA): every
rank scores its own batches with the whole judge, then shards it with `shard_judge` and scores them again; writes
OUT/rank-R.json.

The ranks' batches differ on purpose, so they need different numbers of vision-tower and language-model calls: rank 0
has groups (the shared-prefix path) and an empty batch, rank 1 singles of several sizes (the one-forward path).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nftcore.reward import MLLMScorer
from nftcore.testing.tiny_judge import TEST_MAX_PIXELS, TEST_MIN_PIXELS, random_images
from nftcore.trainer.inference_sharding import shard_judge
from tests.helpers.judges import grouped_batch


def batches(rank: int) -> list[tuple]:
    if rank == 0:
        edited, sources, prompts, requirements = grouped_batch(0)
        return [(edited, sources, prompts, requirements), ([], [], [], []),
                (edited[3:5], sources[3:5], prompts[3:5], requirements[3:5])]
    sizes = [(64, 64), (100, 80), (56, 90), (112, 112), (80, 64)]
    sources, edited = random_images(10, sizes), random_images(11, sizes)
    prompts = [f"edit number {i}" for i in range(5)]
    requirements = [f"requirement {i}" for i in range(5)]
    return [(edited, sources, prompts, requirements), (edited[:2], [sources[0]] * 2, prompts[:2], requirements[:2]),
            (edited[4:], sources[4:], prompts[4:], requirements[4:])]


def load(folder: str, device) -> MLLMScorer:
    return MLLMScorer.from_pretrained(folder, dtype=torch.float32, min_pixels=TEST_MIN_PIXELS,
                                      max_pixels=TEST_MAX_PIXELS, max_batch=4, vision_batch=2, device=device)


def check(folder: str, rank: int, device: torch.device, from_rank0: bool) -> dict:
    """from_rank0: as the trainer loads it (rank 0 the weights on the CPU, the others a meta skeleton); otherwise
    every rank's own whole copy, moved to the CPU first."""
    scorer = load(folder, device)
    whole = [scorer.score(*b).tolist() for b in batches(rank)]
    if from_rank0:
        scorer = load(folder, "cpu" if rank == 0 else "meta")
    else:
        scorer.model.cpu()
    layers = shard_judge(scorer, device, from_rank0=from_rank0)
    sharded = [scorer.score(*b).tolist() for b in batches(rank)]
    params = dict(scorer.model.named_parameters())
    local = {n: p.to_local().numel() for n, p in params.items() if isinstance(p, DTensor)}
    return {"whole": whole, "sharded": sharded, "layers": layers, "local": sum(local.values()),
            "full": sum(params[n].numel() for n in local), "unsharded": sorted(set(params) - set(local))}


def main(out: str, *folders: str) -> None:
    """OUT/rank-R.json: one result per judge folder: the first filled from rank 0, the others from every rank."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    results = [check(folder, rank, device, k == 0) for k, folder in enumerate(folders)]
    Path(out, f"rank-{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
