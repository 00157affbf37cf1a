"""Benchmark of the fused MMDiT block ops on CPU: `adaln`, `gated_adaln`, `gated_residual`, `rms_norm` (+ RoPE),
`gelu_tanh` (the MLP activation, on [B, N, 4C]), the native C++ kernels (`csrc/block_ops.cpp`, `csrc/rms_norm.cpp`,
`csrc/gelu.cpp`) against the ops' PyTorch reference backend.

Providers, per (op, case, dtype, mode):
- `reference`: the public op with the native kernels (and Triton) disabled, i.e. its eager PyTorch reference backend
  (aten's fused LayerNorm kernels, a few whole-tensor ops) - the baseline of the speedup column;
- `native`: the public op as dispatch picks it on CPU (the native kernels when `nftcore._C` is built; the provider
  is renamed `nftcore:<backend>` after what really ran);
- `eager`: the formula as diffusers writes it, in the input dtype, differentiated by autograd (for scale).
The three run interleaved (harness.time_many), so a shared machine's drift hits them alike. `full` = forward, then
backward with fixed cotangents into every input (x, y and the modulation vectors / the norm weight); `fwd` = no grad.
Every provider is first checked against an fp64 evaluation of the reference (relative max error into `extra`), so a
fast wrong result cannot pass as a speedup.

Cases: `flux_3072` (FLUX / Qwen-Image width: B 2, 1024 target + 512 text tokens, C 3072, 24 heads of 128),
`mmdit_bench` (bench/bench_mmdit.py's model: B 2, 2112 tokens, C 256, 4 heads of 64) and `demo` (the embedded demo's
MMDiT: its micro-batch, 2 x 16 image tokens + 7 text tokens, C 64, 2 heads of 32; overhead-bound).

    python bench/bench_block_ops.py --no-record                       # every op and case, fp32 and bf16, both modes
    python -m bench.bench_block_ops --op adaln,rms_norm --case flux_3072 --dtype bf16 --mode full --no-record
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/bench_block_ops.py`: make `bench` and `nftcore` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import harness  # noqa: E402
from nftcore import ops  # noqa: E402
from nftcore.ops.adaln import adaln_reference, gated_adaln_reference, gated_residual_reference  # noqa: E402
from nftcore.ops.rms_norm import rms_norm_reference  # noqa: E402

BENCH = "block_ops"
BASELINE = "reference"
EPS = 1e-6
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE_ENV = {"NFTCORE_DISABLE_TRITON": "1", "NFTCORE_DISABLE_NATIVE": "1"}
# Relative max error vs fp64 (outputs and gradients) above which a provider is flagged; bf16: the reference backend's
# own dscale reaches 5-7e-2 at C = 3072.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 1e-2}


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    N: int
    C: int
    heads: int
    head_dim: int
    note: str = ""


def _demo_case() -> Case:
    """The demo's MMDiT at its training micro-batch, read from its config (not hard-coded)."""
    from nftcore.config import demo
    from nftcore.demo.model import DemoConfig, default_transformer_config
    from nftcore.demo.world import MAX_TOKENS

    cfg, model = DemoConfig(), default_transformer_config()
    heads, head_dim = model.num_attention_heads, model.attention_head_dim
    return Case("demo", B=demo().sampling.batch_size, N=2 * cfg.tokens + MAX_TOKENS, C=heads * head_dim, heads=heads,
                head_dim=head_dim, note="the embedded CPU demo (overhead-bound)")


def _mmdit_bench_case() -> Case:
    from bench.bench_mmdit import BATCH, CONFIG, GRID, TEXT

    heads, head_dim = CONFIG["num_attention_heads"], CONFIG["attention_head_dim"]
    return Case("mmdit_bench", B=BATCH, N=2 * GRID[0] * GRID[1] + TEXT, C=heads * head_dim, heads=heads,
                head_dim=head_dim, note="bench/bench_mmdit.py's model")


CASES = {
    "flux_3072": Case("flux_3072", B=2, N=1024 + 512, C=3072, heads=24, head_dim=128,
                      note="FLUX / Qwen-Image width, 1024 image + 512 text tokens"),
    "mmdit_bench": _mmdit_bench_case(),
    "demo": _demo_case(),
}
OPS = ("adaln", "gated_adaln", "gated_residual", "rms_norm", "gelu_tanh")


# ----------------------------------------------------------------------------------------------------------------
# Inputs as the MMDiT makes them, and the diffusers-style eager formulas.


def make_inputs(op: str, case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """(tensors, kwargs) of one call: x, y [B, N, C] contiguous, modulation vectors chunks of one [B, 6C] Linear output
    (batch stride 6C); q a strided view of a fused [B, N, 3·H·D] QKV output, RoPE tables [N, D/2] fp32."""
    g = torch.Generator().manual_seed(seed)
    B, N, C = case.B, case.N, case.C
    if op == "rms_norm":
        qkv = torch.randn(B, N, 3 * C, generator=g).to(dtype)
        q = qkv.unflatten(-1, (3, case.heads, case.head_dim)).unbind(2)[0]
        w = (1 + 0.1 * torch.randn(case.head_dim, generator=g)).to(dtype)
        angle = torch.arange(N, dtype=torch.float64)[:, None] / 10000 ** (
            torch.arange(case.head_dim // 2, dtype=torch.float64) / (case.head_dim // 2))
        return [q, w], {"rope": (angle.cos().float(), angle.sin().float())}
    if op == "gelu_tanh":  # the MLP's hidden activations: 4C wide, fc1 outputs of a few units
        return [(2 * torch.randn(B, N, 4 * C, generator=g)).to(dtype)], {}
    x, y = torch.randn(B, N, C, generator=g).to(dtype), torch.randn(B, N, C, generator=g).to(dtype)
    mod = (0.5 * torch.randn(B, 6 * C, generator=g)).to(dtype)
    shift, scale, gate = mod[:, :C], mod[:, C:2 * C], mod[:, 2 * C:3 * C]
    return {"adaln": [x, scale, shift], "gated_adaln": [x, gate, y, scale, shift],
            "gated_residual": [x, gate, y]}[op], {}


def _adaln_eager(x, scale, shift):
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def _rms_norm_eager(x, weight, rope):
    """diffusers' RMSNorm then apply_rotary_emb (use_real_unbind_dim=-1, fp32 rotation, cast back)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(weight.dtype) * weight
    cos, sin = (t.repeat_interleave(2, -1)[None, :, None] for t in rope)
    real, imag = y.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (y.float() * cos + rotated.float() * sin).to(y.dtype)


EAGER = {
    "adaln": _adaln_eager,
    "gated_adaln": lambda x, gate, y, scale, shift: (lambda h: (h, _adaln_eager(h, scale, shift)))(
        x + gate[:, None] * y),
    "gated_residual": lambda x, gate, y: x + gate[:, None] * y,
    "rms_norm": _rms_norm_eager,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
OP = {"adaln": ops.adaln, "gated_adaln": ops.gated_adaln, "gated_residual": ops.gated_residual,
      "rms_norm": lambda x, w, rope: ops.rms_norm(x, w, EPS, rope=rope), "gelu_tanh": ops.gelu_tanh}
TRUTH = {"adaln": adaln_reference, "gated_adaln": gated_adaln_reference, "gated_residual": gated_residual_reference,
         "rms_norm": lambda x, w, rope: rms_norm_reference(x, w, EPS, [t.double() for t in rope]),
         "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


# ----------------------------------------------------------------------------------------------------------------
# One case.


def _relative_error(fn, tensors, kwargs, grad_outs, truth) -> float:
    """Max over outputs and gradients of max|got − truth| / max|truth|."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    outs = _tuple(fn(*leaves, **kwargs))
    grads = torch.autograd.grad(outs, leaves, grad_outs)
    err = 0.0
    for got, want in zip([*outs, *grads], truth):
        err = max(err, ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item())
    return err


def _truth(op, tensors, kwargs, grad_outs):
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    outs = _tuple(TRUTH[op](*leaves, **kwargs))
    return [*(o.detach() for o in outs), *torch.autograd.grad(outs, leaves, [g.double() for g in grad_outs])]


@contextlib.contextmanager
def _provider_env(provider: str):
    if provider == BASELINE:
        with harness.env_vars(REFERENCE_ENV):
            yield
    else:
        yield


def _step(provider, fn, leaves, kwargs, grad_outs, mode):
    def call():
        with _provider_env(provider):
            if mode == "fwd":
                with torch.no_grad():
                    return fn(*leaves, **kwargs)
            torch.autograd.backward(_tuple(fn(*leaves, **kwargs)), grad_outs)

    return call


def bench_case(op: str, case: Case, dtype: torch.dtype, mode: str, providers: list[str], args) -> list[harness.Result]:
    dname = next(k for k, v in DTYPES.items() if v == dtype)
    tensors, kwargs = make_inputs(op, case, dtype)
    with torch.no_grad():
        outs = _tuple(OP[op](*tensors, **kwargs))
    g = torch.Generator().manual_seed(1)
    grad_outs = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    truth = _truth(op, tensors, kwargs, grad_outs)
    leaves = [t.detach().clone().requires_grad_(mode == "full") for t in tensors]
    steps, extras = {}, {}
    for provider in providers:
        fn = EAGER[op] if provider == "eager" else OP[op]
        with _provider_env(provider):
            err = _relative_error(fn, tensors, kwargs, grad_outs, truth)
            backend = ops.last_backend(op)
        name = provider
        if provider == "native":
            name = f"nftcore:{backend.value}"
        if err > TOLERANCE[dtype]:
            print(f"WARNING {op} {case.name} {dname} {name}: relative error {err:.2e} vs fp64")
        steps[name] = _step(provider, fn, leaves, kwargs, grad_outs, mode)
        extras[name] = {"op": op, "B": case.B, "N": case.N, "C": case.C, "rel_err": float(f"{err:.3e}")}
    timings = harness.time_many(steps, "cpu", grad_to_none=leaves, warmup=args.warmup, repeats=args.repeats)
    return [harness.Result(BENCH, f"{op}/{case.name}", name, mode, dname, timings[name], None, extras[name])
            for name in steps]


def print_ratios(results: list[harness.Result]) -> None:
    """reference / native and eager / native per (op, case, dtype, mode): p50 ratios of the interleaved runs."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r.case, r.dtype, r.mode), {})[r.provider] = r.timing.p50
    for (case, dname, mode), p50 in groups.items():
        fused = p50.get("nftcore:native")
        if fused is None:
            continue
        parts = [f"{other} / native = {p50[other] / fused:.2f}x" for other in (BASELINE, "eager") if other in p50]
        print(f"{case:28s} {dname} {mode:4s}: " + ", ".join(parts))


def main(argv: list[str] | None = None) -> list[harness.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--op", default=",".join(OPS), help="comma-separated from " + ", ".join(OPS))
    p.add_argument("--case", default=",".join(CASES), help="comma-separated from " + ", ".join(CASES))
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated from " + ", ".join(DTYPES))
    p.add_argument("--mode", default="fwd,full", help="fwd (no grad) and/or full (forward + backward)")
    p.add_argument("--providers", default=f"{BASELINE},native,eager")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-record", action="store_true", help=f"do not append to {harness.RESULTS_CSV.name}")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    harness.print_machine()
    results = []
    for case in args.case.split(","):
        for op in args.op.split(","):
            for dname in args.dtype.split(","):
                for mode in args.mode.split(","):
                    results += bench_case(op, CASES[case], DTYPES[dname], mode, args.providers.split(","), args)
    harness.print_table(results, baseline=BASELINE)
    print_ratios(results)
    harness.record(results, args.no_record)
    return results


if __name__ == "__main__":
    main()
