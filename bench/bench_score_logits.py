"""Benchmark of `nftcore.ops.score_logits` in full mode at the Qwen2.5-VL-7B LM head against `hidden @ W.T` +
`log_softmax`.

Why this baseline: it is what a caller writes without the op (and what `model(...).logits` costs at one position):
[M, V] logits in the head's dtype, a log_softmax of the same size, then a gather of the K ids. It comes from the
tests' oracle (`nftcore.ops.reference.naive_score_logits`, run in the head's dtype). Providers:

- `eager`: that baseline; the speedup column is relative to it.
- `nftcore:<backend>:full`: the op in full mode (vocabulary log-probs), backend as dispatched (CPU: the native C++
  kernels when `nftcore._C` is built - oneDNN/at::mm chunk GEMMs with a fused online logsumexp - else the chunked
  PyTorch fallback; CUDA: the Triton kernels).
- `nftcore:reference:full-reference`: the same op with Triton and the native kernels disabled (the chunked PyTorch
  reference), interleaved with the others so the native backend's gain over it is measured on the same load.
- `nftcore:<backend>:subset`: subset mode, what the reward actually uses (reads K rows of the head), for scale.

Measured per case: time (CPU: interleaved perf_counter repeats; CUDA: do_bench), peak memory one call adds on top of
its inputs (CUDA: the caching allocator's high-water mark; CPU: the high-water mark of torch's allocation events
under torch.profiler - the same measurement tests/test_score_logits.py uses to prove the fallback never holds
[M, V]), the max |error| against eager fp32 where that fits in memory, and on CUDA the ratio of the kernel's time to
the time of reading the head once at the copy bandwidth measured on the same GPU (the roofline; goal <= 1.15x in the
bandwidth-bound range M <~ 295 on H100).

    python bench/bench_score_logits.py                          # CPU: M = 1, 8, 64, fp32 head
    python bench/bench_score_logits.py --M 1,8,64,288 --dtype bf16 --no-record
    python bench/bench_score_logits.py --vocab 38016 --no-record  # a quarter of the head (a smaller machine)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_score_logits.py`: make `bench` and `nftcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import nftcore.ops  # noqa: E402
from bench import harness  # noqa: E402
from nftcore import _native  # noqa: E402
from nftcore.ops.reference import naive_score_logits  # noqa: E402
from nftcore.testing.memory import peak_allocated_bytes  # noqa: E402
from nftcore.testing.tiny_judge import QWEN_DIGIT_IDS  # noqa: E402

BENCH = "score_logits"
BASELINE = "eager"
# Qwen2.5-VL-7B: hidden 3584, lm_head Linear(3584, 152064). Not in bench/shapes.py yet.
HEAD_NAME, HIDDEN, VOCAB = "qwen2.5-vl-7b", 3584, 152064
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_REFERENCE = "full-reference"
REFERENCE_ENV = {"NFTCORE_DISABLE_TRITON": "1", "NFTCORE_DISABLE_NATIVE": "1"}


def _reference_backend():
    """The op's PyTorch reference backend for the duration (dispatch reads these per call)."""
    return harness.env_vars(REFERENCE_ENV)


def _on_reference(fn):
    def run():
        with _reference_backend():
            return fn()

    return run


def make_head(dtype: torch.dtype, device: torch.device, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """[V, H] head with logits of std ~3 for unit-variance hidden states (a confident LM), generated on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(vocab, HIDDEN, generator=g, device=device, dtype=torch.float32).mul_(3.0 / HIDDEN**0.5)
    return weight.to(dtype)  # 16-bit: converted copy, and the fp32 one is freed on return


def make_hidden(M: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(M)
    return torch.randn(M, HIDDEN, generator=g, device=device, dtype=torch.float32).to(dtype)


def cpu_peak_mb(fn) -> float | None:
    try:
        return peak_allocated_bytes(fn) / 2**20
    except Exception as exc:  # noqa: BLE001 - private profiler API; a missing number beats a crashed benchmark
        print(f"  (CPU peak memory unavailable: {type(exc).__name__}: {exc})")
        return None


def head_read_ms(weight: torch.Tensor) -> tuple[float, float]:
    """(ms to read the head once, GB/s): a device-to-device copy of the head moves 2x its bytes; the roofline of a
    kernel that must read it once is bytes / that bandwidth."""
    dst = torch.empty_like(weight)
    t = harness.time_cuda(lambda: dst.copy_(weight)).p50
    nbytes = weight.numel() * weight.element_size()
    bw = 2 * nbytes / (t * 1e-3)
    return nbytes / bw * 1e3, bw / 1e9


def bench_case(M: int, dtype: torch.dtype, device: torch.device, providers: list[str], args,
               weight: torch.Tensor, read_ms: float | None) -> list[harness.Result]:
    hidden = make_hidden(M, dtype, device)
    ids = torch.tensor(QWEN_DIGIT_IDS, device=device)
    dname = next(k for k, v in DTYPES.items() if v == dtype)
    fns = {}
    for p in providers:
        if p == BASELINE:
            fns[p] = lambda: naive_score_logits(hidden, weight, ids, "full", dtype=dtype)
        elif p in ("full", "subset"):  # ids as a list, the reward's way: checked on the host, no device sync
            fns[p] = lambda mode=p: nftcore.ops.score_logits(hidden, weight, QWEN_DIGIT_IDS, mode=mode)
        elif p == FULL_REFERENCE:
            fns[p] = _on_reference(lambda: nftcore.ops.score_logits(hidden, weight, QWEN_DIGIT_IDS, mode="full"))
        else:
            raise SystemExit(f"unknown provider {p!r}; known: {BASELINE}, full, {FULL_REFERENCE}, subset")
    names = {}
    for p, fn in fns.items():  # one call each first: names the backend and compiles kernels
        fn()
        names[p] = p if p == BASELINE else f"nftcore:{nftcore.ops.last_backend('score_logits').value}:{p}"
    checked = dtype == torch.float32 or device.type == "cuda"  # an fp32 copy of a 16-bit head is 2.2 GB: GPU only
    if checked:
        ref_full = naive_score_logits(hidden, weight, ids, "full", dtype=torch.float32)
        ref_subset = torch.log_softmax(hidden.float() @ weight[ids].float().T, dim=-1)
    timings = harness.time_many(fns, device, warmup=args.warmup, repeats=args.repeats)
    results = []
    for p, fn in fns.items():
        extra = {"M": M, "H": weight.shape[1], "V": weight.shape[0], "K": len(QWEN_DIGIT_IDS)}
        if names[p].startswith("nftcore:native") and p != "subset":
            extra["gemm"] = _native.gemm()
        if checked:
            ref = ref_subset if p == "subset" else ref_full
            extra["max_err_vs_fp32"] = float(f"{(fn().float() - ref).abs().max().item():.3e}")
        if device.type == "cuda":
            peak = harness.peak_memory_mb(fn, device)
            if read_ms is not None and p != "subset":
                extra["x_head_read"] = round(timings[p].p50 / read_ms, 3)
        else:
            peak = cpu_peak_mb(fn)
        if p != "subset":  # bytes a full pass must read: the head once
            bw = harness.gbps(weight.numel() * weight.element_size(), timings[p].p50)
            if bw is not None:
                extra["gbps"] = round(bw, 1)
        case = f"{HEAD_NAME}_M{M}" if weight.shape[0] == VOCAB else f"{HEAD_NAME}_V{weight.shape[0]}_M{M}"
        results.append(harness.Result(BENCH, case, names[p], "fwd", dname, timings[p], peak, extra))
    return results


def main(argv: list[str] | None = None) -> list[harness.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--M", default="", help="comma-separated rows (scored positions); default 1,8,64 on CPU, "
                                          "1,8,64,288 on CUDA")
    p.add_argument("--dtype", default="", help="head dtype: " + ", ".join(DTYPES) + " (default fp32 on CPU, where "
                                              "bf16 GEMMs are slow, bf16 on CUDA)")
    p.add_argument("--providers", default=f"{BASELINE},full,{FULL_REFERENCE},subset")
    p.add_argument("--vocab", type=int, default=VOCAB, help=f"head rows (default {VOCAB}, the real head; smaller "
                                                              "for a machine short of memory or time)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats on CPU (CUDA uses do_bench's time budget)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-record", action="store_true", help=f"do not append to {harness.RESULTS_CSV.name}")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    Ms = [int(m) for m in (args.M or ("1,8,64,288" if device.type == "cuda" else "1,8,64")).split(",")]
    dtypes = [DTYPES[d] for d in (args.dtype or ("bf16" if device.type == "cuda" else "fp32")).split(",")]
    providers = args.providers.split(",")

    harness.print_machine()
    results = []
    for dtype in dtypes:
        weight = make_head(dtype, device, vocab=args.vocab)
        read_ms = None
        if device.type == "cuda":
            read_ms, bw = head_read_ms(weight)
            print(f"head {HEAD_NAME} {dtype}: {weight.numel() * weight.element_size() / 1e9:.2f} GB, read once in "
                  f"{read_ms:.3f} ms at the measured copy bandwidth {bw:.0f} GB/s")
        for M in Ms:
            results += bench_case(M, dtype, device, providers, args, weight, read_ms)
        del weight
    harness.print_table(results, baseline=BASELINE)
    by_case = {}
    for r in results:
        by_case.setdefault((r.case, r.dtype), {})[r.provider.split(":")[-1]] = r
    for (case, dname), rs in by_case.items():
        base, full, full_ref = rs.get(BASELINE), rs.get("full"), rs.get(FULL_REFERENCE)
        if base and full:
            line = f"{case} {dname}: {full.provider} {base.timing.p50 / full.timing.p50:.2f}x eager"
            if full_ref:
                line += f", {full_ref.timing.p50 / full.timing.p50:.2f}x the reference backend"
            if base.peak_mb and full.peak_mb:
                less = base.peak_mb / full.peak_mb
                line += f"; peak {base.peak_mb:.1f} MB eager vs {full.peak_mb:.2f} MB ({less:.1f}x less)"
            if "x_head_read" in full.extra:
                line += f"; full mode at {full.extra['x_head_read']:.2f}x the head-read time"
            print(line)
    harness.record(results, args.no_record)
    return results


if __name__ == "__main__":
    main()
