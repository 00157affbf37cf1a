"""One full-size FLUX.1-Kontext transformer block (hidden 3072, 24 heads x 128, MLP 12288) at the Kontext edit shapes:
nftcore's block with its attention op (Triton on CUDA) against the same block calling attention the way diffusers
does (RoPE in fp32 in eager PyTorch, then `F.scaled_dot_product_attention`, which picks cuDNN / FlashAttention).

Why this benchmark: a 12 B model does not fit a quick check, but every one of its 57 blocks is one of these two
(19 double-stream + 38 single-stream), so one block's time, throughput and activation memory scale to the whole model.
Shapes: an S x S edit gives (S/16)^2 target + (S/16)^2 source tokens plus 512 text tokens (T5 at Kontext's
max_sequence_length): 512^2 -> 2560 tokens, 1024^2 -> 8704. Batch 1, bf16 weights and activations.

Modes:
- fwd: no grad, as in rollouts;
- fwd+bwd: LoRA r32/alpha64 on the attention projections (Edit-R1's targets), base weights frozen, the block input
  requiring grad (as it does inside a LoRA model) - the update phase.
Model TFLOP/s counts the GEMMs and attention matmuls only: fwd = 24 N C^2 + 4 N^2 C per sample (both block kinds have
12 C^2 weights per token); a frozen-base backward computes input gradients only (1x the linear FLOPs) plus attention's
2.5x. Peak MB is the memory a call allocates beyond weights and inputs (`harness.peak_memory_mb`).

Per-op rows (`--what ops`): each fused block op (`nftcore.ops.adaln`, `gated_adaln`, `gated_residual`, and the QK
`rms_norm` with its RoPE) against its eager composition as diffusers writes it (LayerNorm then `* (1 + scale) +
shift`; `x + gate * y`; RMSNorm in fp32 cast back, times the weight, then `apply_rotary_emb`), at the same shape
(one block's stream: [1, N, C], q [1, N, H, D] as a view of the fused QKV output), fwd (no grad) and fwd+bwd (every
input requires grad, one random cotangent). On CPU the op runs its reference backend - the fallback, aten's fused
LayerNorm kernels - and the `backend` column says so.

    python bench/bench_mmdit_block.py                      # CUDA: both shapes, both modes, both providers
    python bench/bench_mmdit_block.py --shape kontext_512 --device cpu --hidden 256 --heads 4 --no-record   # smoke
    python bench/bench_mmdit_block.py --what ops --device cpu --dtype fp32 --hidden 256 --heads 4 --no-record
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from bench.bench_attention import _rotate_eager  # noqa: E402
from nftcore import ops  # noqa: E402
from nftcore.models import MMDiT, MMDiTConfig, blocks  # noqa: E402
from nftcore.models.lora import apply_lora  # noqa: E402
from nftcore.models.rope import flux_image_ids, flux_rope  # noqa: E402

TEXT_TOKENS = 512
SHAPES = {"kontext_512": 512, "kontext_1024": 1024}  # edit resolution in pixels
BASELINE = "sdpa"


def _sdpa_attention(q, k, v, *, key_padding_mask=None, rope=None, scale=None, deterministic=False):
    """What diffusers' FLUX attention processor does: RoPE in fp32 (cast back), then SDPA on [B, H, N, D] views
    (PyTorch picks cuDNN or FlashAttention on an H100/H200)."""
    if key_padding_mask is not None:
        raise ValueError("this benchmark runs without a padding mask")
    if rope is not None:
        q, k = (_rotate_eager(x, *(t[0] if t.dim() == 3 else t for t in rope)) for x in (q, k))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


@contextlib.contextmanager
def attention_provider(provider: str):
    """nftcore: the blocks call `nftcore.ops.attention` (the dispatcher picks Triton on CUDA); sdpa: the same blocks
    with that one call swapped for `_sdpa_attention` - everything else (the fused norms, which rotate q and k before
    attention in both providers) identical."""
    if provider == "nftcore":
        yield
        return
    original = blocks.ops
    blocks.ops = SimpleNamespace(**{name: getattr(ops, name) for name in ops.__all__}, attention=_sdpa_attention)
    try:
        yield
    finally:
        blocks.ops = original


def _axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's split of the head dim over (index, row, col): (16, 56, 56) at 128, the same proportions below."""
    side = head_dim * 7 // 16 // 2 * 2
    return head_dim - 2 * side, side, side


def build(hidden: int, heads: int, dtype: torch.dtype, device: torch.device) -> MMDiT:
    """A FLUX-family MMDiT with one double and one single block, LoRA on (adapter 'default' trainable)."""
    cfg = MMDiTConfig(family="flux", patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=1,
                      attention_head_dim=hidden // heads, num_attention_heads=heads, joint_attention_dim=4096,
                      pooled_projection_dim=768, guidance_embeds=True,
                      axes_dims_rope=_axes(hidden // heads))
    torch.manual_seed(0)
    model = MMDiT(cfg, dtype=dtype, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # small random weights: activations stay in range like a trained model's
        for block in model.blocks:  # RMSNorm weights of q/k: ones, as trained FLUX's are ~1
            for name, p in block.named_parameters():
                if name.endswith("_norm"):
                    p.fill_(1.0)
    apply_lora(model, rank=32, alpha=64.0, dtype=dtype)
    return model


def flops(n: int, c: int, mode: str) -> float:
    linear, attn = 24.0 * n * c * c, 4.0 * n * n * c
    return linear + attn if mode == "fwd" else 2 * linear + 3.5 * attn


def bench_shape(name: str, pixels: int, args, device, dtype) -> list[harness.Result]:
    model = build(args.hidden, args.heads, dtype, device)
    c, side = args.hidden, pixels // 16
    n_img, n_txt = 2 * side * side, TEXT_TOKENS
    img_ids = torch.cat([flux_image_ids(side, side, 0), flux_image_ids(side, side, 1)]).to(device)
    txt_ids = torch.zeros(n_txt, 3, device=device)
    rope = tuple(t.to(device) for t in flux_rope(txt_ids, img_ids, model.config.axes_dims_rope))
    g = torch.Generator(device=device).manual_seed(1)
    img = torch.randn(1, n_img, c, device=device, dtype=dtype, generator=g)
    txt = torch.randn(1, n_txt, c, device=device, dtype=dtype, generator=g)
    vec = torch.randn(1, c, device=device, dtype=dtype, generator=g)
    x = torch.cat([txt, img], dim=1)
    double, single = model.double_blocks[0], model.single_blocks[0]
    lora_params = [p for p in model.parameters() if p.requires_grad]

    def run(block: str, mode: str):
        grad = mode == "fwd+bwd"
        a, b, s = (t.detach().requires_grad_(grad) for t in (img, txt, x))
        with torch.set_grad_enabled(grad):
            if block == "double":
                out = double(a, b, vec, rope, None)
                total = out[0].float().square().mean() + out[1].float().square().mean() if grad else out
            else:
                out = single(s, vec, rope, None)
                total = out.float().square().mean() if grad else out
        if grad:
            total.backward()
        return out

    results = []
    for block in ("double", "single"):
        for mode in args.mode.split(","):
            outs = {}
            for provider in ("nftcore", BASELINE):
                with attention_provider(provider):
                    outs[provider] = run(block, "fwd")
                    backend = ops.last_backend("attention") if provider == "nftcore" else "sdpa"
                    fn = lambda: run(block, mode)  # noqa: E731
                    timing = harness.time_fn(fn, device, grad_to_none=lora_params, warmup=1, repeats=args.repeats)
                    peak = harness.peak_memory_mb(fn, device, grad_to_none=lora_params)
                tflops = flops(n_img + n_txt, c, mode) / (timing.p50 * 1e-3) / 1e12
                results.append(harness.Result(
                    "mmdit_block", f"{name}_{block}", provider, mode, str(dtype).removeprefix("torch."), timing, peak,
                    {"tokens": n_img + n_txt, "hidden": c, "heads": args.heads, "tflops": round(tflops, 1),
                     "attention_backend": str(backend)}))
                print(f"{name} {block:6s} {mode:7s} {provider:13s} {timing.p50:8.3f} ms  {tflops:6.1f} TFLOP/s  "
                      f"peak {peak if peak is None else round(peak, 1)} MB  attention={backend}", flush=True)
            ref, got = (outs[p][0] if block == "double" else outs[p] for p in (BASELINE, "nftcore"))
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"{name} {block}: relative L2 difference nftcore vs sdpa = {err:.2e}", flush=True)
    del model
    return results


# ---------------------------------------------------------------------------------------------------------------
# Per-op rows: each fused block op against its eager composition.

EPS = 1e-6


def _adaln_eager(x, scale, shift):
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def _gated_residual_eager(x, gate, y):
    return x + gate[:, None] * y


def _gated_adaln_eager(x, gate, y, scale, shift):
    h = x + gate[:, None] * y
    return h, _adaln_eager(h, scale, shift)


def _qk_norm_eager(q, weight, cos, sin):
    """diffusers' RMSNorm (fp32 statistics, cast back, times the weight) then apply_rotary_emb (fp32, cast back)."""
    qf = q.float()
    y = qf * torch.rsqrt(qf.pow(2).mean(-1, keepdim=True) + EPS)
    y = y.to(weight.dtype) * weight if weight.dtype in (torch.float16, torch.bfloat16) else (y * weight).to(q.dtype)
    return _rotate_eager(y, cos, sin)


def op_cases(n: int, c: int, heads: int, dtype: torch.dtype, device: torch.device):
    """{op: (nftcore fn, eager fn, inputs)} at one stream's shape: x, y [1, N, C]; scale/shift/gate chunks of one
    [1, 6C] modulation output; q [1, N, H, D] a view of a [1, N, 3C] QKV output; RoPE tables [N, D/2] fp32."""
    g = torch.Generator(device=device).manual_seed(3)
    x, y = (torch.randn(1, n, c, device=device, dtype=dtype, generator=g) for _ in range(2))
    mod = 0.5 * torch.randn(1, 6 * c, device=device, dtype=dtype, generator=g)
    shift, scale, gate = mod[:, :c], mod[:, c:2 * c], mod[:, 2 * c:3 * c]
    head_dim = c // heads
    q = torch.randn(1, n, 3 * c, device=device, dtype=dtype, generator=g).unflatten(-1, (3, heads, head_dim))[:, :, 0]
    weight = torch.ones(head_dim, device=device, dtype=dtype)
    angle = torch.arange(n, device=device, dtype=torch.float32)[:, None] * torch.rand(head_dim // 2, device=device,
                                                                                      generator=g)
    cos, sin = angle.cos(), angle.sin()
    return {
        "adaln": (ops.adaln, _adaln_eager, (x, scale, shift)),
        "gated_adaln": (ops.gated_adaln, _gated_adaln_eager, (x, gate, y, scale, shift)),
        "gated_residual": (ops.gated_residual, _gated_residual_eager, (x, gate, y)),
        "qk_rms_norm_rope": (lambda a, w: ops.rms_norm(a, w, EPS, rope=(cos, sin)),
                             lambda a, w: _qk_norm_eager(a, w, cos, sin), (q, weight)),
    }


def _call(fn, inputs, mode: str):
    """One timed call: forward under no_grad, or forward + backward of every output into every input."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(*inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return outs


def bench_ops(name: str, pixels: int, args, device, dtype) -> list[harness.Result]:
    n = 2 * (pixels // 16) ** 2 + TEXT_TOKENS
    results = []
    for op, (fused, eager, inputs) in op_cases(n, args.hidden, args.heads, dtype, device).items():
        for mode in args.mode.split(","):
            fns = {"nftcore": lambda f=fused, i=inputs, m=mode: _call(f, i, m),
                   "eager": lambda f=eager, i=inputs, m=mode: _call(f, i, m)}
            fns["nftcore"]()
            backend = ops.last_backend("rms_norm" if op.startswith("qk") else op)
            timings = harness.time_many(fns, device, warmup=2, repeats=args.repeats)
            for provider, timing in timings.items():
                peak = harness.peak_memory_mb(fns[provider], device)
                results.append(harness.Result(
                    "mmdit_block_op", f"{name}_{op}", provider, mode, str(dtype).removeprefix("torch."), timing, peak,
                    {"tokens": n, "hidden": args.hidden, "heads": args.heads,
                     "backend": str(backend) if provider == "nftcore" else "eager"}))
            speedup = timings["eager"].p50 / timings["nftcore"].p50
            print(f"{name} {op:17s} {mode:7s} nftcore {timings['nftcore'].p50:8.3f} ms  eager "
                  f"{timings['eager'].p50:8.3f} ms  {speedup:5.2f}x  backend={backend}", flush=True)
    return results


def main(argv: list[str] | None = None) -> list[harness.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=",".join(SHAPES), help=f"comma-separated from {', '.join(SHAPES)}")
    p.add_argument("--mode", default="fwd,fwd+bwd")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats on CPU (CUDA uses do_bench)")
    p.add_argument("--what", default="blocks,ops", help="blocks (whole blocks, nftcore vs sdpa attention) and/or "
                   "ops (each fused block op vs its eager composition)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    harness.print_machine()
    results, op_results = [], []
    for name in args.shape.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        if "blocks" in args.what:
            results += bench_shape(name, SHAPES[name], args, device, dtype)
        if "ops" in args.what:
            op_results += bench_ops(name, SHAPES[name], args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if results:
        harness.print_table(results, baseline=BASELINE)
    if op_results:
        harness.print_table(op_results, baseline="eager")
    results += op_results
    harness.record(results, args.no_record)
    return results


if __name__ == "__main__":
    main()
