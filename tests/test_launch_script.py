"""scripts/train.sh: it parses, `--dry-run` prints the torchrun command for one node and for a rendezvous over
several, arguments pass through untouched, and one real launch (one CPU process) trains, so every torchrun flag the
script writes is one this torchrun accepts."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.trainer import tiny_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.sh"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("NGPU", "NNODES", "RDZV_ENDPOINT", "RDZV_ID",
                                                                  "LOG_RANK", "TORCHRUN", "PYTORCH_ALLOC_CONF")}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


def dry_run(*args: str, **env: str) -> list[str]:
    result = launch("--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_single_node_dry_run_passes_config_and_overrides_through():
    cmd = dry_run("--config", "qwen_image_edit_r1", "--run.out=runs/a b", "--resume", "latest")
    assert cmd[0] == "PYTORCH_ALLOC_CONF=expandable_segments:True" and cmd[1] == "torchrun"
    assert {"--nproc-per-node=8", "--standalone", "--local-ranks-filter=0", "--tee=3"} <= set(cmd)
    assert cmd[cmd.index("-m"):] == ["-m", "nftcore.train", "--config", "qwen_image_edit_r1", "--run.out=runs/a b",
                                     "--resume", "latest"]
    assert not any(c.startswith("--rdzv") or c.startswith("--nnodes") for c in cmd)


def test_multi_node_dry_run_uses_a_c10d_rendezvous():
    cmd = dry_run("--config", "kontext_edit_r1", NGPU="4", NNODES="2", RDZV_ENDPOINT="node0:29500", RDZV_ID="job42",
                  LOG_RANK="0,1")
    assert {"--nproc-per-node=4", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500",
            "--rdzv-id=job42", "--local-ranks-filter=0,1"} <= set(cmd)
    assert "--standalone" not in cmd and cmd[-4:] == ["-m", "nftcore.train", "--config", "kontext_edit_r1"]


def test_multi_node_without_endpoint_is_a_clear_error():
    result = launch("--dry-run", NNODES="2")
    assert result.returncode == 2 and "RDZV_ENDPOINT=host:port" in result.stderr


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not in the venv")
def test_one_process_launch_trains(tmp_path):
    out = tmp_path / "run"
    result = launch(*tiny_args(out, **{"run.epochs": 1}), NGPU="1", TORCHRUN=str(TORCHRUN), OMP_NUM_THREADS="1",
                    PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "epoch 0 step 2" in result.stdout and (out / "checkpoints" / "epoch-000001" / "COMPLETE").is_file()
