"""The README's main-job command runs the demo end to end: per-epoch rewards, metrics, checkpoints and pictures;
and a mistake found after the config loaded (a bad --resume, a batch plan or family setting that cannot work, a
missing model) ends it with one `nftcore.train: ...` line and exit code 2 (config, --resume) or 1 (files, data,
damaged checkpoints).

`python -m nftcore.train` with no arguments runs the full `demo` recipe (minutes); here the same command runs with
the tiny settings of test_trainer.py (plus evaluation on, so the pictures are drawn) to stay within seconds.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nftcore import train as train_module
from nftcore.config.errors import ConfigError, UnsupportedConfigError
from nftcore.data import ImageDecodeError
from nftcore.trainer import DistEnv, Trainer
from nftcore.trainer.checkpoint import CheckpointError
from tests.helpers.trainer import tiny_args

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
    assert "# eval on 2 held-out tasks" in out and "#   all " in out  # the before/after table, per task type too
    assert Image.open(tmp_path / "reward_curve.png").size == (700, 400)  # matplotlib, 7 x 4 in at 100 dpi
    grid = Image.open(tmp_path / "before_after.png")
    assert grid.size[0] > grid.size[1]  # 4 columns (source | base | final | target) × 2 rows, captions to the right


# ------------------------------------------------------------------------- errors after the config: one clean line


def _main(monkeypatch, capsys, argv, env=None) -> tuple[int, str, str]:
    """Run `main(argv)` in this process (optionally as a fake rank of a bigger job); (exit code, stdout, stderr)."""
    if env is not None:
        monkeypatch.setattr(train_module, "init_distributed", lambda cfg: env)
        if env.world_size > 1:  # a fake rank has no process group for the run folder's broadcast
            monkeypatch.setattr(train_module, "prepare_run_folder", lambda cfg, env: None)
    code = train_module.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    assert err.startswith("nftcore.train: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err[len("nftcore.train: "):-1]


@pytest.mark.parametrize("overrides, env, code, needle", [
    ({"model.path": "no/such/demo.safetensors"}, None, 1, "no demo checkpoint at no/such/demo.safetensors"),
    ({"parallel.shard_text_encoder": True}, DistEnv(rank=0, world_size=2), 2, "parallel.shard_text_encoder=true"),
    ({"optim.mixed_precision": "fp16"}, None, 2, "bad value for optim.mixed_precision"),
    ({}, DistEnv(rank=0, world_size=8), 2, "batch plan"),  # K·G = 4 samples cannot spread over 8 ranks
])
def test_start_up_errors_are_one_line_with_the_exit_code(tmp_path, monkeypatch, capsys, overrides, env, code,
                                                         needle):
    got, _, err = _main(monkeypatch, capsys, tiny_args(tmp_path, **overrides), env)
    assert got == code and needle in _one_line(err), err


def test_only_rank_0_prints_the_error_and_every_rank_exits_with_its_code(tmp_path, monkeypatch, capsys):
    args = tiny_args(tmp_path, **{"parallel.shard_text_encoder": True})
    code, out, err = _main(monkeypatch, capsys, args, DistEnv(rank=1, world_size=2))
    assert (code, out, err) == (2, "", "")


def test_a_bad_resume_is_one_line_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "checkpoints" / "epoch-000009"
    code, out, err = _main(monkeypatch, capsys, [*tiny_args(tmp_path), "--resume", str(missing)])
    assert code == 2 and str(missing) in _one_line(err)  # a config mistake, found by the run-folder check


def test_config_errors_print_once_under_torchrun(monkeypatch, capsys):
    """Before the process group exists only RANK says which rank this is; rank 0 alone prints."""
    monkeypatch.setenv("RANK", "3")
    assert train_module.main(["--optim.lr=inf"]) == 2
    assert capsys.readouterr() == ("", "")
    monkeypatch.setenv("RANK", "0")
    assert train_module.main(["--optim.lr=inf"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_the_command_ends_with_the_error_line_and_no_traceback(tmp_path):
    missing = tmp_path / "not-a-checkpoint"
    result = subprocess.run([sys.executable, "-m", "nftcore.train", *tiny_args(tmp_path), "--resume", str(missing)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stdout[-4000:]
    assert "Traceback" not in result.stdout
    last = result.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith("nftcore.train: ") and str(missing) in last, result.stdout[-4000:]


@pytest.mark.parametrize("error, code", [
    (CheckpointError, 1), (ImageDecodeError, 1), (FileNotFoundError, 1), (ConfigError, 2), (UnsupportedConfigError, 2),
])
def test_user_errors_while_training_are_one_line(tmp_path, monkeypatch, capsys, error, code):
    def fail(self):
        raise error("where: what went wrong")

    monkeypatch.setattr(Trainer, "train", fail)
    got, _, err = _main(monkeypatch, capsys, tiny_args(tmp_path))
    assert got == code and _one_line(err) == "where: what went wrong"


def test_other_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    def fail(self):
        raise NotImplementedError("a bug, not a setting")  # after start-up, not a config matter

    monkeypatch.setattr(Trainer, "train", fail)
    with pytest.raises(NotImplementedError, match="a bug"):
        train_module.main(tiny_args(tmp_path))
    assert capsys.readouterr().err == ""
