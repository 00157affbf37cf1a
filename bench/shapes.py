"""Benchmark shapes taken from the models nftcore trains, so no benchmark hard-codes a size.

Why a registry: a kernel tuned on a round 4096 can lose on the 2348-token sequence Qwen-Image-Edit really produces,
and the NFT loss at B=3, N=1024 is launch-bound while the bandwidth shape is not. Every bench sweeps names from here.

Token counts: the VAEs downsample 8x and the transformers pack 2x2 latent patches, so an image of S x S pixels gives
(S/16)^2 tokens with C = 16 channels x 2 x 2 = 64 per token. An edit sequence is [target ; source ; text] tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NFTLossShape:
    """Inputs of `nftcore.ops.nft_loss`: velocities / x_t / x0 are [B, N, C], t / r / mask are [B]."""

    name: str
    B: int
    N: int
    C: int
    note: str = ""

    @property
    def numel(self) -> int:
        return self.B * self.N * self.C


@dataclass(frozen=True)
class AttentionShape:
    """Joint self-attention of an MMDiT block: q, k, v are [B, H, N, D] with N = image + source-image + text tokens."""

    name: str
    B: int
    H: int
    N: int
    D: int
    note: str = ""

    def flops(self, mode: str = "fwd") -> float:
        """Matmul FLOPs of non-causal attention (QK^T and PV); bwd is 2.5x fwd (flash-attn convention)."""
        fwd = 4.0 * self.B * self.H * self.N * self.N * self.D
        return {"fwd": fwd, "bwd": 2.5 * fwd, "full": 3.5 * fwd}[mode]


def _edit_tokens(pixels: int) -> int:
    return (pixels // 16) ** 2  # 8x VAE, then 2x2 patches


NFT_LOSS_SHAPES: dict[str, NFTLossShape] = {
    s.name: s
    for s in (
        NFTLossShape("qwen_image_edit_512", B=3, N=_edit_tokens(512), C=64,
                     note="Edit-R1 Qwen-Image-Edit micro-batch at 512^2: loss sees the 1024 target tokens only"),
        NFTLossShape("kontext_512", B=3, N=_edit_tokens(512), C=64,
                     note="FLUX.1-Kontext at 512^2, same micro-batch"),
        NFTLossShape("qwen_image_edit_1024", B=1, N=_edit_tokens(1024), C=64,
                     note="Qwen-Image-Edit at 1024^2, one sample per micro-batch"),
        NFTLossShape("bandwidth_b24_n4096", B=24, N=_edit_tokens(1024), C=64,
                     note="not a training shape: big enough (24 MB per fp32 tensor) to measure achieved bandwidth"),
    )
}

# H = 24 heads of D = 128 in both transformers (hidden 3072). Text lengths: the FLUX-Kontext pipeline pads T5 to 512
# tokens by default (Edit-R1 trains with 128, i.e. 384 fewer: these shapes are the pipeline's, slightly larger);
# Qwen-Image-Edit's Qwen2.5-VL prompt is about 300 tokens (2348 - 2 x 1024 at 512^2).
ATTENTION_SHAPES: dict[str, AttentionShape] = {
    s.name: s
    for s in (
        AttentionShape("kontext_512", B=1, H=24, N=2 * _edit_tokens(512) + 512, D=128,
                       note="FLUX.1-Kontext 512^2 edit: 1024 target + 1024 source + 512 T5 tokens"),
        AttentionShape("kontext_1024", B=1, H=24, N=2 * _edit_tokens(1024) + 512, D=128,
                       note="FLUX.1-Kontext 1024^2 edit: 4096 + 4096 + 512"),
        AttentionShape("qwen_image_edit_512", B=1, H=24, N=2348, D=128,
                       note="Qwen-Image-Edit 512^2 edit: 1024 + 1024 + ~300 text tokens (not a multiple of 128)"),
        AttentionShape("qwen_image_edit_1024", B=1, H=24, N=8492, D=128,
                       note="Qwen-Image-Edit 1024^2 edit: 4096 + 4096 + ~300 text tokens"),
    )
}

assert ATTENTION_SHAPES["kontext_512"].N == 2560 and ATTENTION_SHAPES["kontext_1024"].N == 8704


def pick(registry: dict, names: str | list[str], default: list[str]) -> list:
    """Resolve a `--shape` value: "all", a comma-separated list of names, or the default names when empty."""
    if isinstance(names, str):
        names = [] if names in ("", "default") else list(registry) if names == "all" else names.split(",")
    names = names or default
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {', '.join(registry)}")
    return [registry[n] for n in names]
