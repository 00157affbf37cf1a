"""Benchmark of the MLLM judge (`nftcore.reward.MLLMScorer`) against the `generate()`-based reference.

Why this baseline: Edit-R1's transformers reward server reads the six digit logits through
`generate(max_new_tokens=1, output_logits=True)` over the processor's batch; here it is given the same batch with
left padding (a stronger baseline than its one-image-at-a-time calls). It comes from the tests' reference
(`nftcore/testing/reference_judge.py`). Providers:

- `generate`: processor + `generate(max_new_tokens=1, output_logits=True)` + softmax over the digit logits.
  **The baseline of the speedup column.**
- `scorer:one-forward`: `MLLMScorer.score(..., share_prefix=False)`: the vision tower once per distinct image (a
  group's source once), one left-padded forward of the language model over the whole conversations (last layer's
  MLP on the last position only), `score_logits` over the digit rows.
- `scorer:shared-prefix`: the default `score(...)`: as above, but each group's [system, source image] prefix runs
  through the language model once and the K continuations run on its gathered key/value cache.

The model is a random Qwen2.5-VL with the real Qwen2 vocabulary (151657 tokens, tied embeddings), small enough for
a CPU but with the real shapes' proportions: hidden 384, 8 layers, 6 heads / 2 KV heads, vision depth 2 (~74 M
params). The batch is G groups x K edits of 448x448 images (256 image tokens each; training uses 512x512 -> 324).

Time: wall clock per call (median, p20-p80; providers interleaved by `bench/harness.time_many`) and the process's
CPU time per call (`time.process_time`, all threads), which is the steadier number on a machine shared with other
jobs; with `--threads 1` the two agree on an idle machine.

Memory: each provider runs in its own subprocess: it loads the model, scores once (warm-up), returns freed heap to
the OS (`malloc_trim`), resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), scores again and reads
VmHWM: `peak MB` is that call's peak RSS above the loaded process. A third call runs under the profiler for the
peak of live torch tensor bytes (`tensor_peak_mb`, the steadier number: RSS also moves with the allocator's
caching). The process's lifetime peak (ru_maxrss, dominated by loading) is kept in `extra` too.

    python bench/bench_scorer.py                       # 2 groups x 4 edits, 448^2, CPU fp32, 1 thread
    python bench/bench_scorer.py --groups 2 --k 12 --repeats 3 --no-record
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_scorer.py`: make `bench` and `nftcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import harness  # noqa: E402
from nftcore.reward import MLLMScorer  # noqa: E402
from nftcore.testing.memory import peak_allocated_bytes  # noqa: E402
from nftcore.testing.reference_judge import generate_scores  # noqa: E402
from nftcore.testing.tiny_judge import qwen_tokenizer, random_images, save_tiny_judge, tiny_config  # noqa: E402
from nftcore.utils.qwen_vl import build_processor  # noqa: E402

BENCH = "scorer"
BASELINE = "generate"
PROVIDERS = ("generate", "scorer:one-forward", "scorer:shared-prefix")
MODEL = dict(hidden=384, layers=8, heads=6, kv_heads=2, intermediate=1152, mrope_section=(8, 12, 12),
             vision_depth=2, vision_hidden=256, vision_heads=4, vision_intermediate=1024, tie_word_embeddings=True)
INSTRUCTIONS = ["replace the red car with a blue vintage bicycle leaning against the brick wall",
                "make the sky look like a sunset and add warm light on the buildings",
                "remove the person on the left and fill the background naturally",
                "turn the photo into a watercolor painting while keeping the composition"]
REQUIREMENTS = ["the bicycle is blue and vintage; the wall and street are unchanged",
                "the sky is orange-red; the buildings keep their shapes",
                "no trace of the person remains; the background is continuous",
                "watercolor texture everywhere; objects stay where they were"]


def build_model_folder(folder: Path, seed: int = 0) -> Path:
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = qwen_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tok, **MODEL)).eval()
    return save_tiny_judge(folder, model, tok, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def make_batch(groups: int, k: int, size: int, seed: int = 0):
    """G groups x K edits: each group one source and one instruction; all images size x size."""
    sources = random_images(seed, [(size, size)] * groups)
    edited = random_images(seed + 1, [(size, size)] * (groups * k))
    return (edited, [s for s in sources for _ in range(k)],
            [INSTRUCTIONS[g % len(INSTRUCTIONS)] for g in range(groups) for _ in range(k)],
            [REQUIREMENTS[g % len(REQUIREMENTS)] for g in range(groups) for _ in range(k)])


def make_providers(scorer: MLLMScorer, batch):
    """name -> zero-argument callable returning [B] scores."""
    processor = build_processor(scorer.tokenizer, scorer.image_processor)
    return {"generate": lambda: generate_scores(scorer, processor, *batch),
            "scorer:one-forward": lambda: scorer.score(*batch, share_prefix=False),
            "scorer:shared-prefix": lambda: scorer.score(*batch, share_prefix=True)}


def with_cpu_time(fn, sink: list[float]):
    """`fn` that also appends its process CPU time (ms, all threads) to `sink`: on a machine shared with other jobs
    CPU time is far steadier than wall time, which includes waiting for a core."""
    def timed():
        c0 = time.process_time()
        out = fn()
        sink.append((time.process_time() - c0) * 1e3)
        return out

    return timed


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them, and they would count as 'loaded' RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(args) -> None:
    """Subprocess body: load, warm up, then (1) the RSS high-water mark of one call above the loaded, trimmed
    process and (2) the peak of live torch tensor bytes during one call (profiler allocation events). Prints JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    scorer = MLLMScorer.from_pretrained(args.folder, dtype=torch.float32)
    fn = make_providers(scorer, make_batch(args.groups, args.k, args.size))[args.memory_worker]
    fn()
    gc.collect()
    _trim_heap()
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        resettable = True
    except OSError:
        resettable = False
    fn()
    peak = _status_kb("VmHWM")
    tensor_peak = peak_allocated_bytes(fn) / 2**20
    print(json.dumps({"loaded_mb": before / 1024, "call_peak_mb": (peak - before) / 1024 if resettable else None,
                      "tensor_peak_mb": tensor_peak,
                      "lifetime_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_memory(args, provider: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", provider, "--folder", str(args.folder),
           "--groups", str(args.groups), "--k", str(args.k), "--size", str(args.size), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[harness.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--k", type=int, default=4, help="edits per group")
    p.add_argument("--size", type=int, default=448, help="image side in pixels (sources and edits)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). Default 1: on the shared 2-core CPU machine two\n"
                        "OpenMP threads wait on each other's busy core at every op, which swamps the comparison")
    p.add_argument("--no-memory", action="store_true", help="skip the per-provider memory subprocesses")
    p.add_argument("--no-record", action="store_true", help=f"do not append to {harness.RESULTS_CSV.name}")
    p.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    harness.print_machine()
    names = [n for n in args.providers.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="nftcore-bench-judge-") as tmp:
        args.folder = build_model_folder(Path(tmp))
        scorer = MLLMScorer.from_pretrained(args.folder, dtype=torch.float32)
        params = sum(p.numel() for p in scorer.model.parameters()) / 1e6
        batch = make_batch(args.groups, args.k, args.size)
        n_images = len(batch[0])
        fns = {n: f for n, f in make_providers(scorer, batch).items() if n in names}
        ref = fns[BASELINE]() if BASELINE in fns else None
        errors = {n: (f() - ref).abs().max().item() if ref is not None else None for n, f in fns.items()}
        cpu_ms: dict[str, list[float]] = {n: [] for n in fns}
        timings = harness.time_many({n: with_cpu_time(f, cpu_ms[n]) for n, f in fns.items()}, "cpu",
                                    warmup=args.warmup, repeats=args.repeats)
        memory = {n: ({} if args.no_memory else measure_memory(args, n)) for n in fns}
    case = f"{args.groups}x{args.k}@{args.size}"
    results = []
    for n in fns:
        t, mem = timings[n], memory[n]
        cpu_p50 = statistics.median(cpu_ms[n][args.warmup:])
        extra = {"images": n_images, "img_per_s": round(n_images / (t.p50 / 1e3), 3), "params_M": round(params, 1),
                 "cpu_ms_p50": round(cpu_p50, 1), "img_per_cpu_s": round(n_images / (cpu_p50 / 1e3), 3),
                 "max_err_vs_generate": errors[n], "loaded_rss_mb": mem.get("loaded_mb"),
                 "tensor_peak_mb": mem.get("tensor_peak_mb"),
                 "lifetime_peak_rss_mb": mem.get("lifetime_peak_mb")}
        results.append(harness.Result(BENCH, case, n, "fwd", "fp32", t, mem.get("call_peak_mb"), extra))
    harness.print_table(results, BASELINE)
    base_cpu = next((r.extra["cpu_ms_p50"] for r in results if r.provider == BASELINE), None)
    for r in results:
        vs = f" ({base_cpu / r.extra['cpu_ms_p50']:.2f}x)" if base_cpu else ""
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        tensors = r.extra.get("tensor_peak_mb")
        print(f"{r.provider:22s} wall {r.extra['img_per_s']:6.3f} img/s | process CPU {r.extra['img_per_cpu_s']:6.3f} "
              f"img/cpu-s{vs} | max|score - generate| {r.extra['max_err_vs_generate']:.1e} | "
              f"call peak: RSS +{peak} MB, "
              f"torch tensors {'-' if tensors is None else f'{tensors:.0f}'} MB "
              f"(process lifetime RSS peak {r.extra.get('lifetime_peak_rss_mb') or 0:.0f} MB)")
    if not args.no_record:
        harness.append_results(results)
    return results


if __name__ == "__main__":
    main()
