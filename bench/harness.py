"""The one benchmark harness every `bench/bench_*.py` uses: timing, peak memory, the machine record, the results CSV,
and the printed table.

Why one harness: numbers from different scripts and machines are only comparable if they are timed the same way
(median with p20/p80 after warm-up; `triton.testing.do_bench` on CUDA, which flushes L2 and clears `.grad` between
repeats) and recorded with the versions and commit they came from. `bench/results.csv` is append-only so a number,
once measured, is never silently replaced; `bench/RESULTS.md` is the human summary of it.

Scripts run from the repo root either as `python bench/bench_x.py` or `python -m bench.bench_x`; they put the repo
root on sys.path themselves (see `bench/bench_nft_loss.py`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# bench/gpu_check.sh points this at its output folder, so a GPU run's rows come back with the run.
RESULTS_CSV = Path(os.environ.get("NFTCORE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results.csv")
CSV_COLUMNS = ["date", "commit", "machine", "device", "torch", "triton", "bench", "case", "provider", "mode", "dtype",
               "p50_ms", "p20_ms", "p80_ms", "peak_mb", "extra"]
BANDWIDTH_MIN_BYTES = 64 * 2**20  # below this the op is launch/latency-bound and "GB/s" means nothing


# ---------------------------------------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th/80th percentiles over `n` timed repeats."""

    p50: float
    p20: float
    p80: float
    n: int | None = None


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(ms: Sequence[float]) -> Timing:
    """Median and 20th/80th percentiles of per-call milliseconds."""
    ms = sorted(ms)
    return Timing(statistics.median(ms), _quantile(ms, 0.2), _quantile(ms, 0.8), len(ms))


def time_cpu(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 10,
             grad_to_none: Iterable[torch.Tensor] = ()) -> Timing:
    """Wall-clock time of `fn()` with time.perf_counter: `warmup` untimed calls, then `repeats` timed ones.

    `.grad` of `grad_to_none` is reset before every call (outside the timed region), so a fwd+bwd benchmark measures
    a fresh gradient write, not an accumulation.
    """
    grads = list(grad_to_none)

    def clear():
        for x in grads:
            x.grad = None

    for _ in range(warmup):
        clear()
        fn()
    ms = []
    for _ in range(repeats):
        clear()
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return summarize(ms)


def time_cuda(fn: Callable[[], Any], *, grad_to_none: Iterable[torch.Tensor] = (), warmup_ms: int = 25,
              rep_ms: int = 100) -> Timing:
    """`triton.testing.do_bench` (CUDA events, L2 flushed between calls) with quantiles [0.5, 0.2, 0.8]."""
    import triton.testing

    p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                                            quantiles=[0.5, 0.2, 0.8])
    return Timing(p50, p20, p80)


def time_fn(fn: Callable[[], Any], device: torch.device | str, *, grad_to_none: Iterable[torch.Tensor] = (),
            warmup: int = 3, repeats: int = 10) -> Timing:
    """Time `fn` the right way for `device`: do_bench on CUDA, perf_counter repeats on CPU."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, grad_to_none=grad_to_none)
    return time_cpu(fn, warmup=warmup, repeats=repeats, grad_to_none=grad_to_none)


def time_many(fns: dict[str, Callable[[], Any]], device: torch.device | str, *,
              grad_to_none: Iterable[torch.Tensor] = (), warmup: int = 3, repeats: int = 10) -> dict[str, Timing]:
    """Time several providers of one case. On CPU the repeats are interleaved (A, B, C, A, B, C, ...), so the load
    of a shared machine drifting during the run hits every provider alike instead of whichever ran last; on CUDA
    each gets its own do_bench."""
    if torch.device(device).type == "cuda":
        return {name: time_cuda(fn, grad_to_none=grad_to_none) for name, fn in fns.items()}
    grads = list(grad_to_none)
    ms: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            for x in grads:
                x.grad = None
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                ms[name].append((time.perf_counter() - t0) * 1e3)
    return {name: summarize(xs) for name, xs in ms.items()}


# ---------------------------------------------------------------------------------------------------------- memory

def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str,
                   grad_to_none: Iterable[torch.Tensor] = ()) -> float | None:
    """Peak CUDA memory that one call of `fn` allocates on top of what was already allocated (inputs excluded), in MiB.

    None on CPU, on purpose: there is no per-allocation high-water mark for CPU tensors without the profiler, and
    `resource.getrusage().ru_maxrss` is the process-lifetime peak RSS, which an earlier, bigger case (or the
    allocator's cached pages) hides completely. A number that is usually wrong is worse than no number.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    for x in grad_to_none:
        x.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def count_cuda_kernels(fn: Callable[[], Any], grad_to_none: Iterable[torch.Tensor] = ()) -> int | None:
    """GPU kernels (memset/memcpy included) one call of `fn` launches, from torch.profiler; None without CUDA or if
    the profiler fails (it is a diagnostic, never a reason to lose the timing). `.grad` of `grad_to_none` is cleared
    first, so a backward writes its gradient instead of launching an extra accumulate."""
    if not torch.cuda.is_available():
        return None
    grads = list(grad_to_none)
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()  # compile / autotune outside the profiled call
        torch.cuda.synchronize()
        for x in grads:
            x.grad = None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------- machine record

def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """Short hash of HEAD, "+dirty" when the tree differs from it (untracked files too); "unknown" outside a checkout
    (the GPU machine gets a copy of the tree that may lack .git)."""
    head = _run(["git", "rev-parse", "--short", "HEAD"])
    if head is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain"])  # untracked files count: new, uncommitted code is what ran
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    from nftcore.info import cpu_model as model

    return model()


@contextlib.contextmanager
def env_vars(values: dict[str, str]):
    """`values` set in os.environ for the duration (the dispatcher reads its flags per call), then restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@cache
def machine_info() -> dict[str, str]:
    """Where and with what a number was measured. Cached: the commit is read once per process."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "none"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    cores = os.cpu_count() or 0
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(),
        "cpu": f"{cpu_model()} ({cores} cores)",
        "gpu": gpu,
        "machine": gpu or f"{cpu_model()} ({cores} cores)",
        "device": "cuda" if gpu else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
        "commit": git_commit(),
    }


def print_machine() -> None:
    info = machine_info()
    print(" | ".join(f"{k}={v}" for k, v in info.items() if v))


# ---------------------------------------------------------------------------------------------------- results CSV

@dataclass
class Result:
    """One measured (case, provider, mode, dtype). `extra` holds anything case-specific (shape, GB/s, backend...)."""

    bench: str
    case: str
    provider: str
    mode: str
    dtype: str
    timing: Timing
    peak_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def csv_row(self) -> dict[str, str]:
        info = machine_info()
        return {
            "date": info["date"], "commit": info["commit"], "machine": info["machine"], "device": info["device"],
            "torch": info["torch"], "triton": info["triton"], "bench": self.bench, "case": self.case,
            "provider": self.provider, "mode": self.mode, "dtype": self.dtype,
            "p50_ms": f"{self.timing.p50:.4f}", "p20_ms": f"{self.timing.p20:.4f}", "p80_ms": f"{self.timing.p80:.4f}",
            "peak_mb": "" if self.peak_mb is None else f"{self.peak_mb:.1f}",
            # load1: the 1-minute load average, because a shared CPU machine's numbers mean little without it
            "extra": json.dumps({**self.extra, "threads": torch.get_num_threads(),
                                 "load1": round(os.getloadavg()[0], 2)}, sort_keys=True),
        }


def append_results(results: Sequence[Result], path: Path = RESULTS_CSV) -> None:
    """Append rows to the CSV, writing the header only when the file is new or empty. Refuses to append under a
    different header: old rows must stay readable, so a column change means a new file, not a silent shift."""
    path = Path(path)
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_COLUMNS:
            raise RuntimeError(f"{path} has columns {header}, expected {CSV_COLUMNS}; start a new results file")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if not exists:
            writer.writeheader()
        writer.writerows(r.csv_row() for r in results)



def record(results: Sequence[Result], no_record: bool) -> None:
    """A bench's last step: append its rows to results.csv (and say so) unless `--no-record` was given."""
    if not no_record:
        append_results(results)
        print(f"appended {len(results)} rows to {RESULTS_CSV}")


def write_json(results: Sequence[Result], path: str | Path) -> None:
    """The results as a JSON list of their CSV fields (timings in ms, `extra` as a dict): what a bench's `--json PATH`
    writes, so a test can run the script as a subprocess and check its numbers without importing it."""
    rows = [{"bench": r.bench, "case": r.case, "provider": r.provider, "mode": r.mode, "dtype": r.dtype,
             "p50_ms": r.timing.p50, "p20_ms": r.timing.p20, "p80_ms": r.timing.p80, "peak_mb": r.peak_mb,
             "extra": r.extra} for r in results]
    Path(path).write_text(json.dumps(rows, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------- table

def gbps(nbytes: float, ms: float) -> float | None:
    """Achieved bandwidth in GB/s (1e9 B/s), or None below BANDWIDTH_MIN_BYTES where it would be meaningless."""
    return nbytes / (ms * 1e-3) / 1e9 if nbytes >= BANDWIDTH_MIN_BYTES and ms > 0 else None


def format_table(results: Sequence[Result], baseline: str) -> str:
    """Aligned text table, one line per result: `p50 ms (p20-p80) | speedup vs baseline | GB/s | peak MB`.

    The baseline is the result with provider == `baseline` in the same (case, mode, dtype) group.
    """
    base = {(r.case, r.mode, r.dtype): r.timing.p50 for r in results if r.provider == baseline}
    header = ["case", "dtype", "mode", "provider", "p50 ms", "p20-p80 ms", "speedup", "GB/s", "peak MB"]
    rows = []
    for r in results:
        ref = base.get((r.case, r.mode, r.dtype))
        bw = r.extra.get("gbps")
        rows.append([
            r.case, r.dtype, r.mode, r.provider, f"{r.timing.p50:.3f}", f"{r.timing.p20:.3f}-{r.timing.p80:.3f}",
            f"{ref / r.timing.p50:.2f}x" if ref else "-", "-" if bw is None else f"{bw:.3g}",
            f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    numeric = {4, 5, 6, 7, 8}

    def line(cells):
        return " | ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "-+-".join("-" * w for w in widths), *map(line, rows)])


def print_table(results: Sequence[Result], baseline: str) -> None:
    print(format_table(results, baseline))
    sys.stdout.flush()
