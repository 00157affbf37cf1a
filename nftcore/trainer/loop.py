"""The Edit-R1 / DiffusionNFT training loop: rollouts → rewards → advantages and filter → NFT update → old policy.

`Trainer.run_epoch` is the algorithm, one phase per line; each phase hands the next a small typed value:

    rollout(epoch)            → `Rollouts`        this rank's G·K/ranks edits sampled with θ_old, scored (`rollout`)
    advantages(epoch, ...)    → `AdvantageStats`  r, the filter's survivors, reward statistics (`advantages`)
    train_epoch(...)            optimizer steps: `accumulate` → `StepTerms` (`step_terms`), `optimizer_step`
    update_old_policy()       → η                 θ_old's soft update towards θ
    periodic_eval(epoch)                          the EMA model on the eval split, every eval.every epochs

The policies are named by `roles.Role` (θ, θ_old, the reference) and held by a weights strategy (`weights`: LoRA
adapters or full copies); per-sample random draws come from `seeding`. In each pass of the update θ's forward comes
last, after the no-grad θ_old / reference forwards, so activation checkpointing recomputes it under the "default"
adapter; the step's logged terms add up on the device (`step_terms.StepSums`) and are read once at its end.

The epoch step by step: docs/DESIGN.md §2 and docs/ALGORITHM.md §5.3; one optimizer step: §1.8. Where it departs
from the official code, and why: per-sample seeding (§8, §11.13), the filter before micro-batching (§11.9), invalid
groups dropped, never scored 0 (§11.4), the loss normalised by the step's global count of (sample, timestep) pairs
with zero-weight padding micro-batches (§7, §11.12), and a divergence stops the run (§11.19).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nftcore.config import ConfigError, TrainConfig, batch_plan, config_to_toml
from nftcore.config.batching import even_split
from nftcore.family import PolicyFamily
from nftcore.nft import EMA, OldPolicySchedule, PromptBan
from nftcore.ops import nft_loss
from nftcore.reward.base import format_error_summary
from nftcore.sampling import sample as solve
from nftcore.trainer import checkpoint as ckpt
from nftcore.trainer.advantages import AdvantageStats, epoch_advantages
from nftcore.trainer.distributed import (
    DistEnv,
    all_gather_cat,
    all_reduce_max,
    average_gradients,
    barrier,
    init_distributed,
    loss_scale_for_reduction,
    weights_held,
)
from nftcore.trainer.errors import NonFiniteLossError
from nftcore.trainer.family import build_family
from nftcore.trainer.metrics import MetricsLogger
from nftcore.trainer.perf import FlopCounter, peak_memory_gb, reset_peak_memory, throughput
from nftcore.trainer.rewards import build_reward, judge_is_sharded
from nftcore.trainer.roles import EvalWeights, Role
from nftcore.trainer.rollout import IMAGE_ROWS, Rollouts, RolloutWorker
from nftcore.trainer.seeding import generator, rollout_noise, sample_timesteps, sample_train_noise
from nftcore.trainer.step_terms import PassVelocities, StepSums, StepTerms
from nftcore.trainer.trackers import build_trackers
from nftcore.trainer.weights import build_weights

MAX_NAN_STEPS = 3
"""Non-finite steps in a row before the run stops: one is a fluke worth skipping, several mean diverged weights."""


@dataclass
class VelocityFns:
    """The velocity functions `fn(x, sigma)` of one (stacked) conditioning: θ, θ_old, the reference (None when
    kl_weight = 0: not run), and, for LoRA with a KL term, θ_old and the reference fused into one forward over
    [rows; rows] (exact against two forwards; `Trainer.fuse_old_and_ref`)."""

    theta: Callable
    old: Callable
    ref: Callable | None = None
    old_and_ref: Callable | None = None


@dataclass
class EvalResult:
    """One evaluation of the eval split: the mean reward over its valid samples, each valid sample's score and split
    index (gathered from every rank, in split order), and this rank's edited images."""

    reward: float
    scores: torch.Tensor  # [n] fp32
    indices: torch.Tensor  # [n] int64, positions in the eval split
    images: torch.Tensor  # [rows of this rank, 3, H, W]


class Trainer:
    """Owns the model, optimizer, EMA, prompt ban and counters of one run; `train()` runs it to the end.

    `family` / `reward_fn` / `loss_fn` default to what the config names; tests pass their own (e.g. a reward that
    fails, a loss that returns NaN). `finetune` ('lora' or 'full'), when given, overrides `model.finetune` (and is
    what the run's config.toml then records).
    """

    fuse_old_and_ref = True
    """With LoRA and kl_weight > 0, θ_old and the reference run as one forward over [rows; rows] (exact against two
    forwards); the epoch benchmark switches it off to measure what it buys."""

    def __init__(self, cfg: TrainConfig, *, env: DistEnv | None = None, family: PolicyFamily | None = None,
                 reward_fn: Callable | None = None, loss_fn: Callable = nft_loss, max_nan_steps: int = MAX_NAN_STEPS,
                 echo: bool = True, finetune: str | None = None):
        if finetune is not None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, finetune=finetune))
        self.cfg = cfg
        self.env = env or init_distributed(cfg)
        cfg.check_world_size(self.env.world_size)
        self.plan = batch_plan(cfg, self.env.world_size)
        if self.env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.optim.allow_tf32
        torch.manual_seed(cfg.run.seed)
        self.family = family or build_family(cfg, self.env.device, env=self.env)
        self.reward_fn = reward_fn or build_reward(cfg, self.family, self.env)
        self.score_in_step = judge_is_sharded(cfg, self.env)
        self.loss_fn, self.max_nan_steps = loss_fn, max_nan_steps
        self.model = self.family.transformer
        self.weights = build_weights(self.family, cfg, generator(cfg.run.seed, "lora-init"))
        self.weights.place(self.env, cfg)  # activation checkpointing, FSDP2, full fine-tuning's fp32 masters
        self.params = self.weights.trainable()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.ema = EMA(self.weights.state(Role.THETA), decay=cfg.nft.ema_decay)
        self.old_schedule = OldPolicySchedule.preset(cfg.nft.decay_type)
        self.ban = PromptBan(cfg.filter.mean_threshold, cfg.filter.std_threshold)
        self.sigmas = self.family.sigmas(cfg.sampling.num_steps)
        self.eval_rewards: list[tuple[int, float]] = []
        self.last_eval: tuple[int, EvalResult] | None = None  # (epochs done, that evaluation)
        self.step = self.epoch = 0
        self.nan_in_a_row = self.nan_skipped = 0
        self.metrics = MetricsLogger(cfg.run.metrics_path, enabled=self.env.is_main, log_every=cfg.metrics.log_every,
                                     echo=echo, trackers=build_trackers(cfg) if self.env.is_main else [],
                                     progress=cfg.metrics.progress)
        self.flops = FlopCounter(self.weights.models())
        self.epoch_rewards: list[float] = []
        self._stop_requested = False
        self.rollout_worker = RolloutWorker(self)
        from nftcore.trainer.conditioning_cache import ConditioningCache  # data.cache_conditioning; 'off': as is
        self.conditioning = ConditioningCache.for_run(cfg, self.family, self.env, metrics=self.metrics)

    # ------------------------------------------------------------------------------------------------ run

    def train(self) -> dict[str, Any]:
        """Check the run folder, resume if asked, run the remaining epochs, checkpoint on schedule, at the end and on
        SIGTERM.

        Before the first epoch: a new run in a folder that holds one, an unwritable checkpoint folder, a resume whose
        config changed what the checkpoint's weights or trajectory depend on are ConfigErrors; an unusable checkpoint
        is a CheckpointError (`--resume latest` falls back to an older one). See `run_folder` and `checkpoint`."""
        from nftcore.trainer.run_folder import check_resume_config, prepare_run_folder

        cfg = self.cfg
        self.metrics.info(f"# effective config\n{config_to_toml(cfg)}")
        self.metrics.info(f"# {self.plan.summary()}")
        prepare_run_folder(cfg, self.env, log=self.metrics.info)
        resume = ckpt.resume_from(
            cfg.checkpoint.resume, cfg.run.checkpoint_dir, self.env, load=self.load, log=self.metrics.info,
            check=lambda path: check_resume_config(cfg, path, self.env, finetune=self.weights.kind,
                                                   log=self.metrics.info))
        if resume is not None:
            dropped = self.metrics.truncate_from(self.epoch)
            self.metrics.info(f"# resumed from {resume} at epoch {self.epoch}, step {self.step} "
                              f"({dropped} later metrics rows dropped)")
        else:
            self.metrics.truncate_from(0)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        try:
            last_saved = self.epoch if resume is not None else -1
            while self.epoch < cfg.run.epochs:
                self.run_epoch(self.epoch)
                self.epoch += 1
                stop = all_reduce_max(float(self._stop_requested), self.env) > 0
                every = cfg.checkpoint.save_every
                if (every and self.epoch % every == 0) or self.epoch == cfg.run.epochs or stop:
                    self.save()
                    last_saved = self.epoch
                if stop:
                    self.metrics.info(f"# SIGTERM: saved epoch {self.epoch} and stopping")
                    break
            if last_saved != self.epoch:
                self.save()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.metrics.close()
        return {"epoch": self.epoch, "step": self.step, "epoch_rewards": self.epoch_rewards,
                "eval_rewards": self.eval_rewards,
                "nan_skipped": self.nan_skipped}

    def autocast(self):
        """bf16 autocast of the forwards on CUDA when optim.mixed_precision = 'bf16' (the reference's setting); a
        no-op on CPU, where the demo and the tests run in fp32. Full fine-tuning of an unsharded model in a low
        model.dtype autocasts to it on any device: the fp32 masters then compute as the bf16 model would (FSDP2's
        MixedPrecisionPolicy does that when sharded)."""
        dtype = self._unsharded_compute_dtype()
        if dtype is None and self.cfg.optim.mixed_precision == "bf16" and self.env.device.type == "cuda":
            dtype = torch.bfloat16
        return torch.autocast(self.env.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _unsharded_compute_dtype(self) -> torch.dtype | None:
        weights = self.weights
        sharded = self.env.world_size > 1 and self.cfg.parallel.shard_transformer
        if weights.kind != "full" or sharded or weights.compute_dtype == weights.master_dtype:
            return None
        return weights.compute_dtype

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_requested = True

    # ------------------------------------------------------------------------------------------------ epoch

    def run_epoch(self, epoch: int) -> None:
        """One epoch of the algorithm (see the module docstring), then its summary line and epochs.jsonl row."""
        reset_peak_memory(self.env.device)
        self.flops.take()  # drop whatever ran since (an evaluation)
        t0 = time.perf_counter()
        rollouts = self.rollout(epoch)  # 1. G·K edits sampled with θ_old, scored by the judge
        t1 = time.perf_counter()
        stats = self.advantages(epoch, rollouts)  # 2. r and the low-variance filter over the whole epoch
        self.epoch_rewards.append(stats.reward_mean)
        times = self._rollout_times(rollouts, t1 - t0)
        self.train_epoch(epoch, rollouts, stats, times)  # 3. optimizer steps on the surviving samples
        t2 = time.perf_counter()
        eta = self.update_old_policy()  # 4. θ_old moves towards θ
        summary = self._epoch_summary(epoch, stats, times, eta, update=t2 - t1, seconds=time.perf_counter() - t0)
        self.metrics.log_epoch(summary)
        every = self.cfg.eval.every
        if every and (epoch + 1) % every == 0:
            self.periodic_eval(epoch)  # 5. the EMA model on the eval split
        self._report_epoch(epoch, stats, rollouts, summary, time.perf_counter() - t0)
        barrier(self.env)

    def epoch_groups(self, epoch: int) -> list[int]:
        """Dataset indices of this epoch's G groups (banned prompts excluded when the ban is on)."""
        banned = self.ban if self.cfg.filter.ban_prompts else frozenset()
        try:
            return self.family.train_dataset.epoch_prompts(self.cfg.sampling.groups_per_epoch, epoch,
                                                           self.cfg.run.seed, banned)
        except ValueError as err:
            raise ConfigError(f"cannot draw epoch {epoch}'s prompts: {err} ({len(self.ban)} banned by the "
                               "low-variance rule; lower sampling.groups_per_epoch or turn filter.ban_prompts off)"
                               ) from err

    def rollout(self, epoch: int) -> Rollouts:
        """This rank's share of the epoch, sampled with θ_old and scored (`rollout.RolloutWorker`)."""
        return self.rollout_worker.run(epoch, self.epoch_groups(epoch))

    def advantages(self, epoch: int, rollouts: Rollouts) -> AdvantageStats:
        """r, the low-variance filter and the prompt ban over the whole epoch (`advantages.epoch_advantages`)."""
        return epoch_advantages(epoch, rollouts, self.cfg, self.env, ban=self.ban,
                                dataset=self.family.train_dataset, log=self.metrics.info)

    def update_old_policy(self) -> float:
        """θ_old ← η·θ_old + (1 − η)·θ after the epoch, η from `nft.decay_type`'s schedule; returns η."""
        return self.old_schedule.update(self.weights.state(Role.OLD), self.weights.state(Role.THETA), self.step)

    def weights_held(self, scope: str):
        """The policy's FSDP2 weights gathered once for the whole `scope` ('batch': one rollout or evaluation call;
        'phase': all of an epoch's rollouts or one evaluation) when `parallel.rollout_reshard` names it, instead of
        once per sampler step; see `distributed.weights_held`."""
        if self.cfg.parallel.rollout_reshard != scope:
            return contextlib.nullcontext()
        return weights_held(self.weights.models())

    def _rollout_times(self, rollouts: Rollouts, seconds: float) -> dict[str, float]:
        """The rollout phase's times and throughput, logged with every step of the epoch."""
        sampling = seconds - rollouts.reward_wait
        rollout = throughput(self.flops.take(), sampling, self.env.device)
        return {"time_rollout": sampling, "time_reward_wait": rollouts.reward_wait,
                "rollout_samples_per_s_per_rank": len(rollouts.indices) / max(seconds, 1e-9),
                "rollout_tflops": rollout["tflops"], "rollout_mfu": rollout["mfu"]}

    def _epoch_summary(self, epoch: int, stats: AdvantageStats, times: dict[str, float], eta: float, *,
                       update: float, seconds: float) -> dict[str, Any]:
        """The epochs.jsonl row. Samples per rank per second count rollouts to old-policy update (the unit other
        trainers publish: samples/card/s); evaluation is not part of it."""
        env = self.env
        return {"epoch": epoch, "step": self.step, **stats.logged(), "old_policy_eta": eta,
                "time_rollout": times["time_rollout"], "time_reward_wait": times["time_reward_wait"],
                "time_update": update, "time_epoch": seconds,
                "samples_per_s_per_rank": self.plan.samples_per_epoch / env.world_size / seconds,
                "rollout_samples_per_s_per_rank": times["rollout_samples_per_s_per_rank"],
                "peak_memory_gb": peak_memory_gb(env.device)}

    def _report_epoch(self, epoch: int, stats: AdvantageStats, rollouts: Rollouts, summary: dict[str, Any],
                      seconds: float) -> None:
        self.metrics.info(f"epoch {epoch}: reward {stats.reward_mean:.4f} ± {stats.reward_std:.4f} over "
                          f"{stats.valid_samples} samples, filtered {stats.filtered_fraction:.2f}, "
                          f"dropped groups {stats.dropped_groups}, old-policy η {summary['old_policy_eta']:.3f}, "
                          f"{summary['samples_per_s_per_rank']:.3g} samples/s/rank, {seconds:.1f} s")
        if rollouts.reward_errors:
            rank = f" (rank {self.env.rank})" if self.env.world_size > 1 else ""
            self.metrics.warn(f"epoch {epoch}{rank}: {format_error_summary(rollouts.reward_errors)}", every_rank=True)

    # ------------------------------------------------------------------------------------------------ update

    def train_epoch(self, epoch: int, rollouts: Rollouts, stats: AdvantageStats, times: dict[str, float]) -> None:
        """The epoch's optimizer steps: the survivors, shuffled alike on every rank, split evenly into
        optim.steps_per_epoch chunks; per chunk `accumulate` and `optimizer_step`, and one metrics row."""
        cfg, env = self.cfg, self.env
        survivors = torch.nonzero(stats.train).flatten()
        survivors = survivors[torch.randperm(survivors.numel(), generator=generator(cfg.run.seed, epoch, "order"))]
        chunks = torch.tensor_split(survivors, cfg.optim.steps_per_epoch)
        rewards = {k: v for k, v in stats.logged().items() if k != "valid_samples"}
        with self.metrics.progress(f"epoch {epoch} update", len(chunks)) as bar:
            for chunk in chunks:
                if chunk.numel() == 0:
                    self.metrics.info(f"epoch {epoch}: no surviving samples for an optimizer step; step skipped")
                    bar.advance()
                    continue
                self.flops.take()
                t0 = time.perf_counter()
                terms = self.accumulate(epoch, rollouts, stats.r, chunk.tolist())
                row = self.optimizer_step(terms)
                dt = time.perf_counter() - t0
                row = {"epoch": epoch, "step": self.step, **row, **rewards, "banned_prompts": len(self.ban),
                       "trained_samples": chunk.numel(), "samples_per_s": chunk.numel() / dt,
                       "samples_per_s_per_rank": chunk.numel() / dt / env.world_size,
                       **throughput(self.flops.take(), dt, env.device),
                       **times, "time_train": dt, "peak_memory_gb": peak_memory_gb(env.device)}
                self.metrics.log_step(row)
                bar.advance()

    def accumulate(self, epoch: int, rollouts: Rollouts, r_global: torch.Tensor, chunk: list[int]) -> StepTerms:
        """Forward/backward of one optimizer step's samples (global indices `chunk`); return its logged terms, summed
        over every rank.

        A micro-batch's T_train timesteps go through the model `nft.timestep_chunk` at a time as stacked rows
        (timestep-major: row j·B + b is sample b at its j-th timestep), each row with its own σ, noise, r and
        conditioning, so one forward and one backward serve B × chunk (sample, timestep) pairs. The loss is the
        masked mean over the rows times their share of the step's global count: the same sum as one pass per
        timestep. Nothing here waits for the device: the weights of the terms are known on the host, the logged
        terms add up on the device, and non-finite values show in the step's sums and gradient norm at its end."""
        cfg, env, fam, plan = self.cfg, self.env, self.family, self.plan
        t_train = plan.train_timesteps
        per_pass = cfg.nft.timestep_chunk or t_train
        owners = [plan.owner(g) for g in chunk]
        micro_batches = max(math.ceil(owners.count(rank) / plan.batch_size) for rank in range(env.world_size))
        first = rollouts.indices[0]
        mine = [g - first for g, owner in zip(chunk, owners) if owner == env.rank]  # local positions
        denom = len(chunk) * t_train
        reduce_scale = loss_scale_for_reduction(env)
        sums = StepSums(env.device, reference=cfg.nft.kl_weight > 0)
        grid = self.sigmas[:-1].to(torch.float32)
        shape = tuple(fam.latent_shape)
        for local in even_split(mine, micro_batches):  # the same count on every rank, each ≤ sampling.batch_size
            weight = 1.0
            if not local:  # padding: keep this rank's collectives in step with the others, contribute nothing
                local, weight = [0], 0.0
            batch = len(local)
            index = torch.tensor(local)
            x0 = rollouts.latents[index.to(rollouts.latents.device)]
            cond = fam.index_conditioning(rollouts.cond, index)
            r = r_global[[rollouts.indices[i] for i in local]].to(env.device)
            steps = torch.stack([sample_timesteps(cfg.run.seed, epoch, rollouts.indices[i], cfg.sampling.num_steps,
                                                  t_train) for i in local])  # [B, T]
            noise = torch.stack([sample_train_noise(cfg.run.seed, epoch, rollouts.indices[i], t_train, shape)
                                 for i in local])  # [B, T, N, C]
            velocities: dict[int, VelocityFns] = {}  # by rows per pass (the last pass may be shorter)
            for j0 in range(0, t_train, per_pass):
                js = list(range(j0, min(j0 + per_pass, t_train)))
                rows = len(js)
                if rows not in velocities:
                    velocities[rows] = self.velocity_fns(cond, batch, rows)
                t = grid[steps[:, js].T.reshape(-1)].to(env.device)  # [rows·B]
                eps = noise[:, js].transpose(0, 1).reshape(rows * batch, *shape).to(env.device, x0.dtype)
                x0_rows = x0.repeat(rows, *([1] * (x0.dim() - 1)))
                tv = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
                x_t = (1.0 - tv) * x0_rows + tv * eps
                mask = torch.full((rows * batch,), weight, device=env.device)
                scale = weight * rows * batch / denom  # = mask.sum() / denom, known without asking the device
                try:
                    out, v = self.nft_terms(velocities[rows], x_t, x0_rows, t, r.repeat(rows), mask)
                    (out.loss * (scale * reduce_scale)).backward()
                except torch.OutOfMemoryError as err:
                    raise _rows_do_not_fit(err, rows, batch, per_pass, t_train) from err
                sums.add_loss(out, scale)
                if weight:
                    sums.add_diagnostics(x0, v, rows)
        return sums.total(env)

    def velocity_fns(self, cond: Any, batch: int, rows: int) -> VelocityFns:
        """θ's, θ_old's and the reference's velocities for `rows` timesteps × `batch` samples of `cond`."""
        fam, kl = self.family, self.cfg.nft.kl_weight > 0
        stacked = cond if rows == 1 else fam.index_conditioning(cond, torch.arange(batch).repeat(rows))
        velocity = self.weights.velocity
        fns = VelocityFns(theta=velocity(stacked, Role.THETA), old=velocity(stacked, Role.OLD),
                          ref=velocity(stacked, Role.REF) if kl else None)
        if self.fuse_old_and_ref and self.weights.kind == "lora" and kl:
            doubled = fam.index_conditioning(cond, torch.arange(batch).repeat(2 * rows))
            fns.old_and_ref = self.weights.old_and_ref_velocity(doubled)
        return fns

    def nft_terms(self, velocity: VelocityFns, x_t, x0, t, r, mask) -> tuple[Any, PassVelocities]:
        """`nft_loss` of one pass and its three velocities; θ's forward runs last, so activation checkpointing
        recomputes it under θ's adapter."""
        nft = self.cfg.nft
        with self.autocast():
            with torch.no_grad():
                if velocity.old_and_ref is not None:  # LoRA: the two differ only in the adapter: one forward
                    v_old, v_ref = velocity.old_and_ref(torch.cat([x_t, x_t]), torch.cat([t, t])).chunk(2)
                else:
                    v_old = velocity.old(x_t, t)
                    v_ref = velocity.ref(x_t, t) if velocity.ref is not None else None
            v_theta = velocity.theta(x_t, t)
            # No value checks here: a NaN from diverged weights flows into the step's sums and gradient norm, where
            # optimizer_step skips the step on every rank alike (the backward still runs, so collectives stay in
            # step).
            out = self.loss_fn(v_theta, v_old, x_t, x0, t, r, beta=nft.beta, loss_scale=nft.adv_clip_max, mask=mask,
                               v_ref=v_ref, kl_weight=nft.kl_weight, negative_weight=nft.negative_weight,
                               check_values=False)
        return out, PassVelocities(v_theta, v_old, v_ref)


    def optimizer_step(self, terms: StepTerms) -> dict[str, Any]:
        """Clip, step AdamW, update the EMA; or skip the step on a non-finite loss or gradient. Returns the step's
        metrics-row fields."""
        loss = terms.loss
        if not self.cfg.parallel.shard_transformer:
            average_gradients(self.params, self.env)  # replicated: what FSDP2's reduce-scatter does otherwise
        max_norm = self.cfg.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_in_a_row += 1
            self.nan_skipped += 1
            if self.nan_in_a_row >= self.max_nan_steps:
                raise NonFiniteLossError(
                    f"{self.nan_in_a_row} optimizer steps in a row had a non-finite loss or gradient (last: loss "
                    f"{loss}, grad norm {grad_norm}); stopping without saving these weights. Likely causes: a "
                    f"learning rate too high for these weights (optim.lr = {self.cfg.optim.lr:g}), no gradient "
                    f"clipping (optim.max_grad_norm = {self.cfg.optim.max_grad_norm:g}), or fp16 overflow; resume "
                    "from the last checkpoint with a lower optim.lr")
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.step(self.weights.state(Role.THETA))
            self.nan_in_a_row = 0
            self.step += 1
        return {**terms.logged(), "grad_norm": grad_norm, "lr": self.cfg.optim.lr, "nan_skipped": int(skipped),
                "nan_skipped_total": self.nan_skipped}

    # ------------------------------------------------------------------------------------------------ eval

    def periodic_eval(self, epoch: int) -> None:
        """The EMA model on the eval split after `epoch`: its mean reward to the log, OUT/eval.jsonl and the trackers,
        a grid (source | edit) of the first samples to OUT/images/ and the trackers; kept as `last_eval`."""
        cfg = self.cfg
        t0 = time.perf_counter()
        result = self.evaluate(EvalWeights.EMA)
        reward, images = result.reward, result.images
        self.eval_rewards.append((epoch + 1, reward))
        self.last_eval = (epoch + 1, result)
        self.metrics.log_eval({"epoch": epoch, "step": self.step, "eval_reward": reward,
                               "eval_samples": self.eval_count(), "time_eval": time.perf_counter() - t0})
        rows = min(IMAGE_ROWS, images.shape[0])
        if rows and self.env.is_main:  # rank 0 holds the split's first samples; the grid is only written there
            sources = self.family.source_images([self.family.eval_dataset[i] for i in range(rows)]).cpu()
            self.metrics.log_images("eval", self.step, Path(cfg.run.out) / "images" / f"eval-epoch-{epoch:06d}.png",
                                    sources, images[:rows])
        self.metrics.info(f"epoch {epoch}: eval reward (EMA, {cfg.eval.num_steps} {cfg.eval.solver} steps, "
                          f"{self.eval_count()} samples) {reward:.4f}")

    @contextlib.contextmanager
    def ema_swapped(self):
        """The EMA weights in θ's place for no-grad forwards. FSDP2 keeps the last block gathered after a no-grad
        forward; it is resharded before θ comes back, so no gathered EMA copy outlives the swap."""
        with self.ema.swapped(self.weights.state(Role.THETA)):  # state() reshards first
            try:
                yield
            finally:
                self.weights.reshard()

    def eval_count(self) -> int:
        """Samples in one evaluation (the eval split, capped by eval.max_samples)."""
        n = len(self.family.eval_dataset)
        return n if not self.cfg.eval.max_samples else min(n, self.cfg.eval.max_samples)

    @torch.no_grad()
    def evaluate(self, weights: EvalWeights | str = EvalWeights.EMA, limit: int | None = None) -> EvalResult:
        """The eval split with fixed noise: the mean reward, every valid sample's score and split index (all ranks),
        and this rank's edited images (rank 0: the split's first samples); `weights` is an `EvalWeights`: the EMA
        swapped into θ's place, θ as is, or the base model.

        The split is cut into one contiguous slice per rank and the rewards are all-gathered, as the reference does.
        Slices are padded to equal length with copies of their last sample (scored, then dropped), so every rank
        makes the same calls (FSDP2's collectives stay in step); the noise is drawn per sample index, so the result
        does not depend on the number of ranks."""
        cfg, fam, env = self.cfg, self.family, self.env
        data = fam.eval_dataset
        count = self.eval_count() if limit is None else min(self.eval_count(), limit)
        if count == 0:
            return EvalResult(float("nan"), torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0))
        per = math.ceil(count / env.world_size)
        first = env.rank * per
        indices = [min(i, count - 1) for i in range(first, first + per)]
        real = torch.tensor([i < count for i in range(first, first + per)])
        images, scores, valid = [], [], []
        weights = EvalWeights(weights)
        which = Role.REF if weights is EvalWeights.BASE else Role.THETA
        with contextlib.ExitStack() as stack:
            if weights is EvalWeights.EMA:
                stack.enter_context(self.ema_swapped())  # once for the split, so 'phase' gathers it once
            stack.enter_context(self.weights_held("phase"))
            for start in range(0, per, cfg.eval.batch_size):
                index = indices[start:start + cfg.eval.batch_size]
                batch, readable = zip(*(self.rollout_worker.read(data.__getitem__, i, i, data) for i in index))
                cond = self.conditioning(batch, index, "eval", readable)
                noise = rollout_noise(cfg.run.seed, -1, index, fam.latent_shape).to(env.device)
                with self.autocast(), self.weights_held("batch"):
                    x0 = solve(self.weights.velocity(cond, which), noise, fam.sigmas(cfg.eval.num_steps),
                               solver=cfg.eval.solver)
                finite = torch.isfinite(x0.flatten(1)).all(dim=1)
                edited = torch.nan_to_num(fam.decode(torch.where(finite.view(-1, 1, 1), x0, 0.0))).cpu()
                result = self.reward_fn(edited, fam.source_images(batch).cpu(), [s.prompt for s in batch],
                                        [fam.reward_metadata(s) for s in batch])
                images.append(edited)
                scores.append(result.scores.float())
                valid.append(result.valid & torch.isfinite(result.scores) & finite.cpu() & torch.tensor(readable))
        keep = all_gather_cat(torch.cat(valid) & real, env)
        scores = all_gather_cat(torch.nan_to_num(torch.cat(scores)), env)[keep]
        split_index = all_gather_cat(torch.tensor(indices), env)[keep]
        reward = float(scores.double().mean()) if scores.numel() else float("nan")
        return EvalResult(reward, scores, split_index, torch.cat(images)[real])

    # ------------------------------------------------------------------------------------------------ checkpoints

    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "ema_updates": self.ema.num_updates, "prompt_ban": self.ban.state_dict(),
                "nan_in_a_row": self.nan_in_a_row, "nan_skipped": self.nan_skipped,
                "epoch_rewards": self.epoch_rewards, "eval_rewards": self.eval_rewards}

    def save(self) -> Path:
        cfg = self.cfg
        self._refuse_non_finite_weights()
        export = self._export_lora if cfg.checkpoint.export_lora else None
        state = {**self.trainer_state(), "finetune": self.weights.kind}  # a resume checks it: lora or full
        path = ckpt.save_checkpoint(cfg.run.checkpoint_dir, self.epoch, weights=self.weights,
                                    optimizer=self.optimizer, ema=self.ema, trainer_state=state,
                                    config_toml=config_to_toml(cfg), env=self.env,
                                    keep_latest=cfg.checkpoint.keep_latest, export=export, log=self.metrics.info)
        self.metrics.info(f"# saved {path}")
        return path

    def _refuse_non_finite_weights(self) -> None:
        """A checkpoint of NaN/inf weights would only hide the last good one from `--resume latest`: stop instead.
        One flag per rank (the local shards), agreed over ranks."""
        tensors = [*self.params, *self.ema.shadow.values()]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        bad = float(not all(bool(torch.isfinite(t).all()) for t in local))
        if all_reduce_max(bad, self.env) > 0:
            raise NonFiniteLossError(
                f"epoch {self.epoch}: the trained weights are not finite; no checkpoint written. Likely causes: a "
                f"learning rate too high (optim.lr = {self.cfg.optim.lr:g}) or fp16 overflow; resume from the last "
                "checkpoint with a lower optim.lr")

    def _export_lora(self, path: Path) -> None:
        """EMA weights as PEFT and diffusers LoRA files (lora_ema/), or a diffusers transformer folder for full
        fine-tuning (ema/transformer/, in model.dtype). Gathering sharded weights is a collective, so every rank
        exports; for LoRA, ranks other than 0 write to a scratch folder that is removed."""
        import shutil

        if self.weights.kind == "full":  # streamed: only rank 0 writes, the others join the gathers
            with self.ema.swapped(self.weights.state(Role.THETA)):
                self.weights.export(path / "ema", write=self.env.is_main)
            return
        out = path / "lora_ema" if self.env.is_main else path / f".scratch-rank{self.env.rank}"
        with self.ema.swapped(self.weights.state(Role.THETA)):
            self.weights.export(out)
        if not self.env.is_main:
            shutil.rmtree(out, ignore_errors=True)

    def load(self, path: Path) -> None:
        """Restore the run's state from checkpoint `path`; CheckpointError (one line, every rank) if it cannot."""
        state = ckpt.load_checkpoint(path, weights=self.weights, optimizer=self.optimizer, ema=self.ema, env=self.env)
        try:
            self.step, self.epoch = state["step"], state["epoch"]
            self.ema.num_updates = state["ema_updates"]
            self.ban.load_state_dict(state["prompt_ban"])
            self.nan_in_a_row, self.nan_skipped = state["nan_in_a_row"], state["nan_skipped"]
            self.epoch_rewards = list(state["epoch_rewards"])
            self.eval_rewards = [tuple(x) for x in state.get("eval_rewards", [])]
        except (KeyError, TypeError, ValueError) as err:
            raise ckpt.CheckpointError(f"{Path(path) / ckpt.TRAINER_STATE} lacks or garbles {err}") from None
        for group in self.optimizer.param_groups:  # the optimizer state brought the saved lr; optim.lr may change
            group["lr"] = self.cfg.optim.lr


def _rows_do_not_fit(err: BaseException, rows: int, batch: int, per_pass: int, t_train: int) -> RuntimeError:
    return RuntimeError(f"out of memory in a training pass of {rows} timestep(s) × {batch} sample(s) = {rows * batch} "
                        f"rows (nft.timestep_chunk = {per_pass or t_train} of T_train = {t_train}); lower "
                        f"--nft.timestep_chunk (1 is one timestep per pass) or sampling.batch_size: {err}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
