"""The trainer as a job: 1 rank vs 2 ranks (torchrun, gloo, FSDP2 or replicated) and kill -9 + `--resume latest`.

Each test launches `python -m nftcore.train` (or torchrun) as a subprocess with the tiny settings of test_trainer.py,
so what is tested is the command users run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nftcore.trainer import read_metrics
from tests.test_trainer import run_tiny, tiny_args

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_job(args: list[str], *, nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "nftcore.train", *args]
    else:
        cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "nftcore.train", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl")]


# 3 epochs of one optimizer step: K·G = 4 samples split as 1 rank × 4 batches or 2 ranks × 2 batches of 1; the
# per-sample seeding and the global loss normalisation make the two runs the same computation up to fp32 rounding.
# One evaluation after the last epoch on 5 eval tasks: 2 ranks take 3 each, the second padded with a copy.
RANKS_ARGS = {"run.epochs": 3, "optim.steps_per_epoch": 1, "nft.decay_type": 1, "nft.kl_weight": 1e-2,
              "checkpoint.save_every": 0, "eval.every": 3, "eval.max_samples": 5}


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
@pytest.mark.parametrize("layout", ["fsdp2", "replicated", "hsdp"])
def test_one_rank_and_two_ranks_give_the_same_loss_trace(tmp_path, layout):
    """FSDP2 sharding, replication with one gradient all-reduce per step (parallel.shard_transformer=false), and HSDP
    as 2 replicas x 1 shard (parallel.replicate_degree=2: the 2-D mesh path with its cross-replica all-reduce)."""
    args = {**RANKS_ARGS, "parallel.shard_transformer": layout != "replicated",
            "parallel.replicate_degree": 2 if layout == "hsdp" else 1}
    run_tiny(tmp_path / "one", **args)  # in process (no process group, no FSDP), one thread like the job
    run_job(tiny_args(tmp_path / "two", **args), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    print("1 rank ", one, "\n2 ranks", two)
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5
    (eval_one,), (eval_two,) = (read_metrics(tmp_path / run / "eval.jsonl") for run in ("one", "two"))
    assert eval_one["eval_samples"] == eval_two["eval_samples"] == 5
    assert abs(eval_one["eval_reward"] - eval_two["eval_reward"]) < 1e-5  # the split over ranks changes nothing
    assert (tmp_path / "two" / "before_after.png").is_file()  # train.py's demo pictures, from rank 0's share
    assert (tmp_path / "two" / "checkpoints" / "epoch-000003" / "COMPLETE").is_file()
    assert (tmp_path / "two" / "checkpoints" / "epoch-000003" / "lora_ema" / "peft").is_dir()


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
def test_a_one_rank_checkpoint_resumes_on_two_ranks(tmp_path):
    """DCP reshards on load: epoch 0 on one process, epoch 1 on two FSDP2 ranks, same losses as one process."""
    args = {"run.epochs": 2, "checkpoint.save_every": 1}
    run_tiny(tmp_path / "straight", **args)
    out = tmp_path / "moved"
    run_tiny(out, **{**args, "run.epochs": 1})
    run_job([*tiny_args(out, **args), "--resume", "latest"], nproc=2)
    straight, moved = losses(tmp_path / "straight"), losses(out)
    print("straight", straight, "\nresharded", moved)
    assert len(moved) == 4 and max(abs(a - b) for a, b in zip(straight, moved)) < 1e-5


def test_kill_minus_9_mid_epoch_then_resume_latest_matches_an_uninterrupted_run(tmp_path):
    args = {"run.epochs": 2, "checkpoint.save_every": 1}
    run_tiny(tmp_path / "straight", **args)  # in process, one thread: the same numbers as the job (see golden test)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "nftcore.train", *tiny_args(out, **args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    try:
        # The first row of epoch 1 is written after epoch 0's checkpoint and before epoch 1 ends: mid-epoch.
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and any(row["epoch"] == 1 for row in _rows(metrics)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert any(row["epoch"] == 1 for row in _rows(metrics))
    assert [p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists()] == ["epoch-000001"]

    run_job([*tiny_args(out, **args), "--resume", "latest"])
    straight, resumed = losses(tmp_path / "straight"), losses(out)
    assert [r["step"] for r in _rows(metrics)] == [1, 2, 3, 4]
    assert resumed == straight


def test_sigterm_saves_at_the_epoch_boundary_and_exits(tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "nftcore.train", *tiny_args(out, **{"run.epochs": 5, "checkpoint.save_every": 0})]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (metrics.is_file() and _rows(metrics)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # during epoch 0
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved epoch 1" in stdout
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["epoch-000001"]


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
