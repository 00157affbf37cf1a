"""Smoke run of bench/bench_judge_sharding.py as a script (`--smoke`: the tests' 2-layer judge, 2 batches of 2 edits
of 56 px per rank, one timed repeat, nothing recorded; `--json` gives its rows back): every provider reports, the
sharded ranks hold about half the shardable parameters, and the scores agree (the bench itself fails above 1e-5)."""

import pytest

from tests.helpers.bench import run_bench
from tests.helpers.jobs import needs_torchrun

pytestmark = needs_torchrun


def test_judge_sharding_bench_smoke(tmp_path):
    results, out = run_bench("bench_judge_sharding.py", ["--smoke", "--batch", "2", "--batches", "2", "--size", "56",
                                                         "--repeats", "1", "--no-record"],
                             results=tmp_path / "results.json")
    rows = {r.provider: r for r in results}
    assert set(rows) == {"whole", "sharded:per-batch", "sharded"} and all(r.p50 > 0 for r in results)
    assert [rows[p].extra["calls"] for p in ("whole", "sharded:per-batch", "sharded")] == [2, 2, 1]
    whole, sharded = rows["whole"].extra, rows["sharded"].extra
    assert sharded["sharded_part"] == pytest.approx(whole["sharded_part"] / 2, rel=0.02)
    assert sharded["whole_part"] == whole["whole_part"] > 0 and whole["max_score_diff"] <= 1e-5
    assert "parameters per rank" in out
