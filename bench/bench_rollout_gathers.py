"""FSDP2 all-gathers per epoch with the policy's weights gathered per sampler step, per rollout call or per rollout
phase (`parallel.rollout_reshard` = step | batch | phase), under torchrun on gloo.

An FSDP2-sharded transformer gathers a block's weights before its forward and frees them after. A denoising loop of
S steps therefore gathers every block S times per rollout call (more with a two-evaluation solver), although the
weights do not change during rollouts. Holding them gathered for a call, or for the whole phase, leaves one gather
per block per call, or per epoch. What is counted: `torch.distributed.all_gather_single` calls (the collective
FSDP2 gathers a parameter group with), split by phase (rollout, update, evaluation) on rank 0, with every rank's
counts checked equal. Also per mode: the phases' wall time (median over the timed epochs, the slowest rank's) and
the LoRA weights after the epochs, which must be bitwise the same in every mode (the gathered values are the same
numbers; only when they are freed changes).

The run is the default demo recipe (K = 8, G = 8, 6 dpm2 steps, batch 16) with an EMA evaluation of 16 samples each
epoch, 2 ranks, 1 thread each. On a CPU with gloo a gather is a memcpy through the loopback, so the time saved here
is small next to a GPU's NCCL gathers of a 12B model; the counts are what carries over.

    python bench/bench_rollout_gathers.py                 # 2 gloo ranks, appends to bench/results.csv
    python bench/bench_rollout_gathers.py --smoke --no-record --json counts.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_rollout_gathers.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import harness  # noqa: E402

BENCH = "rollout_gathers"
MODES = ("step", "batch", "phase")
PHASES = ("rollout", "update", "eval")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"model.path": "tiny", "sampling.group_size": 2, "sampling.groups_per_epoch": 2, "sampling.batch_size": 1,
         "sampling.num_steps": 3, "optim.steps_per_epoch": 1, "lora.rank": 2, "eval.batch_size": 1,
         "eval.max_samples": 3}


class GatherCounter:
    """Counts `dist.all_gather_single` calls (FSDP2's parameter gathers) while installed."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.count, self.original = dist, 0, dist.all_gather_single

        def counting(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        dist.all_gather_single = counting

    def remove(self) -> None:
        self.dist.all_gather_single = self.original


def counted(trainer, counter: GatherCounter, record: dict[str, list]) -> None:
    """Wrap the trainer's phases so each call adds (gathers, seconds) to `record[phase]`."""
    for phase, name in (("rollout", "rollout"), ("update", "train_epoch"), ("eval", "evaluate")):
        method = getattr(trainer, name)

        def wrapped(*args, _method=method, _phase=phase, **kwargs):
            before, t0 = counter.count, time.perf_counter()
            out = _method(*args, **kwargs)
            record[_phase].append((counter.count - before, time.perf_counter() - t0))
            return out

        setattr(trainer, name, wrapped)


def worker(args) -> None:
    """One torchrun rank: per mode a fresh trainer, `--warmup` + `--epochs` epochs; rank 0 writes everyone's record."""
    import torch.distributed as dist

    from nftcore.config import load_config
    from nftcore.trainer import Role, Trainer
    from nftcore.trainer.distributed import fsdp_modules

    torch.set_num_threads(args.threads)
    overrides = {"eval.every": 1, "eval.max_samples": 16, "checkpoint.save_every": 0, "metrics.progress": False,
                 "filter.rule": "none", **(SMOKE if args.smoke else {})}
    mine = {"rank": dist.get_rank(), "modes": {}}
    for mode in MODES:
        out = Path(args.tmp) / mode
        cfg = load_config([f"--run.out={out}", "--run.overwrite=true", f"--parallel.rollout_reshard={mode}",
                           *(f"--{k}={v}" for k, v in overrides.items())])
        trainer = Trainer(cfg, echo=False)
        counter, record = GatherCounter(), {phase: [] for phase in PHASES}
        counted(trainer, counter, record)
        try:
            for epoch in range(args.warmup + args.epochs):
                trainer.run_epoch(epoch)
        finally:
            counter.remove()
        state = trainer.weights.state(Role.THETA)
        local = {k: (v.to_local() if hasattr(v, "to_local") else v).detach().clone() for k, v in state.items()}
        mine["modes"][mode] = {
            "gathers": {p: [n for n, _ in record[p][args.warmup:]] for p in PHASES},
            "seconds": {p: [s for _, s in record[p][args.warmup:]] for p in PHASES},
            "fsdp_groups": len(fsdp_modules(trainer.weights.models())),
            "rollout_calls": len(trainer.plan.rollout_batches(trainer.env.rank)),
            "weights": local,
        }
    base = mine["modes"]["step"]["weights"]
    for mode in MODES:
        weights = mine["modes"][mode].pop("weights")
        mine["modes"][mode]["max_weight_diff"] = max(float((weights[k] - base[k]).abs().max()) for k in base)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(args, out: Path, tmp: Path) -> list[dict]:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={args.ranks}", str(Path(__file__).resolve()),
           "--worker", "--out", str(out), "--tmp", str(tmp), "--epochs", str(args.epochs),
           "--warmup", str(args.warmup), "--threads", str(args.threads), *(["--smoke"] if args.smoke else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=1800)
    return json.loads(out.read_text())


def summarize(ranks: list[dict]) -> dict:
    """Per mode: gathers per phase per epoch (checked equal on every rank and epoch), the weights' gap to 'step'."""
    modes = {}
    for mode in MODES:
        per_rank = [r["modes"][mode] for r in ranks]
        gathers = {}
        for phase in PHASES:
            seen = {n for r in per_rank for n in r["gathers"][phase]}
            if len(seen) != 1:
                raise SystemExit(f"{mode}: {phase} gathers differ between ranks or epochs: {sorted(seen)}")
            gathers[phase] = seen.pop()
        modes[mode] = {"gathers": gathers, "fsdp_groups": per_rank[0]["fsdp_groups"],
                       "rollout_calls": per_rank[0]["rollout_calls"],
                       "max_weight_diff": max(r["max_weight_diff"] for r in per_rank),
                       "seconds": {p: [max(s) for s in zip(*(r["seconds"][p] for r in per_rank))] for p in PHASES}}
    return modes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per mode first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--smoke", action="store_true", help="the tests' tiny policy and sizes (a check that it runs)")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/results.csv")
    p.add_argument("--json", help="also write the per-mode summary here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch.distributed as dist

        from nftcore.train import exit_process

        dist.init_process_group("gloo")
        worker(args)
        exit_process(0)  # os._exit: gloo's threads can abort the interpreter's teardown (see exit_process)
    harness.print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        modes = summarize(run_ranks(args, Path(tmp) / "result.json", Path(tmp)))
    if args.json:
        Path(args.json).write_text(json.dumps(modes, indent=1))
    case = ("tiny policy" if args.smoke else "demo recipe") + f", {args.ranks} ranks gloo"
    print(f"\n{case}: FSDP2 all-gathers per epoch (rank 0; {modes['step']['fsdp_groups']} parameter groups, "
          f"{modes['step']['rollout_calls']} rollout calls per rank)")
    print(f"{'mode':6s} " + " ".join(f"{ph + ' gathers':>15s}" for ph in PHASES)
          + " " + " ".join(f"{ph + ' ms':>11s}" for ph in PHASES) + "  max |Δw| vs step")
    results = []
    for mode, m in modes.items():
        timings = {ph: harness.summarize([s * 1e3 for s in m["seconds"][ph]]) for ph in PHASES}
        print(f"{mode:6s} " + " ".join(f"{m['gathers'][ph]:15d}" for ph in PHASES) + " "
              + " ".join(f"{timings[ph].p50:11.1f}" for ph in PHASES) + f"  {m['max_weight_diff']:.1e}")
        for ph in PHASES:
            results.append(harness.Result(BENCH, case, mode, ph, "fp32", timings[ph],
                                          extra={"all_gathers": m["gathers"][ph], "ranks": args.ranks,
                                                 "threads_per_rank": args.threads,
                                                 "max_weight_diff": m["max_weight_diff"]}))
    bad = [mode for mode, m in modes.items() if m["max_weight_diff"] != 0.0]
    if bad:
        raise SystemExit(f"weights after the epochs differ from 'step' in mode(s) {bad}: holding the gathered "
                         "weights must not change a number")
    if not args.no_record and not args.smoke:
        harness.append_results(results)
    return modes


if __name__ == "__main__":
    main()
