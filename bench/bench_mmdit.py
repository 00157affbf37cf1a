"""Benchmark of the whole transformer: `nftcore.models.MMDiT` against diffusers' `FluxTransformer2DModel`, same config
and weights, forward (no grad, as in rollouts) and forward + backward (all parameters trainable).

Why this baseline: diffusers' model is what Edit-R1 / DiffusionNFT train and sample with, so "speedup" answers "what
does nftcore's model buy over the code people run today". The config is a small FLUX-Kontext edit at full token
count: 4 heads x 64 (hidden 256), 4 double + 4 single blocks, 1024 target + 1024 source + 64 text tokens, batch 2,
fp32, activation checkpointing off on both. At hidden 256 and 2112 tokens attention has more FLOPs than all the
Linears (4 N^2 C vs 24 N C^2 per block: N / 6C = 1.4), and both sides run it through aten's CPU flash attention, so
the end-to-end speedup is bounded by what the rest of the model costs. (At FLUX's real width, 3072, the ratio is 0.12.)
`--breakdown` measures that bound: each model's self CPU time split into aten's attention kernels, GEMMs and the rest
(torch.profiler), and the ratio diffusers would reach against a model whose rest cost nothing.

How it measures:
- time: both models live in this process and are called alternately (diffusers, nftcore, diffusers, ...) after
  `--warmup` calls each, so load drift on a shared machine hits both alike; wall-clock (perf_counter) median and
  p20/p80 over `--repeats` calls go in the table and CSV, process CPU time (all threads, `time.process_time`) in
  `extra` - on an oversubscribed machine CPU time is the steadier of the two;
- peak memory: each (provider, mode) in a fresh subprocess, one warm-up call, then one call under `torch.profiler`
  with `profile_memory=True`; the running sum of its CPU allocation/free events gives the peak bytes of live tensors
  *allocated during the call* (weights and inputs excluded, parameter gradients included) - the CPU analogue of
  CUDA's `max_memory_allocated` delta, unaffected by allocator caching or earlier calls (unlike ru_maxrss).
Both providers first run the same inputs and must agree (fp32, relative max error <= 1e-5), so a fast wrong model
cannot pass as a speedup. nftcore runs without block checkpointing, but it does rebuild a few element-wise activations
(LayerNorm/modulation outputs, GELU output, attention-output slices) in backward instead of keeping them
(`nftcore/models/layers.py`); no GEMM or attention is recomputed. The 1-minute load average is recorded.

    python bench/bench_mmdit.py                 # both modes, appends to bench/results.csv
    python bench/bench_mmdit.py --mode fwd --repeats 3 --no-record
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as `python bench/bench_mmdit.py`: make `bench` and `nftcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import harness  # noqa: E402

BENCH = "mmdit"
BASELINE = "diffusers"
PROVIDERS = ("diffusers", "nftcore")
MODES = ("fwd", "full")
CASE = "kontext_tiny_2112"  # the case name holds for the default grid; other grids are never recorded
# FluxTransformer2DModel config: hidden 4 x 64, axes sum to the head dim 64
CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=4, num_single_layers=4,
              attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128,
              guidance_embeds=True, axes_dims_rope=(8, 28, 28))
BATCH, GRID, TEXT = 2, (32, 32), 64  # 1024 target + 1024 source tokens (512^2 px), 64 text tokens


def make_checkpoint(folder: Path) -> None:
    """A FluxTransformer2DModel with every parameter random (diffusers zero-inits some), saved in diffusers format."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02 if p.dim() > 1 else 0.2)
    model.save_pretrained(folder)


def load(provider: str, folder: Path) -> torch.nn.Module:
    if provider == "diffusers":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_pretrained(folder).float()
    from nftcore.models import MMDiT

    return MMDiT.from_pretrained(folder, dtype=torch.float32)


def make_inputs() -> dict:
    """Kontext edit inputs: [target ; source] image tokens with ids (axis 0 = 1 for the source), text ids zero."""
    from nftcore.models import flux_image_ids

    g = torch.Generator().manual_seed(1)
    n_img = 2 * GRID[0] * GRID[1]
    img_ids = torch.cat([flux_image_ids(*GRID, index=0), flux_image_ids(*GRID, index=1)])
    return dict(
        hidden_states=torch.randn(BATCH, n_img, CONFIG["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(BATCH, TEXT, CONFIG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(BATCH, CONFIG["pooled_projection_dim"], generator=g),
        timestep=torch.full((BATCH,), 0.7), guidance=torch.full((BATCH,), 3.5),
        img_ids=img_ids, txt_ids=torch.zeros(TEXT, 3),
    )


def step_fn(model: torch.nn.Module, mode: str, inputs: dict):
    """The measured call: forward under no_grad ("fwd") or forward + backward into every parameter ("full")."""
    grad_out = torch.randn(BATCH, inputs["hidden_states"].shape[1], CONFIG["in_channels"],
                           generator=torch.Generator().manual_seed(2))
    if mode == "fwd":
        model.requires_grad_(False)

        def fn():
            with torch.no_grad():
                return model(**inputs, return_dict=False)[0]
    else:
        model.requires_grad_(True)

        def fn():
            out = model(**inputs, return_dict=False)[0]
            out.backward(grad_out)
    return fn


def profiled_peak_mb(fn) -> float:
    """Peak MiB of CPU tensor memory allocated (net of frees) during one call of fn, from profiler memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def memory_worker(provider: str, mode: str, folder: Path) -> dict:
    """Fresh process: load, one warm-up call, then the profiled call."""
    model = load(provider, folder)
    fn = step_fn(model, mode, make_inputs())
    fn()
    for p in model.parameters():
        p.grad = None
    return dict(peak_mb=profiled_peak_mb(fn))


def time_alternating(fns: dict[str, Callable], params: dict[str, list], warmup: int, repeats: int) -> dict:
    """{provider: (wall ms list, CPU ms list)}, calls interleaved provider by provider; `.grad` is cleared before
    each call, outside the timed region."""
    wall, cpu = {p: [] for p in fns}, {p: [] for p in fns}
    for i in range(warmup + repeats):
        for provider, fn in fns.items():
            for p in params[provider]:
                p.grad = None
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            w1, c1 = time.perf_counter(), time.process_time()
            if i >= warmup:
                wall[provider].append((w1 - w0) * 1e3)
                cpu[provider].append((c1 - c0) * 1e3)
    return {p: (wall[p], cpu[p]) for p in fns}


GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm")


def time_breakdown(fns: dict[str, Callable], params: dict[str, list], calls: int = 3) -> dict[str, dict[str, float]]:
    """{provider: {"attention", "gemm", "other": self CPU ms per call}}: `calls` profiled calls each, interleaved."""
    from torch.profiler import ProfilerActivity, profile

    kinds = {p: dict.fromkeys(("attention", "gemm", "other"), 0.0) for p in fns}
    for _ in range(calls):
        for provider, fn in fns.items():
            for p in params[provider]:
                p.grad = None
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                kind = "attention" if "scaled_dot_product" in e.key else "gemm" if e.key in GEMM_OPS else "other"
                kinds[provider][kind] += e.self_cpu_time_total / 1e3 / calls
    return kinds


def print_breakdown(mode: str, kinds: dict[str, dict[str, float]]) -> None:
    for provider, k in kinds.items():
        total = sum(k.values())
        print(f"  {provider:9s} {mode:4s} self CPU {total:8.1f} ms: " + ", ".join(
            f"{name} {ms:.1f} ({ms / total:.0%})" for name, ms in k.items()))
    d = kinds["diffusers"]
    print(f"  {mode}: bound with the same attention and GEMM kernels (diffusers total / its attention + GEMMs): "
          f"{sum(d.values()) / (d['attention'] + d['gemm']):.2f}x", flush=True)


def check_agreement(folder: Path) -> float:
    """Relative max error of nftcore's forward against diffusers' on the benchmark inputs (fp32)."""
    inputs = make_inputs()
    with torch.no_grad():
        ref = load("diffusers", folder)(**inputs, return_dict=False)[0]
        ours = load("nftcore", folder)(**inputs, return_dict=False)[0]
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    if not err <= 1e-5:
        raise SystemExit(f"nftcore disagrees with diffusers on the benchmark inputs: relative error {err:.2e}")
    return err


def main() -> None:
    global GRID
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per provider and mode")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per provider and mode")
    parser.add_argument("--grid", type=int, nargs=2, default=GRID, metavar=("ROWS", "COLS"),
                        help="token grid of target and source (default 32 32 = 512^2 px); smaller for a smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); on a shared machine 1 thread avoids measuring "
                             "thread hand-offs to a busy core")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile each model's self CPU time by kind (attention, GEMM, rest) and print the "
                             "speedup bound it implies")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/results.csv")
    parser.add_argument("--worker", nargs=3, metavar=("PROVIDER", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # diffusers' optional-dependency warnings
    GRID = tuple(args.grid)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        provider, mode, folder = args.worker
        print(json.dumps(memory_worker(provider, mode, Path(folder))))
        return

    harness.print_machine()
    modes = MODES if args.mode == "all" else (args.mode,)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_checkpoint(folder)
        err = check_agreement(folder)
        print(f"nftcore vs diffusers forward: relative max error {err:.2e}", flush=True)
        for mode in modes:
            models = {p: load(p, folder) for p in PROVIDERS}
            inputs = make_inputs()
            fns = {p: step_fn(m, mode, inputs) for p, m in models.items()}
            params = {p: list(m.parameters()) if mode == "full" else [] for p, m in models.items()}
            times = time_alternating(fns, params, args.warmup, args.repeats)
            kinds = time_breakdown(fns, params) if args.breakdown else {}
            if kinds:
                print_breakdown(mode, kinds)
            del models, fns, params
            for provider in PROVIDERS:
                cmd = [sys.executable, __file__, "--worker", provider, mode, str(folder), "--grid", *map(str, GRID),
                       "--threads", str(torch.get_num_threads())]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=harness.REPO_ROOT)
                if proc.returncode:
                    raise SystemExit(f"memory worker {provider}/{mode} failed:\n{proc.stderr[-4000:]}")
                peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
                wall, cpu = harness.summarize(times[provider][0]), harness.summarize(times[provider][1])
                extra = dict(B=BATCH, tokens=dict(target=GRID[0] * GRID[1], source=GRID[0] * GRID[1], text=TEXT),
                             config=CONFIG, threads=torch.get_num_threads(), load1=round(os.getloadavg()[0], 2),
                             rel_err=float(f"{err:.3g}"), cpu_p50_ms=round(cpu.p50, 1), cpu_p20_ms=round(cpu.p20, 1),
                             cpu_p80_ms=round(cpu.p80, 1),
                             memory="profiler peak of CPU tensor bytes allocated during one call",
                             **({"self_cpu_ms": {k: round(v, 1) for k, v in kinds[provider].items()}} if kinds else {}))
                results.append(harness.Result(BENCH, CASE, provider, mode, "fp32", wall, peak_mb=peak, extra=extra))
                print(f"  {provider:9s} {mode:4s} wall p50 {wall.p50:9.1f} ms  CPU p50 {cpu.p50:9.1f} ms  "
                      f"peak {peak:8.1f} MiB", flush=True)
    print()
    harness.print_table(results, BASELINE)
    for mode in modes:
        d, n = (next(r for r in results if r.mode == mode and r.provider == p) for p in PROVIDERS)
        print(f"{mode}: nftcore {d.timing.p50 / n.timing.p50:.2f}x faster (wall), "
              f"{d.extra['cpu_p50_ms'] / n.extra['cpu_p50_ms']:.2f}x (CPU time), "
              f"{n.peak_mb / d.peak_mb:.2f}x the peak memory of diffusers")
    harness.record(results, args.no_record or GRID != (32, 32))  # rows only for the documented config


if __name__ == "__main__":
    main()
