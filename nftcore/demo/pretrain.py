"""`python -m nftcore.demo.pretrain`: flow-matching pretraining of the demo policy, which makes the shipped base model.

RL needs a starting point that already has *some* editing skill (samples that a group-relative advantage can rank)
and headroom above it. This trains the transformer and the text encoder of `nftcore.demo.model.DemoPolicy` from
scratch with the rectified-flow objective on (source image, instruction) -> target image pairs drawn from the demo
world, and stops early: the budget, not corrupted data, is what keeps the skill partial.

    x_t = (1 − t)·x0 + t·ε,   target v = ε − x0,   loss = mean (v̂(x_t, t | source, instruction) − v)²

with x0 the packed target image, t ~ logit-normal(0, 1) (SD3's choice: most weight on mid noise, where a few-step
sampler makes its decisions), AdamW with a linear warm-up and a cosine decay to zero, one fresh batch of random tasks
per step. The learning rate is high (1e-2) on purpose: at 2e-3 and 5e-3 the same number of steps reached a clearly
lower reward; so is the batch (32): at 16 the reward stalled near 0.42 however long it ran. Everything (init, tasks,
noise, t) comes from generators seeded by `--seed`, and the run is single-threaded by default, so (seed, steps, batch,
lr) name one checkpoint (bit for bit on one machine and torch build).

Every `--eval-every` steps it prints the mean verifier reward of few-step samples (dpm2, the RL rollout sampler) on a
fixed evaluation set (`eval_tasks`: its own dataset seed, `EVAL_SEED`; the 16 px world is small enough that its
one-object tasks also turn up in training, so this measures skill on the task distribution, not generalisation).

The shipped asset `nftcore/demo/assets/demo_base.safetensors` is exactly what the defaults make:

    python -m nftcore.demo.pretrain --out nftcore/demo/assets/demo_base.safetensors

(= --steps 1200 --batch-size 32 --lr 1e-2 --seed 0): 3 min 0 s wall on this project's 2-core CPU box when idle,
roughly twice that while other jobs load it. Its dpm2 × 6 samples score 0.51 ± 0.24 on 64 evaluation tasks (the
unedited source scores 0.40, the ground truth 1): scenes mostly kept, removals and recolours often right, moves
mostly wrong.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nftcore.demo.model import ASSET, DemoConfig, DemoPolicy
from nftcore.demo.verifier import verify
from nftcore.demo.world import DemoDataset, EditTask, random_task, stack_images

EVAL_SEED = 9001
"""Dataset seed of the evaluation tasks (`eval_tasks`); pretraining draws its tasks from its own generator."""
DEFAULT_STEPS = 1200
DEFAULT_BATCH = 32
DEFAULT_LR = 1e-2


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    eval_every: int = 250
    eval_tasks: int = 64
    eval_steps: int = 6
    log_every: int = 50


def eval_tasks(n: int = 64, size: int = DemoConfig().image_size) -> list[EditTask]:
    """The fixed evaluation tasks: the first `n` of `DemoDataset(seed=EVAL_SEED, size=size)`."""
    return list(DemoDataset(n, seed=EVAL_SEED, size=size).tasks)


@torch.no_grad()
def evaluate(policy: DemoPolicy, tasks: Sequence[EditTask], *, num_steps: int = 6, solver: str = "dpm2",
             seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """Verifier rewards [len(tasks)] of one sample per task, from noise seeded by `seed` (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    rewards = []
    for start in range(0, len(tasks), batch_size):
        chunk = list(tasks[start:start + batch_size])
        source, _ = stack_images(chunk)
        images = policy.edit(source, [t.instruction for t in chunk], generator=generator, num_steps=num_steps,
                             solver=solver)
        rewards.append(verify(images, chunk))
    return torch.cat(rewards)


def flow_matching_loss(policy: DemoPolicy, tasks: Sequence[EditTask], generator: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss of one batch: noise the packed targets at logit-normal t, regress v = ε − x0."""
    source, target = stack_images(tasks)
    cond = policy.conditioning(source, [t.instruction for t in tasks], grad=True)
    x0 = policy.encode(target)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator, dtype=x0.dtype))
    x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * eps
    return F.mse_loss(policy.velocity_fn(cond)(x_t, t), eps - x0)


def _lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine to 0 at `steps`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(cfg: PretrainConfig = PretrainConfig(), *, policy: DemoPolicy | None = None,
             log: Callable[[str], None] | None = print, demo: DemoConfig | None = None) -> DemoPolicy:
    """Train a fresh (or the given) policy for `cfg.steps` steps and return it in eval mode."""
    policy = policy or DemoPolicy.fresh(cfg.seed, demo)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    task_gen = torch.Generator().manual_seed(cfg.seed * 2 + 1)  # a task stream of its own, not the eval set's
    noise_gen = torch.Generator().manual_seed(cfg.seed * 2 + 2)
    size = policy.demo.image_size
    held_out = eval_tasks(cfg.eval_tasks, size) if (cfg.eval_every and log) else []
    start, running = time.perf_counter(), None
    for step in range(1, cfg.steps + 1):
        tasks = [random_task(task_gen, size=size) for _ in range(cfg.batch_size)]
        loss = flow_matching_loss(policy, tasks, noise_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if log and (step % cfg.log_every == 0 or step == cfg.steps):
            log(f"step {step:5d}  loss {running:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                f"{time.perf_counter() - start:6.1f} s")
        if held_out and (step % cfg.eval_every == 0 or step == cfg.steps):
            policy.eval()
            rewards = evaluate(policy, held_out, num_steps=cfg.eval_steps)
            policy.train()
            log(f"step {step:5d}  eval reward {rewards.mean():.3f} ± {rewards.std():.3f} "
                f"({len(held_out)} eval tasks, dpm2 × {cfg.eval_steps})")
    return policy.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nftcore.demo.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSET), help="checkpoint path (.safetensors)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--eval-every", type=int, default=250, help="0 disables the periodic evaluation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for this tiny model and keeps runs reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         eval_every=args.eval_every)
    start = time.perf_counter()
    policy = pretrain(cfg)
    path = policy.save(args.out, extra_metadata={"nftcore.demo.pretrain": repr(cfg)})
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) after {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
