"""Inputs and the flash-attn tolerance rule of the attention tests (tests/test_attention_op.py: the reference
backend; tests/test_attention_triton.py: the Triton kernels). The fp64 oracle is
`nftcore.ops.reference.naive_attention`.
"""

from __future__ import annotations

import torch

from tests.helpers.tolerances import max_err

# Added to the flash-attn tolerance (2× / 3× PyTorch's own error) so a lucky, near-exact PyTorch error does not make
# the bound vanish: one ulp of the dtype at magnitude 1-2, where these tests' outputs and gradients live (bf16 2^-7,
# fp16 2^-10; fp32 a few ulps of accumulated rounding).
EPS = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def run_with_grads(fn, q, k, v, grad_out, **kw):
    """(out, dq, dk, dv) of `fn(q, k, v, **kw)` under the cotangent `grad_out`, on fresh leaves."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def make_inputs(b, n_q, n_k, h, d, dtype, rope_kind=None, mask_kind=None, seed=0):
    """([q, k, v, grad_out] in `dtype`, rope, key mask): RoPE tables per token ("nd") or per sample ("bnd"); a mask
    with some keys dropped ("partial") or also one sample's every key ("dead_row")."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n_q, h, d, generator=g)
    k = torch.randn(b, n_k, h, d, generator=g)
    v = torch.randn(b, n_k, h, d, generator=g)
    grad_out = torch.randn(b, n_q, h, d, generator=g)
    rope = None
    if rope_kind is not None:
        pos = torch.arange(n_q, dtype=torch.float64)
        if rope_kind == "bnd":  # per-sample positions, as with a batch of differently sized images
            pos = pos[None] + torch.arange(b, dtype=torch.float64)[:, None] * 7.0
        freqs = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) * 2 / d)
        theta = pos[..., None] * freqs  # [N, D/2] or [B, N, D/2]
        rope = (theta.cos().float(), theta.sin().float())
    mask = None
    if mask_kind is not None:
        mask = torch.rand(b, n_k, generator=g) > 0.4
        mask[:, 0] = True
        if mask_kind == "dead_row" and b > 1:
            mask[-1] = False
    return [x.to(dtype) for x in (q, k, v, grad_out)], rope, mask


def assert_flash_tolerance(op_vals, lowp_vals, ref_vals, dtype, names=("out", "dq", "dk", "dv")):
    """flash-attn rule: |op − ref64| ≤ 2·|torch_lowp − ref64| + ε for outputs, 3× for gradients."""
    for i, (name, o, t, r) in enumerate(zip(names, op_vals, lowp_vals, ref_vals)):
        factor = 2.0 if i == 0 else 3.0
        err, torch_err = max_err(o, r), max_err(t, r)
        mean = (o.double() - r.double()).abs().mean().item()
        print(f"{dtype} {name}: max {err:.3g} mean {mean:.3g} torch-lowp max {torch_err:.3g}")
        assert err <= factor * torch_err + EPS[dtype], f"{name}: {err} > {factor}×{torch_err} + {EPS[dtype]}"
