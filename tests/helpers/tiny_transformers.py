"""Tiny transformers for the LoRA and export tests (tests/test_lora.py, test_exports.py, test_full_finetune.py): a
random diffusers transformer with the MMDiT loaded from it, random FLUX inputs, and the check that an exported LoRA
gives our outputs."""

from __future__ import annotations

import pytest
import torch

RTOL = 1e-5  # fp32 end to end; the only difference is the order of LoRA's low-rank products


def flux_inputs(cfg, batch=2, h=2, w=4, text=5, seed=0):
    """Random FLUX transformer inputs (target + source tokens are just a longer image sequence to it)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.zeros(1), torch.arange(float(h)), torch.arange(float(w))
    return dict(hidden_states=torch.randn(batch, h * w, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.linspace(0.2, 0.9, batch),
                img_ids=torch.stack(torch.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 3),
                txt_ids=torch.zeros(text, 3))


def assert_close(theirs, ours, base):
    """theirs == ours to RTOL of ours' scale, and the LoRA moved ours far beyond that (not a vacuous match)."""
    scale = ours.abs().max().item()
    err = (theirs - ours).abs().max().item()
    moved = (ours - base).abs().max().item()
    print(f"max|diff| {err:.2e}, LoRA moves the output by {moved:.2e} (scale {scale:.2f})")
    assert err <= RTOL * scale, err
    assert moved > 100 * RTOL * scale, moved


def tiny_pair(family, tmp_path):
    """A tiny diffusers transformer (random weights) and the MMDiT loaded from its saved folder."""
    diffusers = pytest.importorskip("diffusers")
    models = pytest.importorskip("nftcore.models")
    common = dict(num_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6))
    if family == "flux":
        cfg = models.MMDiTConfig(family="flux", patch_size=1, in_channels=8, out_channels=8, num_single_layers=1,
                                 joint_attention_dim=12, pooled_projection_dim=8, guidance_embeds=True, **common)
        cls = diffusers.FluxTransformer2DModel
    else:
        cfg = models.MMDiTConfig(family="qwen_image", patch_size=2, in_channels=16, out_channels=4,
                                 joint_attention_dim=12, **common)
        cls = diffusers.QwenImageTransformer2DModel
    torch.manual_seed(0)
    reference = cls(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}).eval()
    reference.save_pretrained(tmp_path / "base")
    model = models.MMDiT.from_pretrained(tmp_path / "base")
    b, h, w, nt = 2, 2, 3, 4
    x = dict(hidden_states=torch.randn(b, h * w, cfg.in_channels), encoder_hidden_states=torch.randn(b, nt, 12),
             timestep=torch.tensor([0.3, 0.8]))
    if family == "flux":
        grid = torch.zeros(1), torch.arange(float(h)), torch.arange(float(w))
        ids = torch.stack(torch.meshgrid(*grid, indexing="ij"), -1)
        x |= dict(pooled_projections=torch.randn(b, 8), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(nt, 3),
                  guidance=torch.tensor([2.5, 2.5]))
    else:
        x |= dict(encoder_hidden_states_mask=torch.ones(b, nt, dtype=torch.long), img_shapes=[[(1, h, w)]] * b)
    return reference, model, x
