"""The rollout phase: this rank's share of an epoch's G·K edits, sampled with θ_old and scored.

`RolloutWorker.run(epoch, groups)` walks the batch plan's rollout calls (the same number on every rank; a rank whose
share ran out runs its first sample again and drops it, so FSDP2's collectives stay in step) and returns `Rollouts`.
Around the sampler it keeps three things off the critical path:

- **Data prefetch.** With data.num_workers > 0 every distinct dataset row of the rank's share is submitted to that
  many threads up front, so image decoding overlaps the rollouts and a group's K samples share one read.
- **Reward overlap.** Scoring runs on one worker thread, so batch i is judged (an HTTP round trip, an MLLM forward)
  while batch i + 1 is sampled; results are collected in order, so the overlap changes no number. A sharded judge
  (`parallel.shard_reward_model`) scores on this thread instead, after the last rollout call, the rank's whole share
  in one call: its forwards are collectives, which must come in the same order on every rank as the rollouts' own
  (see `inference_sharding`), and one call over whole groups gathers the judge fewest times.
- **Image logging.** Every `metrics.image_every` epochs rank 0 writes a source | edit grid of its first rollouts.

A rollout that is not finite (diverged weights) is never shown to the judge; an image that fails to decode under
data.bad_lines = skip is replaced by a grey stand-in that still runs. Both make the sample invalid, and the
advantages phase drops its group.

See docs/DESIGN.md §2 (steps 3 and 4) and docs/ALGORITHM.md §5.3.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nftcore.data import ImageDecodeError
from nftcore.reward.base import summarize_errors
from nftcore.sampling import sample as solve
from nftcore.trainer.roles import Role
from nftcore.trainer.seeding import rollout_noise

IMAGE_ROWS = 16
"""Rollouts (from whole rollout batches) in a `metrics.image_every` grid: enough to judge, small enough to look at."""


@dataclass
class Rollouts:
    """This rank's share of one epoch: clean latents, their conditioning, and the epoch-wide reward outcome."""

    indices: list[int]  # global sample indices, ascending (sample g = group·K + k)
    latents: torch.Tensor  # [n, N, C]
    cond: Any  # the family's conditioning for the n samples
    scores: torch.Tensor  # [n] float32, NaN where invalid
    valid: torch.Tensor  # [n] bool
    finite: torch.Tensor  # [n] bool: the rollout itself is finite (False: the policy diverged; never scored)
    unreadable: torch.Tensor  # [n] bool: the source image failed to decode (data.bad_lines=skip; a stand-in ran)
    groups: list[int] = field(default_factory=list)  # dataset rows of the epoch's G groups, the same on every rank
    reward_wait: float = 0.0  # seconds spent waiting for rewards after the last rollout call
    reward_errors: dict[str, int] = field(default_factory=dict)  # this rank's invalid rewards by reason


class RolloutWorker:
    """Rolls out and scores for `trainer` (its config, family, weights, reward and metrics, read at each call: a
    benchmark may swap the reward). `read` serves the evaluation's rows too, with the same bad-line handling."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._unreadable_ids: set[str] = set()  # sample ids whose image failed to decode (warned once each)

    @torch.no_grad()
    def run(self, epoch: int, groups: list[int]) -> Rollouts:
        """Sample and score this rank's share of epoch `epoch`, whose G groups are the dataset rows `groups`."""
        from concurrent.futures import ThreadPoolExecutor

        tr = self.trainer
        cfg, env, fam = tr.cfg, tr.env, tr.family
        k = cfg.sampling.group_size
        mine = tr.plan.rank_samples(env.rank)
        calls = tr.plan.rollout_batches(env.rank)
        latents, conds, futures, shown, finite, unreadable = [], [], [], [], [], []
        every = cfg.metrics.image_every
        show = env.is_main and every > 0 and (epoch + 1) % every == 0
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward"))
            deferred: list[tuple[torch.Tensor, list]] = []  # (edited, samples) for a sharded judge
            row = self._row_reader([groups[g // k] for g in mine], stack)
            bar = stack.enter_context(tr.metrics.progress(f"epoch {epoch} rollout", len(calls)))
            stack.enter_context(tr.weights_held("phase"))
            for indices in calls:
                padding = not indices  # this rank's share left the call empty: run it anyway (collectives), drop it
                indices = indices or mine[:1]
                samples, readable = zip(*(self.read(row, groups[g // k], g) for g in indices))
                cond = tr.conditioning(samples, [groups[g // k] for g in indices], "train", readable)
                noise = rollout_noise(cfg.run.seed, epoch, indices, fam.latent_shape).to(env.device)
                with tr.autocast(), tr.weights_held("batch"):
                    x0 = solve(tr.weights.velocity(cond, Role.OLD), noise, tr.sigmas, solver=cfg.sampling.solver)
                if padding:
                    bar.advance()
                    continue
                finite.append(torch.isfinite(x0.flatten(1)).all(dim=1).cpu())
                unreadable.append(~torch.tensor(readable))
                # A diverged policy's NaN rollout is an invalid sample, never a picture handed to the judge.
                edited = torch.nan_to_num(fam.decode(torch.where(finite[-1].to(x0.device).view(-1, 1, 1), x0, 0.0)))
                edited = edited.cpu()
                if tr.score_in_step:
                    deferred.append((edited, samples))
                else:
                    futures.append(pool.submit(self._score, edited, samples))
                if show and sum(len(e) for _, e in shown) < IMAGE_ROWS:
                    shown.append((fam.source_images(samples).cpu(), edited))
                latents.append(x0)
                conds.append(cond)
                bar.advance()
            waited = time.perf_counter()
            if tr.score_in_step:
                results = [self._score(torch.cat([e for e, _ in deferred]), [s for _, ss in deferred for s in ss])]
            else:
                results = [f.result() for f in futures]
            waited = time.perf_counter() - waited
        if shown:
            tr.metrics.log_images("rollouts", tr.step, Path(cfg.run.out) / "images" / f"epoch-{epoch:06d}.png",
                                  torch.cat([s for s, _ in shown]), torch.cat([e for _, e in shown]))
        scores = torch.cat([r.scores.float() for r in results])
        finite = torch.cat(finite)
        unreadable = torch.cat(unreadable)
        valid = torch.cat([r.valid & torch.isfinite(r.scores) for r in results]) & finite & ~unreadable
        return Rollouts(mine, torch.cat(latents), fam.cat_conditioning(conds), scores, valid, finite, unreadable,
                        groups=list(groups), reward_wait=waited, reward_errors=summarize_errors(results))

    def read(self, read: Callable[[int], Any], row: int, sample: int, dataset=None) -> tuple[Any, bool]:
        """(row `row`, True); with data.bad_lines=skip an image that fails to decode gives (a grey stand-in, False):
        the sample still runs, so every rank makes the same calls, and its group is dropped for the epoch."""
        tr = self.trainer
        try:
            return read(row), True
        except ImageDecodeError as err:
            if tr.cfg.data.bad_lines != "skip":
                raise
            dataset = dataset or tr.family.train_dataset
            if err.sample_id not in self._unreadable_ids:
                self._unreadable_ids.add(err.sample_id)
                tr.metrics.warn(f"{err} (data.bad_lines=skip: dropped from every epoch that draws it, counted as "
                                "unreadable_images)", every_rank=True)
            return dataset.placeholder(err.index if err.index is not None else row), False

    def _row_reader(self, rows: list[int], stack: contextlib.ExitStack) -> Callable[[int], Any]:
        """`read(i)` for the train dataset's rows `rows`: prefetched by data.num_workers threads, or on demand."""
        dataset, workers = self.trainer.family.train_dataset, self.trainer.cfg.data.num_workers
        if workers == 0:
            return dataset.__getitem__
        from concurrent.futures import ThreadPoolExecutor

        pool = stack.enter_context(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="data"))
        pending = {i: pool.submit(dataset.__getitem__, i) for i in dict.fromkeys(rows)}
        return lambda i: pending[i].result()

    def _score(self, edited: torch.Tensor, samples: list) -> Any:
        fam = self.trainer.family
        result = self.trainer.reward_fn(edited, fam.source_images(samples).cpu(), [s.prompt for s in samples],
                                        [fam.reward_metadata(s) for s in samples])
        if len(result) != len(samples):
            raise ValueError(f"reward returned {len(result)} scores for {len(samples)} samples")
        return result
