"""Seed spread of the embedded demo, and the positive-only ablation beside it.

Does the demo's reward rise because of the algorithm or because of a lucky seed, and what does DiffusionNFT's
negative branch add? This runs the main job, `python -m nftcore.train` (the `demo` recipe), for `--seeds` seeds ×
two arms, each run a subprocess with its own `--run.seed S --run.out OUT/ARM-seedS`:

- `full`: the demo recipe as it is (positive and negative branch, `nft.negative_weight = 1`);
- `positive`: `--nft.negative_weight=0`, only the r-weighted positive term (reward-weighted flow matching on the
  implicit positive policy).

and reports both side by side, whatever they show: a per-epoch table of the mean rollout reward (mean ± std over
seeds, per arm), the base and final (EMA) eval reward of every run with its rise, wall times, the same per task
type (move / recolour / remove: which kinds improved), and a PNG
(OUT/demo_seeds.png: one panel per arm on a shared scale, thin lines per seed, a thick moving-average of the seed
mean, circles for the periodic EMA evals). Everything per run also goes to OUT/summary.json.

What varies with the seed: rollout and training noise, prompt order, LoRA init, and the eval sampler's fixed noise
(the eval tasks themselves are the demo's, fixed). The base eval therefore differs a little per seed too; the rise
(final − base) is paired within a run.

Numbers: per-epoch rollout rewards come from each run's metrics.jsonl; eval rewards from the job's own console lines
(`# base model: eval reward …`, `epoch N: eval reward (EMA …) …`, `# final (EMA) model: eval reward …`). Runs go
one after another by default so their wall times mean something; `--jobs 2` halves the wall time on two cores and
records that it did. Only the unmodified demo (no trainer flags after `--`) is appended to bench/results.csv: one
row per arm, `p50_ms`/`p20_ms`/`p80_ms` = median and quantiles over seeds of one run's wall time, `extra` = the
rewards.

    python bench/bench_demo_seeds.py                                   # 3 seeds × 2 arms of the demo (~45 min)
    python bench/bench_demo_seeds.py --seeds 1 --no-record -- --run.epochs 4   # trainer flags after --
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_demo_seeds.py`: make `bench` and `nftcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from nftcore.demo.plots import moving_average  # noqa: E402
from nftcore.trainer.metrics import read_metrics  # noqa: E402

BENCH = "demo_seeds"
ARMS = {"full": [], "positive": ["--nft.negative_weight=0"]}
ARM_LABELS = {"full": "full (negative_weight 1)", "positive": "positive-only (negative_weight 0)"}
COLORS = {"full": ((30, 80, 220), (160, 185, 245)), "positive": ((215, 70, 30), (245, 180, 160))}  # mean, per seed
# The main job's console lines (nftcore/train.py, nftcore/trainer/loop.py)
BASE_LINE = re.compile(r"^# base model: eval reward (\S+)", re.M)
FINAL_LINE = re.compile(r"^# final \(EMA\) model: eval reward (\S+)", re.M)
EVAL_LINE = re.compile(r"^epoch (\d+): eval reward \(EMA[^)]*\) (\S+)", re.M)
# The closing per-task-type table: "#   move   25   0.392 ± 0.009   0.636 ± 0.039   +0.244 ± 0.037"
TYPE_LINE = re.compile(r"^#\s+(\w+)\s+(\d+)\s+(\S+) ± \S+\s+(\S+) ± \S+\s+\S+ ± \S+$", re.M)


# ---------------------------------------------------------------------------------------------------------- runs

def run_one(arm: str, seed: int, out: Path, trainer_args: list[str], threads: int) -> dict:
    """One training job; its numbers as a dict. The bench's own flags come last, so they win over `trainer_args`."""
    run_dir = out / f"{arm}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "nftcore.train", *trainer_args, *ARMS[arm], f"--run.seed={seed}",
           f"--run.out={run_dir}", "--run.overwrite=true", "--metrics.progress=false"]  # a rerun redoes the arm
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with (run_dir / "train.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=harness.REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    text = (run_dir / "train.log").read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"last lines of {run_dir / 'train.log'}:\n{text[-3000:]}")
    by_epoch: dict[int, float] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        by_epoch.setdefault(row["epoch"], row["reward_mean"])  # the same on every step row of an epoch
    return {"arm": arm, "seed": seed, "wall_s": round(wall, 1), "out": str(run_dir),
            "epoch_rewards": [by_epoch.get(e) for e in range(max(by_epoch, default=-1) + 1)],
            "base_eval": _number(BASE_LINE, text), "final_eval": _number(FINAL_LINE, text),
            "evals": [(int(e) + 1, float(r)) for e, r in EVAL_LINE.findall(text)],  # (after N epochs, reward)
            "task_types": task_types(text)}


def task_types(text: str) -> dict[str, list[float]]:
    """The run's closing table: task type -> [n, base eval, final eval] (empty without evaluation)."""
    return {kind: [int(n), float(base), float(final)] for kind, n, base, final in TYPE_LINE.findall(text)}


def _number(pattern: re.Pattern, text: str) -> float | None:
    found = pattern.findall(text)
    return float(found[-1]) if found else None  # None: the job ran without evaluation (eval.every = 0)


# ---------------------------------------------------------------------------------------------------------- report

def _mean_std(values: list[float | None]) -> tuple[float, float, int]:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(values: list[float | None], digits: int = 4) -> str:
    mean, std, n = _mean_std(values)
    return "-" if not n else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _rise(run: dict) -> float | None:
    if run["base_eval"] is None or run["final_eval"] is None:
        return None
    return run["final_eval"] - run["base_eval"]


def window_means(rewards: list[float | None], fraction: float = 0.2) -> tuple[float, float]:
    """Mean rollout reward of the first and of the last `fraction` of the epochs (a single epoch's mean is noisy:
    G = 8 prompts of very different difficulty)."""
    n = max(1, round(len(rewards) * fraction))
    return _mean_std(rewards[:n])[0], _mean_std(rewards[-n:])[0]


def format_report(runs: list[dict], arms: list[str]) -> str:
    epochs = max(len(r["epoch_rewards"]) for r in runs)
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in arms}
    lines = ["rollout reward per epoch (mean ± std over seeds)",
             "epoch | " + " | ".join(f"{arm:>17}" for arm in arms)]
    for e in range(epochs):
        cells = [_pm([r["epoch_rewards"][e] if e < len(r["epoch_rewards"]) else None for r in by_arm[arm]])
                 for arm in arms]
        lines.append(f"{e:5d} | " + " | ".join(f"{c:>17}" for c in cells))
    lines += ["", "per run: eval reward on the demo's held-out tasks (base = LoRA off, final = EMA), rollout reward "
                  "of the first / last 20% of epochs",
              f"{'arm':>9} | seed | base eval | final eval |    rise | rollout first → last | wall s"]
    for arm in arms:
        for r in by_arm[arm]:
            first, last = window_means(r["epoch_rewards"])
            lines.append(f"{arm:>9} | {r['seed']:4d} | {_fmt(r['base_eval']):>9} | {_fmt(r['final_eval']):>10} | "
                         f"{_fmt(_rise(r), 4):>7} | {_fmt(first):>6} → {_fmt(last):<12} | {r['wall_s']:6.1f}")
    lines += ["", f"{'arm':>9} | seeds | base eval         | final eval        | rise (final − base) | wall s"]
    for arm in arms:
        rs = by_arm[arm]
        lines.append(f"{arm:>9} | {len(rs):5d} | {_pm([r['base_eval'] for r in rs]):>17} | "
                     f"{_pm([r['final_eval'] for r in rs]):>17} | {_pm([_rise(r) for r in rs]):>19} | "
                     f"{_pm([r['wall_s'] for r in rs], 1)}")
    kinds = list(dict.fromkeys(k for r in runs for k in r.get("task_types", {})))
    if kinds:
        lines += ["", "per task type: eval reward, mean ± std over seeds (n = tasks of that type)",
                  f"{'arm':>9} | {'type':>8} |  n | base eval         | final eval        | rise"]
        for arm in arms:
            for kind in kinds:
                rows = [r["task_types"][kind] for r in by_arm[arm] if kind in r.get("task_types", {})]
                if rows:
                    lines.append(f"{arm:>9} | {kind:>8} | {rows[0][0]:2d} | {_pm([b for _, b, _ in rows], 3):>17} | "
                                 f"{_pm([f for _, _, f in rows], 3):>17} | {_pm([f - b for _, b, f in rows], 3)}")
    return "\n".join(lines)


def save_plot(path: Path, runs: list[dict], arms: list[str], panel: tuple[int, int] = (440, 300)) -> Path:
    """One panel per arm on a shared reward scale (PIL only, as nftcore/trainer/metrics.py draws)."""
    from PIL import Image, ImageDraw

    w, h = panel
    left, right, top, bottom = 50, 10, 34, 30
    epochs = max(len(r["epoch_rewards"]) for r in runs)
    window = max(1, epochs // 10) | 1  # odd, ~10% of the run
    values = [v for r in runs for v in [*r["epoch_rewards"], r["base_eval"], r["final_eval"],
                                        *(x for _, x in r["evals"])] if v is not None and math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo, hi = (lo - 0.05, hi + 0.05) if hi - lo < 1e-6 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    image = Image.new("RGB", (w * len(arms), h), "white")
    draw = ImageDraw.Draw(image)

    def y(v: float) -> float:
        return top + (hi - v) / (hi - lo) * (h - top - bottom)

    for p, arm in enumerate(arms):
        x_off = p * w

        def x(i: float) -> float:
            return x_off + left + i / max(epochs - 1, 1) * (w - left - right)

        def line(series, color, width):
            pts = [(x(i), y(v)) for i, v in enumerate(series) if v is not None and math.isfinite(v)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=width)

        rs = [r for r in runs if r["arm"] == arm]
        strong, light = COLORS.get(arm, ((0, 0, 0), (170, 170, 170)))
        draw.rectangle([x_off + left, top, x_off + w - right, h - bottom], outline="black")
        for v in (lo, (lo + hi) / 2, hi):
            draw.text((x_off + 2, y(v) - 6), f"{v:.3f}", fill="black")
        draw.text((x_off + left, h - bottom + 8), f"epoch 0 … {epochs - 1}", fill="black")
        rise, _, _ = _mean_std([_rise(r) for r in rs])
        draw.text((x_off + left, 4), f"{ARM_LABELS.get(arm, arm)}, {len(rs)} seeds", fill="black")
        draw.text((x_off + left, 18), f"thin: seeds; thick: mean, {window}-epoch avg; o: EMA eval; "
                                      f"rise {_fmt(rise, 3)}", fill="black")
        base, _, n = _mean_std([r["base_eval"] for r in rs])
        if n:  # dashed grey: mean base eval
            for x0 in range(int(x(0)), int(x(epochs - 1)), 8):
                draw.line([(x0, y(base)), (min(x0 + 4, x(epochs - 1)), y(base))], fill="grey")
        for r in rs:
            line(r["epoch_rewards"], light, 1)
        mean = [_mean_std([r["epoch_rewards"][e] if e < len(r["epoch_rewards"]) else None for r in rs])[0]
                for e in range(epochs)]
        line(moving_average(mean, window), strong, 3)
        for r in rs:
            points = [*r["evals"], (epochs, r["final_eval"])]
            for after, reward in points:
                if reward is not None and math.isfinite(reward):
                    px, py = x(after - 1), y(reward)
                    draw.ellipse([px - 3, py - 3, px + 3, py + 3], outline=strong)
    image.save(path)
    return path


def csv_results(runs: list[dict], arms: list[str], trainer_args: list[str], jobs: int) -> list[harness.Result]:
    results = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        timing = harness.summarize([1e3 * r["wall_s"] for r in rs])
        extra = {"seeds": [r["seed"] for r in rs], "epochs": len(rs[0]["epoch_rewards"]), "jobs": jobs,
                 "base_eval": [r["base_eval"] for r in rs], "final_eval": [r["final_eval"] for r in rs],
                 "rollout_first_last": [[round(v, 4) for v in window_means(r["epoch_rewards"])] for r in rs],
                 "args": ARMS[arm] + trainer_args}
        results.append(harness.Result(BENCH, "demo", arm, "train", "fp32", timing, None, extra))
    return results


# ---------------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="Flags after -- go to every `python -m nftcore.train` call, before the "
                                       "arm's and the bench's own (--run.seed, --run.out).")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: 0 … N−1, or --first-seed …")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated from {', '.join(ARMS)}")
    p.add_argument("--out", default="runs/bench_demo_seeds", help="one folder per run, summary.json, demo_seeds.png")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (1: wall times mean something)")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS of each run; 0: the environment's (with --jobs N: cores / N)")
    p.add_argument("--no-record", action="store_true", help=f"do not append to {harness.RESULTS_CSV.name}")
    args = p.parse_args(own)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms or args.seeds < 1 or args.jobs < 1:
        p.error(f"need --seeds ≥ 1, --jobs ≥ 1 and arms from {', '.join(ARMS)} (got {args.arms!r})")
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    harness.print_machine()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.seeds} seed(s) × {arms}, {args.jobs} at a time"
          + (f", OMP_NUM_THREADS={threads}" if threads else "") + f"; trainer flags {trainer_args or 'none'}",
          flush=True)
    order = [(arm, seed) for seed in range(args.first_seed, args.first_seed + args.seeds) for arm in arms]
    start = time.perf_counter()

    def job(arm_seed):
        run = run_one(*arm_seed, out, trainer_args, threads)
        print(f"  {run['arm']} seed {run['seed']}: base {_fmt(run['base_eval'])} → final {_fmt(run['final_eval'])} "
              f"in {run['wall_s']:.1f} s", flush=True)
        return run

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(job, order))
    total = time.perf_counter() - start

    print(format_report(runs, arms))
    png = save_plot(out / "demo_seeds.png", runs, arms)
    summary = {"machine": harness.machine_info(), "load1_end": round(os.getloadavg()[0], 2), "arms": arms,
               "arm_args": {a: ARMS[a] for a in arms}, "trainer_args": trainer_args, "jobs": args.jobs,
               "threads": threads, "total_s": round(total, 1), "runs": runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {png} and {out / 'summary.json'} ({total:.0f} s in all)")
    if args.no_record:
        pass
    elif trainer_args:
        print(f"not appended to {harness.RESULTS_CSV.name}: only the unmodified demo is recorded")
    else:
        harness.append_results(csv_results(runs, arms, trainer_args, args.jobs))
        print(f"appended {len(arms)} rows to {harness.RESULTS_CSV}")
    return summary


if __name__ == "__main__":
    main()
