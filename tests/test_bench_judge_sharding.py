"""Smoke run of bench/bench_judge_sharding.py (`--smoke`: the tests' 2-layer judge, 2 batches of 2 edits of 56 px per
rank, one timed repeat, nothing recorded): every provider reports, the sharded ranks hold about half the shardable
parameters, and the scores agree (the bench itself fails above 1e-5)."""

import sys
from pathlib import Path

import pytest

from bench.bench_judge_sharding import main

pytestmark = pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="no torchrun")


def test_judge_sharding_bench_smoke(capsys):
    results = main(["--smoke", "--batch", "2", "--batches", "2", "--size", "56", "--repeats", "1", "--no-record"])
    rows = {r.provider: r for r in results}
    assert set(rows) == {"whole", "sharded:per-batch", "sharded"} and all(r.timing.p50 > 0 for r in results)
    assert [rows[p].extra["calls"] for p in ("whole", "sharded:per-batch", "sharded")] == [2, 2, 1]
    whole, sharded = rows["whole"].extra, rows["sharded"].extra
    assert sharded["sharded_part"] == pytest.approx(whole["sharded_part"] / 2, rel=0.02)
    assert sharded["whole_part"] == whole["whole_part"] > 0 and whole["max_score_diff"] <= 1e-5
    assert "parameters per rank" in capsys.readouterr().out
