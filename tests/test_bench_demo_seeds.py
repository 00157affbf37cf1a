"""Smoke run of bench/bench_demo_seeds.py as a script: 1 seed × both arms of the tiny demo (tests/helpers/trainer.py's
settings, 2 epochs, evaluation on), so CI checks that the seeds/ablation bench runs end to end and reports both arms
(in OUT/summary.json, the plot and its printout)."""

import json
import math

from PIL import Image

from tests.helpers.bench import run_bench
from tests.helpers.trainer import tiny_args

EVAL = {"run.epochs": 2, "eval.every": 1, "eval.max_samples": 2, "eval.batch_size": 2, "eval.num_steps": 2,
        "checkpoint.save_every": 0, "checkpoint.export_lora": False}


def test_bench_runs_both_arms_and_reports_them(tmp_path):
    trainer = tiny_args("unused", **EVAL)  # its --run.out / --run.seed are overridden by the bench's own
    _, out = run_bench("bench_demo_seeds.py", ["--seeds", "1", "--threads", "1", "--out", str(tmp_path), "--no-record",
                                               "--", *trainer])
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = {run["arm"]: run for run in summary["runs"]}
    assert sorted(runs) == ["full", "positive"]
    for run in runs.values():
        assert len(run["epoch_rewards"]) == 2 and all(math.isfinite(r) for r in run["epoch_rewards"])
        assert math.isfinite(run["base_eval"]) and math.isfinite(run["final_eval"])
        assert run["evals"] and run["evals"][0][0] == 1  # the periodic EMA eval after epoch 1
    for arm, weight in (("full", "1.0"), ("positive", "0.0")):  # the effective config each job printed
        assert f"negative_weight = {weight}" in (tmp_path / f"{arm}-seed0" / "train.log").read_text()
    assert "rollout reward per epoch" in out and "rise (final − base)" in out
    assert Image.open(tmp_path / "demo_seeds.png").size == (880, 300)
