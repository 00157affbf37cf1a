"""Benchmark of `nftcore.ops.attention` (Triton on CUDA) against PyTorch SDPA's backends and flash-attn, at the joint
attention shapes of FLUX.1-Kontext and Qwen-Image-Edit and at the FlashAttention paper protocol.

Why these baselines: default SDPA on H100 is FlashAttention-2 (~330 TFLOP/s at D=128), the easy
one; cuDNN attention (~600 TFLOP/s) and FA3 are the real ceiling, so both are always in the table. SDPA gets its
preferred [B, H, N, D] layout as the transposed views diffusers passes it; nftcore reads [B, N, H, D] directly.
`nftcore+rope` adds the in-kernel RoPE (what the model calls); `sdpa+rope` is diffusers' way: rotate q and k in
eager fp32, then SDPA - the pair to compare for "what does fusing RoPE buy".

FLOPs: forward 4·B·H·N²·D, backward 2.5× forward. Every provider's output is first checked
against SDPA-math in fp32 (relative max error printed, and a warning past the bf16/fp16 tolerance), so a fast
wrong kernel cannot pass as a speedup.

    python bench/bench_attention.py                          # CUDA: edit shapes, B ∈ {1,2,3}; CPU: a smoke shape
    python bench/bench_attention.py --shape paper --mode fwd,bwd
    python bench/bench_attention.py --sweep fwd --shape kontext_1024_b1   # re-tune one kernel's block config

On CPU the Triton kernels only run interpreted (pointless to time), so the CPU run times SDPA and the op's
reference backend on a tiny shape and exits: it checks the script, not the kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_attention.py`: make `bench` and `nftcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nftcore.ops  # noqa: E402
from bench import harness  # noqa: E402
from bench.shapes import ATTENTION_SHAPES, AttentionShape  # noqa: E402

BENCH = "attention"
BASELINE = "sdpa"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative max error vs fp32 SDPA-math above which a provider is flagged: a few bf16/fp16 ulps of O(1) outputs.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}
FLASH_PAPER_TOKENS = 16 * 1024  # FA2/FA3 protocol: B·N = 16k tokens, hidden 2048 → H = 16 at D = 128


def _shapes() -> dict[str, AttentionShape]:
    """The registry's edit shapes at B ∈ {1, 2, 3} (Edit-R1 micro-batches), the paper protocol, a CPU smoke shape."""
    out = {}
    for shape in ATTENTION_SHAPES.values():
        for b in (1, 2, 3):
            out[f"{shape.name}_b{b}"] = dataclasses.replace(shape, name=f"{shape.name}_b{b}", B=b)
    for n in (512, 1024, 2048, 4096, 8192, 16384):
        out[f"paper_n{n}"] = AttentionShape(f"paper_n{n}", B=FLASH_PAPER_TOKENS // n, H=16, N=n, D=128,
                                            note="FlashAttention-2/3 paper protocol")
    out["cpu_smoke"] = AttentionShape("cpu_smoke", B=1, H=2, N=257, D=64, note="CPU script check only")
    return out


SHAPES = _shapes()
GROUPS = {
    "edit": [n for n in SHAPES if n.startswith(("kontext", "qwen"))],
    "paper": [n for n in SHAPES if n.startswith("paper")],
}


def _rope(n: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    theta = torch.arange(n, device=device, dtype=torch.float32)[:, None] * 10000.0 ** (
        -torch.arange(d // 2, device=device, dtype=torch.float32) * 2 / d)
    return theta.cos(), theta.sin()  # [N, D/2]


def _rotate_eager(x, cos, sin):
    """diffusers' apply_rotary_emb(use_real=True, unbind_dim=-1) on [B, N, H, D]: fp32 math, cast back."""
    xf = x.float().unflatten(-1, (-1, 2))
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((xf[..., 0] * c - xf[..., 1] * s, xf[..., 0] * s + xf[..., 1] * c), -1).flatten(-2).to(x.dtype)


def _sdpa(backend=None, rope=None):
    def fn(q, k, v):
        if rope is not None:
            q, k = _rotate_eager(q, *rope), _rotate_eager(k, *rope)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, D] views, as diffusers
        if backend is None:
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

    return fn


def providers(device: torch.device, shape: AttentionShape) -> dict:
    """name → callable(q, k, v) on [B, N, H, D] tensors."""
    from torch.nn.attention import SDPBackend

    rope = _rope(shape.N, shape.D, device)
    out = {
        "sdpa": _sdpa(),
        "nftcore": lambda q, k, v: nftcore.ops.attention(q, k, v),
        "nftcore+rope": lambda q, k, v: nftcore.ops.attention(q, k, v, rope=rope),
        "sdpa+rope": _sdpa(rope=rope),
    }
    if device.type == "cuda":
        out["sdpa-cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION)
        out["sdpa-flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
        if importlib.util.find_spec("flash_attn") is not None:
            from flash_attn import flash_attn_func  # [B, N, H, D], like nftcore

            out["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v)
        if importlib.util.find_spec("flash_attn_interface") is not None:  # FlashAttention-3 (Hopper)
            from flash_attn_interface import flash_attn_func as fa3

            out["flash-attn3"] = lambda q, k, v: (lambda r: r[0] if isinstance(r, tuple) else r)(fa3(q, k, v))
    return out


def make_inputs(shape: AttentionShape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = (shape.B, shape.N, shape.H, shape.D)
    q, k, v, grad = (torch.randn(size, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    return [x.requires_grad_(True) for x in (q, k, v)], grad


def _reference(qkv, rope) -> torch.Tensor:
    """fp32 SDPA-math output [B, N, H, D] (the inputs rotated in fp32 first when `rope` is given)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x.detach().float() for x in qkv)
    if rope is not None:
        q, k = _rotate_eager(q, *rope), _rotate_eager(k, *rope)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _rel_err(fn, qkv, ref) -> float:
    with torch.no_grad():
        got = fn(*(x.detach() for x in qkv)).float()
    return ((got - ref).abs().max() / ref.abs().max()).item()


def bench_case(shape, dtype, modes, names, device, args) -> list[harness.Result]:
    qkv, grad = make_inputs(shape, dtype, device)
    dname = next(k for k, v in DTYPES.items() if v == dtype)
    fns = providers(device, shape)
    refs = {}  # one fp32 reference per case and RoPE setting, not one per provider (it is O(N²) memory)
    results = []
    for name in [n for n in names if n in fns]:
        fn = fns[name]
        with_rope = name.endswith("+rope")
        if with_rope not in refs:
            refs[with_rope] = _reference(qkv, _rope(shape.N, shape.D, device) if with_rope else None)
        try:
            err = _rel_err(fn, qkv, refs[with_rope])
        except RuntimeError as exc:  # a backend that does not take these inputs (e.g. cuDNN on an old card)
            print(f"skip {name} at {shape.name} {dname}: {str(exc).splitlines()[0]}")
            continue
        label = name
        if name.startswith("nftcore"):
            backend = nftcore.ops.last_backend("attention")
            label = f"{name}:{backend.value if backend is not None else '?'}"
        if err > TOLERANCE[dtype]:
            print(f"WARNING {shape.name} {dname} {label}: relative max error {err:.2e} vs fp32 SDPA-math")
        for mode in modes:
            if mode == "fwd":
                step, flops = (lambda f=fn: f(*qkv)), shape.flops("fwd")
            else:  # bwd alone: one forward outside the timed region, backward with retain_graph inside
                out = fn(*qkv)
                step, flops = (lambda o=out: o.backward(grad, retain_graph=True)), shape.flops("bwd")
            try:
                timing = harness.time_fn(step, device, grad_to_none=qkv, warmup=args.warmup, repeats=args.repeats)
            except RuntimeError as exc:
                print(f"skip {label} {mode} at {shape.name}: {str(exc).splitlines()[0]}")
                continue
            peak = harness.peak_memory_mb(step, device, grad_to_none=qkv)
            tflops = flops / (timing.p50 * 1e-3) / 1e12
            extra = {"B": shape.B, "H": shape.H, "N": shape.N, "D": shape.D, "tflops": float(f"{tflops:.4g}"),
                     "rel_err": float(f"{err:.3e}")}
            if name.startswith("nftcore") and device.type == "cuda":
                kern = importlib.import_module("nftcore.kernels.attention")
                extra["configs"] = {kn: kern.select_config(kn, shape.D, dtype) for kn in ("fwd", "dkdv", "dq")}
            results.append(harness.Result(BENCH, shape.name, label, mode, dname, timing, peak, extra))
    return results


def print_tflops(results) -> None:
    """flash-attn style: TFLOP/s per provider and the ratio to the SDPA default, one row per (case, mode)."""
    names = list(dict.fromkeys(r.provider for r in results))
    rows = {}
    for r in results:
        rows.setdefault((r.case, r.mode, r.dtype), {})[r.provider] = r.extra["tflops"]
    print("\nTFLOP/s (ratio to sdpa)")
    print(" | ".join(["case", "mode", "dtype"] + names))
    for (case, mode, dtype), cells in rows.items():
        base = cells.get(BASELINE)
        fmt = [f"{cells[n]:.3g} ({cells[n] / base:.2f}x)" if n in cells and base else
               (f"{cells[n]:.3g}" if n in cells else "-") for n in names]
        print(" | ".join([case, mode, dtype] + fmt))


# The sweep grid per kernel (BLOCK_M, BLOCK_N, num_warps, num_stages): BLOCK_M is the query tile, BLOCK_N the key tile.
SWEEP_GRID = {
    "fwd": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))),
    "dkdv": list(itertools.product((32, 64), (64, 128), (4, 8), (2, 3, 4))),
    "dq": list(itertools.product((64, 128), (32, 64), (4, 8), (2, 3, 4))),
}


def _reference_grads(qkv, rope, grad) -> list[torch.Tensor]:
    """fp32 gradients of q, k, v for the upstream gradient `grad` (RoPE rotated in fp32 first)."""
    q, k, v = (x.detach().float().requires_grad_() for x in qkv)
    qr, kr = (_rotate_eager(q, *rope), _rotate_eager(k, *rope)) if rope is not None else (q, k)
    out = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return list(torch.autograd.grad(out, (q, k, v), grad.float()))


def _max_rel(got, ref) -> float:
    return max(((g.float() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref))


def sweep(kernel: str, shape: AttentionShape, dtype, device, args) -> None:
    """Time every config of `SWEEP_GRID[kernel]` at one shape with RoPE on (the training call), and check each one's
    output (fwd) or q/k/v gradients (dkdv, dq: a full backward) against fp32 SDPA; GPU only."""
    kern = importlib.import_module("nftcore.kernels.attention")
    bd = kern.padded_head_dim(shape.D)
    original = kern._GPU_CONFIGS[kernel][bd]
    qkv, grad = make_inputs(shape, dtype, device)
    rope = _rope(shape.N, shape.D, device)
    flops = shape.flops("fwd" if kernel == "fwd" else "bwd")
    ref = [_reference(qkv, rope)] if kernel == "fwd" else _reference_grads(qkv, rope, grad)
    tolerance = TOLERANCE[dtype] * (1 if kernel == "fwd" else 2)  # gradients sum over N: a little looser
    print(f"sweep {kernel} at {shape.name} {dtype} with RoPE (shipped: {original}); error tolerance {tolerance}")
    timings = []
    try:
        for cfg in SWEEP_GRID[kernel]:
            kern._GPU_CONFIGS[kernel][bd] = cfg
            try:
                if kernel == "fwd":
                    step = lambda: nftcore.ops.attention(*qkv, rope=rope)  # noqa: E731
                    with torch.no_grad():
                        err = _max_rel([step()], ref)
                else:
                    out = nftcore.ops.attention(*qkv, rope=rope)
                    step = lambda o=out: o.backward(grad, retain_graph=True)  # noqa: E731
                    err = _max_rel(torch.autograd.grad(out, qkv, grad, retain_graph=True), ref)
                ms = harness.time_fn(step, device, grad_to_none=qkv).p50
                ok = err <= tolerance
                if ok:
                    timings.append((ms, cfg))
                print(f"  {cfg}: {ms:.3f} ms  {flops / ms / 1e9:.0f} TFLOP/s  max rel err {err:.1e}"
                      f"{'' if ok else '  WRONG'}", flush=True)
            except Exception as exc:  # noqa: BLE001 - out of shared memory, too many registers: skip the config
                print(f"  {cfg}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})", flush=True)
    finally:
        kern._GPU_CONFIGS[kernel][bd] = original
    for ms, cfg in sorted(timings)[:5]:
        print(f"  best {kernel} {shape.name}: {cfg} {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)


def main(argv: list[str] | None = None) -> list[harness.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="", help=f"'edit', 'paper', 'all' or comma-separated names ({', '.join(SHAPES)});"
                                               " default: edit on CUDA, cpu_smoke on CPU")
    p.add_argument("--dtype", default="bf16", help="comma-separated from " + ", ".join(DTYPES))
    p.add_argument("--mode", default="fwd,bwd", help="comma-separated from fwd, bwd")
    p.add_argument("--providers", default="sdpa,sdpa-cudnn,sdpa-flash,flash-attn,flash-attn3,nftcore,nftcore+rope,"
                                          "sdpa+rope")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats on CPU (CUDA uses do_bench's time budget)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep", default="", choices=["", "fwd", "dkdv", "dq"], help="re-tune one kernel (CUDA only)")
    p.add_argument("--no-record", action="store_true", help=f"do not append to {harness.RESULTS_CSV.name}")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    names = args.shape or ("edit" if device.type == "cuda" else "cpu_smoke")
    names = list(SHAPES) if names == "all" else GROUPS.get(names) or names.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    dtypes = [DTYPES[d] for d in args.dtype.split(",")]
    harness.print_machine()
    if args.sweep:
        if device.type != "cuda":
            raise SystemExit("--sweep times the Triton kernels: CUDA only")
        for name in names:
            sweep(args.sweep, SHAPES[name], dtypes[0], device, args)
        return []

    results = []
    for name in names:
        for dtype in dtypes:
            results += bench_case(SHAPES[name], dtype, args.mode.split(","), args.providers.split(","), device, args)
    harness.print_table(results, baseline=BASELINE)
    print_tflops(results)
    harness.record(results, args.no_record)
    return results


if __name__ == "__main__":
    main()
