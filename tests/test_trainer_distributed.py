"""The trainer as a job: 1 rank vs 2 ranks (torchrun, gloo, FSDP2 or replicated) and kill -9 + `--resume latest`.

Each test launches `python -m nftcore.train` (or torchrun) as a subprocess with the tiny settings of test_trainer.py,
so what is tested is the command users run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from nftcore.trainer import read_metrics
from tests.helpers.jobs import TORCHRUN, Gated, run_job
from tests.helpers.tolerances import relative_gap
from tests.helpers.trainer import loss_trace, run_tiny, tiny_args

# Epochs of one optimizer step: K·G = 4 samples, as 1 rank × 4 rollout calls, 2 ranks × 2, or 3 ranks with shares of
# 2, 1, 1 (two calls each: ranks 1 and 2 pad one). Per-sample seeding and the global loss normalisation make every split
# the same computation up to fp32 rounding. An EMA evaluation after every epoch on 5 eval tasks in batches of 1 (two
# ranks take 3 calls each, the second rank padded with a copy), a checkpoint with its export after every epoch.
RANKS_ARGS = {"optim.steps_per_epoch": 1, "nft.decay_type": 1, "nft.kl_weight": 1e-2, "checkpoint.save_every": 1,
              "eval.every": 1, "eval.max_samples": 5, "eval.batch_size": 1}
LAYOUTS = {"fsdp2": (2, {}), "fsdp2-3-ranks": (3, {}), "hsdp": (2, {"parallel.replicate_degree": 2}),
           "replicated": (2, {"parallel.shard_transformer": False})}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_multirank_path_runs_to_its_end_and_matches_one_rank(tmp_path, layout):
    """FSDP2 sharding (2 and 3 ranks), HSDP as 2 replicas × 1 shard (the 2-D mesh with its cross-replica all-reduce)
    and replication with one gradient all-reduce per step, each through the command line: 2 epochs with an EMA
    evaluation after each (several eval calls per rank, a padded last slice), checkpoints and exports, the demo's
    final evaluation and pictures, exit 0; then the run resumed on 1 rank for a third epoch. Every loss and evaluation
    equals the one-process run's: an evaluation does not leak into training, and neither the split over ranks nor
    stacking the timesteps into one pass changes anything."""
    nproc, layout_args = LAYOUTS[layout]
    args = {**RANKS_ARGS, **layout_args}
    # In process (no process group, no FSDP), one thread, one timestep per pass; the jobs stack them (the default).
    run_tiny(tmp_path / "one", **{**args, "run.epochs": 3, "nft.timestep_chunk": 1})
    out = tmp_path / "many"
    run_job(tiny_args(out, **{**args, "run.epochs": 2}), nproc=nproc)
    many = loss_trace(out)
    for row in read_metrics(out / "metrics.jsonl"):  # throughput per rank, the unit peers publish
        assert abs(row["samples_per_s_per_rank"] * nproc - row["samples_per_s"]) <= 1e-9 * row["samples_per_s"]
    assert (out / "before_after.png").is_file()  # train.py's demo pictures, from rank 0's share
    last = out / "checkpoints" / "epoch-000002"
    assert (last / "COMPLETE").is_file() and (last / "lora_ema" / "peft").is_dir()
    run_job([*tiny_args(out, **{**args, "run.epochs": 3}), "--resume", "latest"])  # on a different world size
    one, resumed = loss_trace(tmp_path / "one"), loss_trace(out)
    print("1 rank ", one, f"\n{nproc} ranks", many, "\nresumed", resumed)
    assert len(one) == len(resumed) == 3 and len(many) == 2
    assert max(abs(a - b) for a, b in zip(one, resumed)) < 1e-5
    eval_one, eval_many = (read_metrics(tmp_path / run / "eval.jsonl") for run in ("one", "many"))
    assert [row["eval_samples"] for row in eval_many] == [5, 5, 5]
    assert max(abs(a["eval_reward"] - b["eval_reward"]) for a, b in zip(eval_one, eval_many)) < 1e-5


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
def test_the_default_demo_trains_alike_on_one_two_and_three_ranks(tmp_path):
    """`torchrun -m nftcore.train` with the demo's defaults (FSDP2, 64 samples: 32 + 32 or 22 + 21 + 21 per rank) and
    an EMA evaluation after every epoch: every run exits 0 with the one-process loss trace and evaluations.

    The tolerance comes from the computation: the same one-process run with other rollout batches
    (sampling.batch_size 11) shows how far fp32 rounding alone moves the trace; the ranks may differ by a few times
    that. An evaluation that leaked the EMA weights into training moved the third epoch by ~1e-4, far beyond it."""
    epochs = {"run.epochs": 3, "eval.every": 1, "metrics.progress": False}
    runs = {"one": (1, {}), "one-rebatched": (1, {"sampling.batch_size": 11}), "two": (2, {}), "three": (3, {})}
    for name, (nproc, extra) in runs.items():
        run_job([f"--{k}={v}" for k, v in {**epochs, **extra, "run.out": tmp_path / name}.items()], nproc=nproc)
    trace = {name: loss_trace(tmp_path / name) for name in runs}
    evals = {name: [row["eval_reward"] for row in read_metrics(tmp_path / name / "eval.jsonl")] for name in runs}
    rounding = relative_gap(trace["one"], trace["one-rebatched"])
    bound = 4 * rounding + 8 * torch.finfo(torch.float32).eps
    print("rounding", rounding, {name: relative_gap(trace["one"], trace[name]) for name in ("two", "three")})
    assert len(trace["one"]) == 3 * 4 and len(evals["one"]) == 3
    for name in ("two", "three"):
        assert relative_gap(trace["one"], trace[name]) <= bound, name
        assert relative_gap(evals["one"], evals[name]) <= bound + relative_gap(evals["one"], evals["one-rebatched"])


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
def test_a_one_rank_checkpoint_resumes_on_two_ranks(tmp_path):
    """DCP reshards on load: epoch 0 on one process, epoch 1 on two FSDP2 ranks, same losses as one process."""
    args = {"run.epochs": 2, "checkpoint.save_every": 1}
    run_tiny(tmp_path / "straight", **args)
    out = tmp_path / "moved"
    run_tiny(out, **{**args, "run.epochs": 1})
    run_job([*tiny_args(out, **args), "--resume", "latest"], nproc=2)
    straight, moved = loss_trace(tmp_path / "straight"), loss_trace(out)
    print("straight", straight, "\nresharded", moved)
    assert len(moved) == 4 and max(abs(a - b) for a, b in zip(straight, moved)) < 1e-5


def test_kill_minus_9_mid_epoch_then_resume_latest_matches_an_uninterrupted_run(tmp_path):
    args = {"run.epochs": 2, "checkpoint.save_every": 1}
    run_tiny(tmp_path / "straight", **args)  # in process, one thread: the same numbers as the job (see golden test)

    out = tmp_path / "killed"
    # K·G = 4 rollouts in calls of 1: reward call 5 is in epoch 1's rollouts, after epoch 0's checkpoint.
    job = Gated(tmp_path, tiny_args(out, **args), call=5)
    (pid,) = job.wait()
    os.kill(pid, signal.SIGKILL)
    job.finish()
    metrics = out / "metrics.jsonl"
    assert [row["epoch"] for row in _rows(metrics)] == [0, 0]
    assert [p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists()] == ["epoch-000001"]

    run_job([*tiny_args(out, **args), "--resume", "latest"])
    straight, resumed = loss_trace(tmp_path / "straight"), loss_trace(out)
    assert [r["step"] for r in _rows(metrics)] == [1, 2, 3, 4]
    assert resumed == straight


def test_sigterm_saves_at_the_epoch_boundary_and_exits(tmp_path):
    out = tmp_path / "term"
    job = Gated(tmp_path, tiny_args(out, **{"run.epochs": 5, "checkpoint.save_every": 0}), call=1)  # in epoch 0
    (pid,) = job.wait()
    os.kill(pid, signal.SIGTERM)
    job.release()
    code, stdout, stderr = job.finish()
    assert code == 0, stderr[-3000:]
    assert "SIGTERM: saved epoch 1" in stdout
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["epoch-000001"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
@pytest.mark.parametrize("layout", ["fsdp2", "hsdp", "replicated"])
def test_sigterm_on_two_ranks_saves_and_exits_zero(tmp_path, layout):
    """A scheduler's SIGTERM reaches the workers (as SLURM's does): each saves at the end of its epoch, together, and
    torchrun exits 0. The gate holds both ranks in epoch 1's rollouts (2 reward calls per rank per epoch)."""
    nproc, layout_args = LAYOUTS[layout]
    out = tmp_path / "term"
    args = tiny_args(out, **{"run.epochs": 5, "checkpoint.save_every": 0, **layout_args})
    job = Gated(tmp_path, args, call=2, nproc=nproc)
    for pid in job.wait():
        os.kill(pid, signal.SIGTERM)
    job.release()
    code, stdout, stderr = job.finish()
    assert code == 0, stderr[-3000:]
    assert "SIGTERM: saved epoch 2" in stdout
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["epoch-000002"]
    assert [row["epoch"] for row in _rows(out / "metrics.jsonl")] == [0, 0, 1, 1]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
def test_a_killed_rank_ends_the_whole_job(tmp_path):
    """Rank 1 dies (kill -9) while rank 0 goes on into a collective: torchrun stops rank 0 too and fails, rather than
    leaving it waiting forever. Resuming is then `--resume latest` (docs/TRAINING.md)."""
    out = tmp_path / "dead"
    job = Gated(tmp_path, tiny_args(out, **{"run.epochs": 5}), call=2, nproc=2)
    survivor, victim = job.wait()
    os.kill(victim, signal.SIGKILL)
    job.release([0])  # rank 0 goes on to the epoch's reward all-gather, which rank 1 never joins
    code, _, _ = job.finish(timeout=120)  # a bound for a hang, not a synchronisation
    assert code != 0
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)


def _rows(path: Path) -> list[dict]:
    import json

    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def test_hsdp_replicas_must_divide_the_world_size():
    from nftcore.trainer.distributed import DistEnv, _mesh

    with pytest.raises(ValueError, match="replicate_degree=3 does not divide the world size 4"):
        _mesh(DistEnv(rank=0, world_size=4), 3, init_device_mesh=None)
