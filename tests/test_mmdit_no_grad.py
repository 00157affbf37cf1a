"""The MMDiT's no-grad forward (rollouts), which overwrites buffers in place to lower its peak (`ops.gelu_tanh_` in the
MLPs, the single block's normalised q/k written back into its QKV buffer), gives the very bits of the grad-mode
forward (out-of-place ops throughout): FLUX (double + single blocks) and Qwen-Image (padded text), fp32 and bf16,
native and reference backends, under no_grad and inference_mode."""

from __future__ import annotations

import pytest
import torch

from nftcore import ops
from nftcore.models import MMDiT, MMDiTConfig
from nftcore.ops.dispatch import Backend
from tests.helpers.native import needs_native

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py

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


@pytest.mark.parametrize("backend", [pytest.param(Backend.NATIVE, marks=needs_native, id="native"),
                                     pytest.param(Backend.REFERENCE, id="reference")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_no_grad_forward_is_the_grad_forward_bit_for_bit(family, dtype, backend, monkeypatch):
    if backend is Backend.REFERENCE:
        monkeypatch.setenv("NFTCORE_DISABLE_NATIVE", "1")
    else:
        monkeypatch.delenv("NFTCORE_DISABLE_NATIVE", raising=False)
    model, x = tiny(family, dtype)
    calls = []
    inplace = ops.gelu_tanh_
    monkeypatch.setattr(ops, "gelu_tanh_", lambda t: calls.append(t.shape) or inplace(t))

    out = model(**x).sample  # grad mode, every parameter trainable: out-of-place ops only
    assert out.requires_grad and calls == []
    with torch.no_grad():
        no_grad = model(**x).sample
    mlps = 2 * model.config.num_layers + model.config.num_single_layers
    assert len(calls) == mlps
    assert ops.last_backend("gelu_tanh_") is backend
    with torch.inference_mode():
        inference = model(**x).sample
    assert len(calls) == 2 * mlps
    assert no_grad.dtype == dtype
    assert torch.equal(no_grad, out.detach()) and torch.equal(inference, out.detach())
