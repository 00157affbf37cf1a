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

    python bench/bench_mmdit_block.py                      # CUDA: both shapes, both modes, both providers
    python bench/bench_mmdit_block.py --shape kontext_512 --device cpu --hidden 256 --heads 4 --no-record   # smoke
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
    with that one call swapped for `_sdpa_attention` - everything else identical."""
    if provider == "nftcore":
        yield
        return
    original = blocks.ops
    blocks.ops = SimpleNamespace(attention=_sdpa_attention)
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


def main(argv: list[str] | None = None) -> list[harness.Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default=",".join(SHAPES), help=f"comma-separated from {', '.join(SHAPES)}")
    p.add_argument("--mode", default="fwd,fwd+bwd")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats on CPU (CUDA uses do_bench)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    harness.print_machine()
    results = []
    for name in args.shape.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        results += bench_shape(name, SHAPES[name], args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    harness.print_table(results, baseline=BASELINE)
    if not args.no_record:
        harness.append_results(results)
        print(f"appended {len(results)} rows to {harness.RESULTS_CSV}")
    return results


if __name__ == "__main__":
    main()
