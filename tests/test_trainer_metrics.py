"""What a run reports: the step line's fields, FLOPs / MFU / peak memory, the TensorBoard and wandb trackers (fake
modules stand in: neither package is a dependency), progress lines, and rollout image grids."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from nftcore.config import load_config
from nftcore.trainer import Trainer, read_metrics
from nftcore.trainer.metrics import MetricsLogger, format_step
from nftcore.trainer.perf import FlopCounter, peak_flops, throughput
from nftcore.trainer.trackers import build_trackers
from tests.helpers.trainer import tiny_args

ROW = {"epoch": 1, "step": 4, "loss": 0.5, "policy_loss": 0.49, "kl_loss": 4e-4, "reward_mean": 0.512,
       "reward_std": 0.101, "filtered_fraction": 0.25, "invalid_rewards": 3, "grad_norm": 0.31, "old_deviate": 1.2e-3,
       "x0_norm": 0.52, "samples_per_s": 3.1, "tflops": 346.0, "mfu": 0.35, "time_rollout": 1.2,
       "time_reward_wait": 0.1, "time_train": 0.4, "peak_memory_gb": 61.5}


def test_step_line_has_every_field():
    line = format_step(ROW)
    print(line)
    for needle in ["epoch 1 step 4", "reward 0.512±0.101", "filtered 0.25", "invalid 3", "pol 0.4900",
                   "kl 4.00e-04", "dev 1.20e-03", "x0 0.52", "|g| 0.310", "3.1 samples/s", "346 TFLOP/s", "MFU 35.0%",
                   "rollout 1.2 s", "reward 0.1 s", "train 0.4 s", "peak 61.50 GB"]:
        assert needle in line, needle
    cpu = format_step({**ROW, "mfu": None, "invalid_rewards": 0})
    assert "MFU" not in cpu and "invalid 0" in cpu


class Toy(nn.Module):
    """20 base parameters (Linear 4 → 4) plus a LoRA-named adapter that must not count."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.proj.lora_A = nn.Linear(4, 2, bias=False)

    def forward(self, hidden_states, encoder_hidden_states=None):
        return self.proj(hidden_states)


def test_flop_counter_is_6n_per_trained_token_and_2n_per_inference_token():
    toy = Toy()
    counter = FlopCounter([toy])
    assert counter.params == 20
    toy(torch.zeros(2, 3, 4), torch.zeros(2, 5, 4)).sum().backward()  # 2 × (3 image + 5 text) tokens with autograd
    with torch.no_grad():
        toy(hidden_states=torch.zeros(1, 3, 4))  # 3 tokens, no text
    assert counter.take() == 20 * (6 * 16 + 2 * 3)
    assert counter.take() == 0
    counter.remove()
    toy(torch.zeros(1, 1, 4))
    assert counter.take() == 0


def test_mfu_needs_a_known_peak(monkeypatch):
    monkeypatch.delenv("NFTCORE_PEAK_TFLOPS", raising=False)
    assert throughput(2e12, 2.0, torch.device("cpu")) == {"tflops": 1.0, "mfu": None}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda", 0)) == pytest.approx(989.4e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert peak_flops(torch.device("cuda", 0)) is None
    monkeypatch.setenv("NFTCORE_PEAK_TFLOPS", "4")
    assert throughput(2e12, 2.0, torch.device("cpu"))["mfu"] == pytest.approx(0.25)


class FakeSummaryWriter:
    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.images, self.closed = log_dir, [], [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_image(self, tag, image, step):
        self.images.append((tag, tuple(image.shape), step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_run_logs_throughput_memory_tensorboard_images_and_progress(tmp_path, monkeypatch, capsys):
    """One tiny epoch with TensorBoard (a fake module), rollout images and progress on, stdout not a terminal."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    monkeypatch.setenv("NFTCORE_PEAK_TFLOPS", "0.001")  # a made-up CPU peak, so MFU is computed here too
    FakeSummaryWriter.instances.clear()
    cfg = load_config(tiny_args(tmp_path, **{"run.epochs": 1, "metrics.tensorboard": True, "metrics.image_every": 1,
                                             "metrics.progress": True, "eval.every": 1, "eval.max_samples": 3}))
    torch.set_num_threads(1)
    Trainer(cfg).train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    for row in rows:
        assert row["tflops"] > 0 and row["mfu"] == pytest.approx(row["tflops"] / 1e-3)
        assert row["rollout_tflops"] > 0 and row["peak_memory_gb"] > 0
    (writer,) = FakeSummaryWriter.instances
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    assert ("train/loss", rows[-1]["loss"], rows[-1]["step"]) in writer.scalars
    assert not any(tag == "train/mfu" and value is None for tag, value, _ in writer.scalars)
    assert [(tag, step) for tag, _, step in writer.images] == [("rollouts", 0), ("eval", 2)]
    assert (tmp_path / "images" / "epoch-000000.png").is_file()
    assert (tmp_path / "images" / "eval-epoch-000000.png").is_file()  # source | EMA edit of the 3 eval tasks
    (evaluation,) = read_metrics(tmp_path / "eval.jsonl")
    assert evaluation["epoch"] == 0 and evaluation["step"] == 2 and evaluation["eval_samples"] == 3
    assert 0 <= evaluation["eval_reward"] <= 1 and evaluation["time_eval"] > 0
    assert ("eval/eval_reward", evaluation["eval_reward"], 2) in writer.scalars
    out = capsys.readouterr().out
    assert "epoch 0 rollout: 4/4 in" in out and "epoch 0 update: 2/2 in" in out and "\r" not in out
    assert "TFLOP/s MFU" in out and "peak" in out


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ImportError, match="metrics.tensorboard = true needs the tensorboard package: `pip install"):
        build_trackers(load_config(tiny_args(tmp_path, **{"metrics.tensorboard": True})))


def test_wandb_tracker(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(tiny_args(tmp_path, **{"metrics.wandb": True, "metrics.wandb_project": "edit-r1",
                                             "run.name": "tiny"}))
    with pytest.raises(ImportError, match="metrics.wandb = true needs the wandb package"):
        build_trackers(cfg)

    calls = {}

    class Run:
        def log(self, data):
            calls.setdefault("log", []).append(data)

        def finish(self):
            calls["finish"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Image=lambda array: array.shape))
    (tracker,) = build_trackers(cfg)
    assert calls["init"]["project"] == "edit-r1" and calls["init"]["name"] == "tiny"
    assert calls["init"]["config"]["optim"]["lr"] == cfg.optim.lr
    tracker.log({**ROW, "mfu": None, "nan_skipped": False})
    assert calls["log"][0]["loss"] == 0.5 and "mfu" not in calls["log"][0] and "nan_skipped" not in calls["log"][0]
    tracker.image("rollouts", torch.rand(3, 8, 6), step=4)
    assert calls["log"][1] == {"rollouts": (8, 6, 3), "step": 4}
    tracker.log({"epoch": 0, "step": 4, "eval_reward": 0.25}, prefix="eval")
    assert calls["log"][2] == {"step": 4.0, "eval/epoch": 0.0, "eval/eval_reward": 0.25}
    tracker.close()
    assert calls["finish"]


def test_progress_redraws_in_place_on_a_terminal_only(tmp_path, capsys):
    tty = MetricsLogger(tmp_path / "a.jsonl", progress=True, tty=True)
    with tty.progress("epoch 0 rollout", 2) as bar:
        bar.advance()
        tty.info("a message")
        bar.advance()
    out = capsys.readouterr().out
    assert "\r\x1b[Kepoch 0 rollout [##########          ] 1/2" in out
    assert "\r\x1b[Ka message\n" in out and out.endswith("\r\x1b[K")  # message above the bar; bar erased at the end
    assert " in " not in out

    plain = MetricsLogger(tmp_path / "b.jsonl", progress=True, tty=False)
    with plain.progress("epoch 0 update", 3) as bar:
        bar.advance(3)
    out = capsys.readouterr().out
    assert out.startswith("epoch 0 update: 3/3 in ") and "\r" not in out

    off = MetricsLogger(tmp_path / "c.jsonl", progress=False, tty=True)
    with off.progress("epoch 0 update", 3) as bar:
        bar.advance()
    assert capsys.readouterr().out == ""


def test_resume_truncation_covers_metrics_eval_and_epoch_rows(tmp_path):
    logger = MetricsLogger(tmp_path / "metrics.jsonl", echo=False)
    for epoch in (0, 1):
        logger.log_step({**ROW, "epoch": epoch, "step": epoch + 1})
        logger.log_eval({"epoch": epoch, "step": epoch + 1, "eval_reward": 0.5})
        logger.log_epoch({"epoch": epoch, "step": epoch + 1, "samples_per_s_per_rank": 3.0})
    assert logger.truncate_from(1) == 1
    for name in ("metrics", "eval", "epochs"):
        assert [r["epoch"] for r in read_metrics(tmp_path / f"{name}.jsonl")] == [0]
