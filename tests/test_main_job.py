"""The README's main-job command runs the demo end to end: per-epoch rewards, metrics, checkpoints and pictures.

`python -m nftcore.train` with no arguments runs the full `demo` recipe (minutes); here the same command runs with
the tiny settings of test_trainer.py (plus evaluation on, so the pictures are drawn) to stay within seconds.
"""

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.test_trainer import tiny_args

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_trains_the_demo_and_draws_its_pictures(tmp_path):
    args = tiny_args(tmp_path, **{"eval.every": 1, "eval.max_samples": 2, "eval.batch_size": 2, "eval.num_steps": 2})
    result = subprocess.run([sys.executable, "-m", "nftcore.train", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "# effective config" in out and "[optim]" in out  # the effective config is printed first
    assert "epoch 0: reward" in out and "epoch 1: reward" in out
    assert "# base model: eval reward" in out and "# final (EMA) model: eval reward" in out
    assert (tmp_path / "metrics.jsonl").is_file()
    assert Image.open(tmp_path / "reward_curve.png").size == (480, 300)
    grid = Image.open(tmp_path / "before_after.png")
    assert grid.size[0] > grid.size[1]  # 4 columns (source | base | final | target) × 2 rows
