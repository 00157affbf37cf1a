"""`nftcore.ops.attention` through its reference backend: outputs and every gradient against a naive fp64
softmax(QKᵀ·scale)V, RoPE against diffusers, fully masked rows, custom-op registration, torch.compile, bad inputs.

The Triton backend of the same op is tested in test_attention_triton.py.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from nftcore.ops import attention
from nftcore.ops.dispatch import Backend, last_backend
from nftcore.ops.reference import naive_attention
from tests.helpers.attention import assert_flash_tolerance, make_inputs, run_with_grads
from tests.helpers.tolerances import max_err

attn_mod = importlib.import_module("nftcore.ops.attention")  # the module (the package attribute is the function)

@pytest.fixture(params=["cpu_flash", "generic"])
def path(request, monkeypatch):
    """Both reference backward paths: aten's CPU flash kernels and the recompute-under-autograd fallback."""
    if request.param == "cpu_flash" and not attn_mod.USE_CPU_FLASH:
        pytest.skip("aten CPU flash attention not available in this torch")
    monkeypatch.setattr(attn_mod, "USE_CPU_FLASH", request.param == "cpu_flash")
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# Numerics.

CASES = [
    # (B, N_q, N_k, H, D, rope, mask)
    (1, 37, 37, 2, 16, None, None),
    (2, 37, 53, 3, 64, None, "partial"),
    (2, 37, 37, 2, 64, "nd", "dead_row"),
    (3, 29, 29, 2, 16, "bnd", "partial"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(str(s) for s in c[:5]) + f"-{c[5]}-{c[6]}")
def test_matches_naive_fp64(case, dtype, path):
    b, n_q, n_k, h, d, rope_kind, mask_kind = case
    (q, k, v, go), rope, mask = make_inputs(b, n_q, n_k, h, d, dtype, rope_kind, mask_kind)
    ref = run_with_grads(naive_attention, q.double(), k.double(), v.double(), go, mask=mask, rope=rope)
    lowp = run_with_grads(naive_attention, q, k, v, go, mask=mask, rope=rope)
    got = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope)
    assert last_backend("attention") == Backend.REFERENCE
    assert all(x.dtype == dtype for x in got)
    assert got[0].shape == (b, n_q, h, d) and got[2].shape == (b, n_k, h, d)
    assert all(torch.isfinite(x).all() for x in got)
    assert_flash_tolerance(got, lowp, ref, dtype)


def test_fp64_exact_and_scale(path):
    (q, k, v, go), rope, mask = make_inputs(2, 21, 21, 2, 16, torch.float64, "nd", "partial", seed=3)
    ref = run_with_grads(naive_attention, q, k, v, go, mask=mask, rope=rope, scale=0.37)
    got = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope, scale=0.37)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert max_err(a, r) < 1e-10, name
    # Default scale is D**-0.5.
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v, scale=16**-0.5), rtol=0, atol=1e-12)


def test_fully_masked_row_gives_zeros_not_nan(path):
    """A batch row with every key masked (a padding-only sample) has no softmax: the op returns zeros for it and
    zero gradients into its q, k and v, and leaves the other rows untouched."""
    (q, k, v, go), rope, mask = make_inputs(2, 16, 16, 2, 16, torch.float32, "nd", "dead_row")
    out, dq, dk, dv = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope)
    for x in (out, dq, dk, dv):
        assert torch.isfinite(x).all()
        assert x[1].abs().max() == 0
    alone = run_with_grads(attention, q[:1], k[:1], v[:1], go[:1], key_padding_mask=mask[:1], rope=rope)
    for a, b in zip((out, dq, dk, dv), alone):
        torch.testing.assert_close(a[:1], b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# RoPE convention against diffusers (FLUX and Qwen-Image both rotate adjacent pairs).


def _rope_case():
    b, n, h, d = 2, 11, 3, 16
    x = torch.randn(b, n, h, d, dtype=torch.float64)
    theta = torch.randn(n, d // 2, dtype=torch.float64)
    return x, theta, attn_mod.rotate_pairs(x, theta.cos(), theta.sin())


def test_rope_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    x, theta, ours = _rope_case()
    b, n, h, d = x.shape
    cos, sin = theta.cos(), theta.sin()
    # FLUX: real cos/sin repeat-interleaved to D, unbind on the last dim; [B, S, H, D] is sequence_dim=1.
    flux = embeddings.apply_rotary_emb(
        x, (cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)), use_real=True, use_real_unbind_dim=-1,
        sequence_dim=1,
    )
    torch.testing.assert_close(ours.float(), flux.float(), rtol=1e-6, atol=1e-6)  # diffusers computes in fp32
    # The complex path (use_real=False): x's adjacent pairs as complex numbers times e^{iθ}, per-sample [B, S, D/2]
    # tables - the same pairing as Qwen-Image's apply_rotary_emb_qwen (checked against that module below).
    theta_b = torch.randn(b, n, d // 2, dtype=torch.float64)
    generic = embeddings.apply_rotary_emb(x, torch.polar(torch.ones_like(theta_b), theta_b), use_real=False)
    torch.testing.assert_close(
        attn_mod.rotate_pairs(x, theta_b.cos(), theta_b.sin()).float(), generic.float(), rtol=1e-6, atol=1e-6
    )
    # Inverse rotation undoes it.
    torch.testing.assert_close(attn_mod.rotate_pairs(ours, cos, sin, inverse=True), x, rtol=0, atol=1e-12)


@pytest.mark.slow  # importing diffusers' Qwen-Image transformer module costs ~4-7 s
def test_rope_matches_qwen_image():
    qwen = pytest.importorskip("diffusers.models.transformers.transformer_qwenimage")
    x, theta, ours = _rope_case()
    qw = qwen.apply_rotary_emb_qwen(x, torch.polar(torch.ones_like(theta), theta), use_real=False)  # [S, D/2] table
    torch.testing.assert_close(ours.float(), qw.float(), rtol=1e-6, atol=1e-6)


def test_attention_with_rope_equals_flux_processor_math():
    """What FLUX's attention processor computes: rotate q and k with diffusers, then SDPA in [B, H, N, D]."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    (q, k, v, _), rope, _ = make_inputs(1, 24, 24, 2, 32, torch.float32, "nd")
    cos, sin = (t.repeat_interleave(2, -1) for t in rope)
    qr = embeddings.apply_rotary_emb(q, (cos, sin), sequence_dim=1)
    kr = embeddings.apply_rotary_emb(k, (cos, sin), sequence_dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(attention(q, k, v, rope=rope), want.transpose(1, 2), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Registration, compile, determinism.


def test_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops (the full opcheck is the
    slow part of this file, so it runs once, on the default path and the variant with every optional input)."""
    (q, k, v, go), rope, mask = make_inputs(2, 9, 9, 2, 16, torch.float32, "nd", "partial")
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    args = (q, k, v, mask, rope[0], rope[1], 0.25, False)
    torch.library.opcheck(attn_mod._attention_op, args)
    torch.library.opcheck(attn_mod._attention_op, (q, k, v, None, None, None, 0.25, True), test_utils="test_faketensor")
    out, lse = attn_mod._attention_op(*args)
    bargs = (go, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask, rope[0], rope[1], 0.25, False)
    torch.library.opcheck(attn_mod._attention_backward_op, bargs)


def test_compile_aot_eager_parity():
    (q, k, v, go), rope, mask = make_inputs(2, 17, 17, 2, 16, torch.float32, "bnd", "dead_row")

    def f(q, k, v):
        return attention(q, k, v, key_padding_mask=mask, rope=rope) * 2.0

    eager = run_with_grads(f, q, k, v, go)
    compiled = run_with_grads(torch.compile(f, backend="aot_eager", fullgraph=True), q, k, v, go)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_deterministic_flag_repeatable():
    (q, k, v, go), rope, mask = make_inputs(2, 19, 23, 2, 16, torch.float32, None, "partial")
    a = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, deterministic=True)
    b = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, deterministic=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_non_contiguous_inputs():
    """A fused QKV projection reshaped to [B, N, 3, H, D] and unbound gives strided q, k, v views."""
    qkv = torch.randn(2, 13, 3, 2, 16, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs.


def _bad_cases():
    q = torch.randn(2, 8, 2, 16)
    k = torch.randn(2, 6, 2, 16)
    cos = torch.randn(8, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    return [
        ("rank", dict(q=q[0], k=k, v=k), "`q` must be \\[B, N, H, D\\] \\(rank 4\\), got \\[8, 2, 16\\]"),
        ("int dtype", dict(q=q.long(), k=k.long(), v=k.long()), "`q` must be float16"),
        ("mixed dtype", dict(q=q, k=k.double(), v=k.double()), "share one dtype"),
        ("k vs v", dict(q=q, k=k, v=k[:, :5]), "`k` \\[2, 6, 2, 16\\] and `v` \\[2, 5, 2, 16\\]"),
        ("batch", dict(q=q[:1], k=k, v=k), "must agree on B, H and D"),
        ("heads", dict(q=q, k=k[:, :, :1], v=k[:, :, :1]), "must agree on B, H and D"),
        ("head dim", dict(q=q, k=k[..., :8], v=k[..., :8]), "must agree on B, H and D"),
        ("mask dtype", dict(q=q, k=k, v=k, key_padding_mask=mask.float()), "must be bool"),
        ("mask shape", dict(q=q, k=k, v=k, key_padding_mask=mask[:, :5]), "must be \\[B, N_k\\] = \\[2, 6\\]"),
        ("rope N_q != N_k", dict(q=q, k=k, v=k, rope=(cos, cos)), "N_q == N_k"),
        ("rope shape", dict(q=q, k=q, v=q, rope=(cos[:, :4], cos[:, :4])), "must be \\[N, D/2\\] = \\[8, 8\\]"),
        ("rope not pair", dict(q=q, k=q, v=q, rope=cos), "must be a \\(cos, sin\\) pair"),
        ("rope int", dict(q=q, k=q, v=q, rope=(cos.long(), cos.long())), "must be float16"),
        ("odd D rope", dict(q=q[..., :15], k=q[..., :15], v=q[..., :15], rope=(cos, cos)), "D must be even"),
        ("scale", dict(q=q, k=k, v=k, scale=-1.0), "`scale` must be a finite positive"),
        ("scale nan", dict(q=q, k=k, v=k, scale=math.nan), "`scale` must be a finite positive"),
        ("not tensor", dict(q=q.tolist(), k=k, v=k), "`q` must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("name,kwargs,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs(name, kwargs, match):
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_mixed_devices():
    q = torch.randn(1, 4, 1, 16)
    meta = q.to("meta")  # any second device works: the check runs before any compute
    with pytest.raises(ValueError, match="one device"):
        attention(q, meta, meta)


def test_eager_carrier_equals_the_custom_op_bitwise():
    """Eager calls with grad run the op's body under a plain autograd.Function (its registered setup and backward):
    outputs and gradients are the custom op's, bit for bit, with a mask and RoPE."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 9, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    cos, sin = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    grad = torch.randn(2, 9, 2, 8, generator=g)
    out = attention(q, k, v, key_padding_mask=mask, rope=(cos, sin))
    via_eager = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    out_op, _ = attn_mod._attention_op(q, k, v, mask, cos, sin, 8 ** -0.5, False)
    via_op = [out_op, *torch.autograd.grad(out_op, (q, k, v), grad)]
    for a, b in zip(via_eager, via_op):
        assert torch.equal(a, b)
