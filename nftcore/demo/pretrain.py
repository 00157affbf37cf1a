"""`python -m nftcore.demo.pretrain`: flow-matching pretraining of the demo policy, which makes the shipped base model.

RL needs a starting point whose samples a group-relative advantage can rank, with headroom above it, and the demo has
to show RL closing that gap within minutes. The shipped base is made in two phases:

1. **Pretraining** on true (source image, instruction) -> target pairs drawn from the demo world: the transformer and
   the text encoder of `nftcore.demo.model.DemoPolicy`, from scratch, with the rectified-flow objective

       x_t = (1 − t)·x0 + t·ε,   target v = ε − x0,   loss = mean (v̂(x_t, t | source, instruction) − v)²

   (x0 the packed target image, t ~ logit-normal(0, 1): SD3's choice, most weight on mid noise, where a few-step
   sampler makes its decisions), AdamW with a linear warm-up and a cosine decay to zero, one fresh batch of random
   tasks per step. The learning rate is high (1e-2) on purpose (2e-3 and 5e-3 reached a clearly lower reward in the
   same steps), and so is the batch (32: at 16 the reward stalled). This makes a capable editor.
2. **Under-editing**: a few hundred more steps at a constant, lower learning rate on pairs whose targets carry only a
   fraction of the edit (`underedited`: the source blended `--underedit-strength` of the way to the true target). The
   model learns to edit faintly: what it knew is still in its weights, but its outputs score barely above returning
   the source. This is the failure reward fine-tuning exists for (real editing models under-edit too), and RL with the
   verifier undoes it within the demo's minutes. A base made weak by stopping pretraining early is no substitute:
   there the skill is missing, not muted, and RL gains little (bench/RESULTS.md has both).

Everything (init, tasks, noise, t, for each phase) comes from generators seeded by `--seed`, and the run is
single-threaded by default, so the arguments name one checkpoint (bit for bit on one machine and torch build).

Every `--eval-every` steps, and at the end of each phase, it prints the mean verifier reward of few-step samples
(dpm2, the RL rollout sampler) on a fixed evaluation set (`eval_tasks`: its own dataset seed, `EVAL_SEED`; the 16 px
world is small enough that its one-object tasks also turn up in training, so this measures skill on the task
distribution, not generalisation).

The shipped asset `nftcore/demo/assets/demo_base.safetensors` is exactly what the defaults make (about ten minutes of
one CPU core):

    python -m nftcore.demo.pretrain --out nftcore/demo/assets/demo_base.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
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
DEFAULT_STEPS = 8000
DEFAULT_BATCH = 32
DEFAULT_LR = 1e-2
DEFAULT_UNDEREDIT_STEPS = 300
DEFAULT_UNDEREDIT_STRENGTH = 0.2
DEFAULT_UNDEREDIT_LR = 1e-3


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    weight_decay: float = 0.01
    warmup: int = 100
    seed: int = 0
    underedit_steps: int = DEFAULT_UNDEREDIT_STEPS
    underedit_strength: float = DEFAULT_UNDEREDIT_STRENGTH
    underedit_lr: float = DEFAULT_UNDEREDIT_LR
    eval_every: int = 250
    eval_tasks: int = 64
    eval_steps: int = 6
    log_every: int = 50

    def __post_init__(self):
        bad = [f"{name} = {value!r}" for name, value, ok in (
            ("steps", self.steps, self.steps >= 0), ("batch_size", self.batch_size, self.batch_size >= 1),
            ("lr", self.lr, self.lr > 0), ("underedit_steps", self.underedit_steps, self.underedit_steps >= 0),
            ("underedit_strength", self.underedit_strength, 0.0 <= self.underedit_strength <= 1.0),
            ("underedit_lr", self.underedit_lr, self.underedit_lr > 0)) if not ok]
        if bad:
            raise ValueError(f"pretraining settings out of range: {', '.join(bad)} (steps ≥ 0, batch_size ≥ 1, "
                             f"learning rates > 0, underedit_strength in [0, 1])")


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


def underedited(task: EditTask, strength: float) -> EditTask:
    """`task` with a target only `strength` of the way from the source to the true target: a faint edit."""
    return dataclasses.replace(task, target_image=torch.lerp(task.source_image, task.target_image, strength))


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
    """Train a fresh (or the given) policy: `cfg.steps` steps on true pairs, then `cfg.underedit_steps` on faint
    edits; returns it in eval mode."""
    policy = policy or DemoPolicy.fresh(cfg.seed, demo)
    held_out = eval_tasks(cfg.eval_tasks, policy.demo.image_size) if (cfg.eval_every and log) else []
    _train_phase(policy, cfg, "pretrain", cfg.steps, cfg.lr, lambda step: _lr_factor(step, cfg), None,
                 seeds=(cfg.seed * 2 + 1, cfg.seed * 2 + 2), held_out=held_out, log=log)
    if cfg.underedit_steps:
        _train_phase(policy, cfg, "under-edit", cfg.underedit_steps, cfg.underedit_lr, lambda step: 1.0,
                     cfg.underedit_strength, seeds=(cfg.seed * 2 + 101, cfg.seed * 2 + 102), held_out=held_out,
                     log=log)
    return policy.eval()


def _train_phase(policy: DemoPolicy, cfg: PretrainConfig, name: str, steps: int, lr: float,
                 lr_factor: Callable[[int], float], strength: float | None, *, seeds: tuple[int, int],
                 held_out: Sequence[EditTask], log: Callable[[str], None] | None) -> None:
    """`steps` AdamW steps of the flow-matching loss on fresh random tasks (their targets `underedited` to
    `strength` when given), each phase with its own optimizer and its own task and noise streams."""
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    task_gen = torch.Generator().manual_seed(seeds[0])  # a task stream of its own, not the eval set's
    noise_gen = torch.Generator().manual_seed(seeds[1])
    size = policy.demo.image_size
    start, running = time.perf_counter(), None
    for step in range(1, steps + 1):
        tasks = [random_task(task_gen, size=size) for _ in range(cfg.batch_size)]
        if strength is not None:
            tasks = [underedited(task, strength) for task in tasks]
        loss = flow_matching_loss(policy, tasks, noise_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if log and (step % cfg.log_every == 0 or step == steps):
            log(f"{name} step {step:5d}  loss {running:.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                f"{time.perf_counter() - start:6.1f} s")
        if held_out and (step % cfg.eval_every == 0 or step == steps):
            policy.eval()
            rewards = evaluate(policy, held_out, num_steps=cfg.eval_steps)
            policy.train()
            log(f"{name} step {step:5d}  eval reward {rewards.mean():.3f} ± {rewards.std():.3f} "
                f"({len(held_out)} eval tasks, dpm2 × {cfg.eval_steps})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nftcore.demo.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSET), help="checkpoint path (.safetensors)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--underedit-steps", type=int, default=DEFAULT_UNDEREDIT_STEPS,
                        help="steps of the second phase, on faint edits (0: none)")
    parser.add_argument("--underedit-strength", type=float, default=DEFAULT_UNDEREDIT_STRENGTH,
                        help="how far the second phase's targets go from the source to the true target")
    parser.add_argument("--underedit-lr", type=float, default=DEFAULT_UNDEREDIT_LR)
    parser.add_argument("--eval-every", type=int, default=250, help="0 disables the periodic evaluation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for this tiny model and keeps runs reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             underedit_steps=args.underedit_steps, underedit_strength=args.underedit_strength,
                             underedit_lr=args.underedit_lr, eval_every=args.eval_every)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    policy = pretrain(cfg)
    path = policy.save(args.out, extra_metadata={"nftcore.demo.pretrain": repr(cfg)})
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) after {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
