"""`parallel.rollout_reshard`: the sharded policy's weights are all-gathered once per rollout call ('batch') or once
per rollout phase ('phase') instead of once per sampler step, with the same numbers. Counted on 2 gloo ranks by the
benchmark that reports it (`bench/bench_rollout_gathers.py --smoke`), so the test and the published table are the
same measurement."""

from __future__ import annotations

import json

from tests.helpers.bench import run_bench
from tests.helpers.jobs import needs_torchrun


@needs_torchrun
def test_rollout_and_eval_gather_each_block_once_per_call_or_phase_and_change_no_number(tmp_path):
    out = tmp_path / "counts.json"
    run_bench("bench_rollout_gathers.py", ["--smoke", "--no-record", "--epochs", "2", "--warmup", "1", "--json",
                                           str(out)])
    modes = json.loads(out.read_text())  # main() checked every rank and epoch counted the same
    groups, calls = modes["batch"]["fsdp_groups"], modes["batch"]["rollout_calls"]
    assert groups == 3 and calls == 2  # tiny policy: two blocks and the root; 2 samples per rank, batch 1
    assert modes["batch"]["gathers"]["rollout"] == groups * calls
    assert modes["phase"]["gathers"]["rollout"] == groups
    assert modes["step"]["gathers"]["rollout"] > modes["batch"]["gathers"]["rollout"]
    eval_calls = 2  # 3 eval samples over 2 ranks in batches of 1: 2 calls per rank (one padded)
    assert modes["batch"]["gathers"]["eval"] == groups * eval_calls and modes["phase"]["gathers"]["eval"] == groups
    assert modes["step"]["gathers"]["eval"] > modes["batch"]["gathers"]["eval"]
    for mode in modes.values():
        assert mode["max_weight_diff"] == 0.0
