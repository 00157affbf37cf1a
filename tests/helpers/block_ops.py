"""What the block-op tests share (tests/test_block_ops.py: the reference backend; test_block_ops_triton.py: the Triton
kernels; test_block_ops_native.py: the C++ kernels): inputs shaped as the MMDiT makes them, and the flash-attention
tolerance rule with diffusers' eager computations (in the input dtype) whose error sets it. The fp64 oracles are the
ops' own references (`nftcore.ops.adaln.adaln_reference`, ..., `nftcore.ops.rms_norm.rms_norm_reference`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.helpers.tolerances import max_err

EPS = 1e-6


def adaln_eager(x, scale, shift, eps=EPS):
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def gated_residual_eager(x, gate, y):
    return x + gate[:, None] * y


def gated_adaln_eager(x, gate, y, scale, shift, eps=EPS):
    h = gated_residual_eager(x, gate, y)
    return h, adaln_eager(h, scale, shift, eps)


def rms_norm_eager(x, weight, eps=EPS, rope=None):
    """diffusers' RMSNorm (fp32 statistics, rounded to the weight's dtype, times the weight) then its
    apply_rotary_emb(use_real_unbind_dim=-1) with cos/sin repeat-interleaved over the pairs (fp32, cast back)."""
    xf = x.float() if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = y.to(weight.dtype) * weight if weight.dtype in (torch.float16, torch.bfloat16) else (y * weight).to(x.dtype)
    if rope is not None:
        cos, sin = (t.repeat_interleave(2, -1) for t in rope)
        cos, sin = (t[None, :, None] if t.dim() == 2 else t[:, :, None] for t in (cos, sin))
        real, imag = y.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
        cd = torch.float64 if y.dtype == torch.float64 else torch.float32
        y = (y.to(cd) * cos + rotated.to(cd) * sin).to(y.dtype)
    return y


def run(fn, inputs, grad_outs, wanted):
    """Outputs (a tuple) and the gradients of `inputs[i]` for i in `wanted` under cotangents `grad_outs`."""
    leaves = [t.detach().clone().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                                allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def assert_flash_rule(name, got, eager, ref, dtype, factor):
    err, eager_err = max_err(got, ref), max_err(eager, ref)
    floor = 4 * torch.finfo(dtype).eps * ref.abs().max().item() if ref.numel() else 0.0
    print(f"{name} {dtype}: max err {err:.3g}, eager {eager_err:.3g}, floor {floor:.3g}")
    assert got.dtype == eager.dtype or name.startswith("d"), (name, got.dtype, eager.dtype)
    assert torch.isfinite(got).all(), name
    assert err <= factor * eager_err + floor, f"{name}: {err:.3g} > {factor}·{eager_err:.3g} + {floor:.3g}"


def check_op(op, eager, reference, inputs, n_out, wanted, dtype, names, seed=0):
    """op vs fp64 `reference` within the flash rule set by `eager`, outputs and gradients of `wanted` inputs."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        shapes = [o.shape for o in (eager(*inputs) if n_out > 1 else (eager(*inputs),))]
    grad_outs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    got, got_g = run(op, inputs, grad_outs, wanted)
    low, low_g = run(eager, inputs, grad_outs, wanted)
    ref, ref_g = run(reference, [t.double() for t in inputs], [c.double() for c in grad_outs], wanted)
    for i in range(n_out):
        assert got[i].shape == ref[i].shape and got[i].is_contiguous()
        assert_flash_rule(f"out{i}", got[i], low[i], ref[i], dtype, 2.0)
    for k, i in enumerate(wanted):
        assert got_g[k].dtype == inputs[i].dtype and got_g[k].shape == inputs[i].shape
        assert_flash_rule(f"d{names[i]}", got_g[k], low_g[k], ref_g[k], dtype, 3.0)
    return got, got_g


def block_inputs(batch, n, c, dtype, seed=0, strided=False):
    """x, gate, y, scale, shift as the MMDiT makes them: x a token slice of the joint stream, the modulation vectors
    chunks of one [B, 6C] Linear output (batch stride 6C), when `strided`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n + (3 if strided else 0), c, generator=g)[:, (3 if strided else 0):]
    mod = torch.randn(batch, 6 * c, generator=g) * 0.5
    if strided:
        shift, scale, gate = mod[:, :c], mod[:, c:2 * c], mod[:, 2 * c:3 * c]
    else:
        shift, scale, gate = (mod[:, i * c:(i + 1) * c].contiguous() for i in range(3))
    y = torch.randn(batch, n, c, generator=g)
    return [t.to(dtype) for t in (x, gate, y, scale, shift)]


def qk_inputs(batch, n, heads, d, dtype, rope_kind, seed=0):
    """q as the MMDiT has it (a strided view of one [B, N, 3·H·D] QKV output), weight near 1, rope angles as in
    FLUX (positions times inverse frequencies), tables [N, D/2], [B, N, D/2] or a row slice of a longer table."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, n, 3 * heads * d, generator=g).to(dtype)
    q = qkv.unflatten(-1, (3, heads, d)).unbind(2)[0]  # strided: a view of the fused projection's output
    w = 1 + 0.1 * torch.randn(d, generator=g)
    rope = None
    if rope_kind is not None:
        rows = n + 4 if rope_kind == "slice" else n
        pos = torch.arange(rows, dtype=torch.float64)[:, None]
        angle = pos / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        if rope_kind == "bnd":
            angle = angle[None] + torch.rand(batch, 1, d // 2, generator=g, dtype=torch.float64)
        cos, sin = angle.cos().float(), angle.sin().float()
        rope = (cos[4:], sin[4:]) if rope_kind == "slice" else (cos, sin)
    return q, w.to(dtype), rope
