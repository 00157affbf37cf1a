"""A tiny MMDiT of each family with random weights and matching inputs, for tests of the model's forward."""

from __future__ import annotations

import torch

from nftcore.models import MMDiT, MMDiTConfig

B, H, W, N_TXT = 2, 3, 5, 7  # batch 2: the double block's per-stream attention slices are strided copies


def tiny(family: str, dtype: torch.dtype) -> tuple[MMDiT, dict]:
    common = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6))
    g = torch.Generator().manual_seed(0)
    if family == "flux":
        cfg = MMDiTConfig(family="flux", patch_size=1, in_channels=8, out_channels=8, num_single_layers=2,
                          joint_attention_dim=12, pooled_projection_dim=8, guidance_embeds=True, **common)
        grid = torch.zeros(1), torch.arange(float(H)), torch.arange(float(W))
        x = dict(pooled_projections=torch.randn(B, 8, generator=g).to(dtype), guidance=torch.tensor([2.5, 3.5]),
                 img_ids=torch.stack(torch.meshgrid(*grid, indexing="ij"), -1).reshape(-1, 3),
                 txt_ids=torch.randn(N_TXT, 3, generator=g))
        n_img, channels = H * W, 8
    else:
        cfg = MMDiTConfig(family="qwen_image", patch_size=2, in_channels=16, out_channels=4, joint_attention_dim=12,
                          **common)
        mask = torch.ones(B, N_TXT, dtype=torch.long)
        mask[0, 4:] = 0
        x = dict(encoder_hidden_states_mask=mask, img_shapes=[[(1, H, W)]] * B)
        n_img, channels = H * W, 16
    model = MMDiT(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
    x |= dict(hidden_states=torch.randn(B, n_img, channels, generator=g).to(dtype),
              encoder_hidden_states=torch.randn(B, N_TXT, 12, generator=g).to(dtype), timestep=torch.tensor([0.3, 0.8]))
    return model, x
