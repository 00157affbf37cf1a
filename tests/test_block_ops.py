"""The fused MMDiT block ops (`nftcore.ops.adaln`, `gated_residual`, `gated_adaln`, `rms_norm`) on their reference
backend (the CPU fallback): outputs and gradients against fp64, saved tensors, masks of wanted gradients, odd and
empty shapes, strided inputs as the MMDiT produces them, the custom-op registrations, and the MMDiT calling them.

Tolerances (flash-attention's rule, never a bare constant): every op runs on inputs already rounded to the test dtype,
the oracle is the fp64 autograd reference on those same values, and the op's max error must stay within a small
multiple (2x outputs, 3x gradients) of the max error of the eager computation diffusers does in that dtype (same
rounded inputs), plus a floor of a few ulps of the output's scale for elements where the eager error happens to be 0.
The Triton kernels are held to the same rule in test_block_ops_triton.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from nftcore import ops
from nftcore.ops.adaln import adaln_reference, gated_adaln_reference, gated_residual_reference
from nftcore.ops.dispatch import Backend, last_backend
from nftcore.ops.rms_norm import rms_norm_reference
from tests.helpers.block_ops import (
    EPS,
    adaln_eager,
    block_inputs,
    check_op,
    gated_adaln_eager,
    gated_residual_eager,
    qk_inputs,
    rms_norm_eager,
    run,
)

adaln_mod = sys.modules["nftcore.ops.adaln"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]
# (B, N, C): C not a power of two, one token, one sample, B = 3, the benchmark's width, two channels. (Not C = 1:
# a one-channel LayerNorm is constant, rstd = 1/sqrt(eps), and aten's folded backward then cancels at rstd·ulp.)
SHAPES = [(2, 37, 48), (1, 1, 7), (3, 5, 256), (1, 19, 2)]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("NFTCORE_DISABLE_NATIVE", "1")  # this file tests the references; native: test_block_ops_native


@pytest.fixture(params=["per_sample", "batched"])
def ln_path(request, monkeypatch):
    """Both reference formulations: aten's fused LayerNorm per sample (B <= PER_SAMPLE_MAX_BATCH) and the batched
    composite."""
    monkeypatch.setattr(adaln_mod, "PER_SAMPLE_MAX_BATCH", 8 if request.param == "per_sample" else 0)
    monkeypatch.delenv("NFTCORE_FORCE_TRITON", raising=False)
    return request.param


# ----------------------------------------------------------------------------------------------------------------
# Numerics against fp64.


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adaln_matches_fp64(shape, dtype, ln_path):
    x, _, _, scale, shift = block_inputs(*shape, dtype, strided=shape[2] > 1)
    check_op(ops.adaln, adaln_eager, adaln_reference, [x, scale, shift], 1, [0, 1, 2], dtype,
             ["x", "scale", "shift"])
    assert last_backend("adaln") is Backend.REFERENCE and last_backend("adaln_backward") is Backend.REFERENCE


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_adaln_matches_fp64(shape, dtype, ln_path):
    inputs = block_inputs(*shape, dtype, seed=1, strided=True)
    check_op(ops.gated_adaln, gated_adaln_eager, gated_adaln_reference, inputs, 2, [0, 1, 2, 3, 4], dtype,
             ["x", "gate", "y", "scale", "shift"])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_matches_fp64(shape, dtype):
    x, gate, y, _, _ = block_inputs(*shape, dtype, seed=2, strided=True)
    check_op(ops.gated_residual, gated_residual_eager, gated_residual_reference, [x, gate, y], 1, [0, 1, 2], dtype,
             ["x", "gate", "y"])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rope_kind", [None, "nd", "bnd", "slice"])
@pytest.mark.parametrize("shape", [(2, 37, 3, 16), (1, 1, 1, 64), (2, 5, 2, 48)], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_fp64(shape, rope_kind, dtype):
    q, w, rope = qk_inputs(*shape, dtype, rope_kind)
    assert not q.is_contiguous() or shape[1] * shape[2] == 1
    check_op(lambda a, b: ops.rms_norm(a, b, EPS, rope=rope), lambda a, b: rms_norm_eager(a, b, EPS, rope),
             lambda a, b: rms_norm_reference(a, b, EPS, None if rope is None else [t.double() for t in rope]),
             [q, w], 1, [0, 1], dtype, ["x", "weight"])
    assert last_backend("rms_norm") is Backend.REFERENCE


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rms_norm_wide_text_norm(dtype):
    """Qwen-Image's text input norm: [B, Nt, 3584]-like rows (here 300 wide), rank 3, no RoPE."""
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(2, 11, 300, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(300, generator=g)).to(dtype)
    check_op(lambda a, b: ops.rms_norm(a, b, EPS), rms_norm_eager, rms_norm_reference, [x, w], 1, [0, 1], dtype,
             ["x", "weight"])


# ----------------------------------------------------------------------------------------------------------------
# Exact fp64 checks: gradcheck, and the fused RoPE equals the attention op's.


def test_gradcheck_fp64(ln_path):
    x, gate, y, scale, shift = (t.double().requires_grad_() for t in block_inputs(2, 5, 6, torch.float64, seed=4,
                                                                                    strided=True))
    assert torch.autograd.gradcheck(lambda *a: ops.adaln(*a), (x, scale, shift))
    assert torch.autograd.gradcheck(lambda *a: ops.gated_adaln(*a), (x, gate, y, scale, shift))
    assert torch.autograd.gradcheck(lambda *a: ops.gated_residual(*a), (x, gate, y))
    q, w, rope = qk_inputs(2, 4, 2, 8, torch.float64, "bnd", seed=5)
    q, w = q.requires_grad_(), w.requires_grad_()
    rope = tuple(t.double() for t in rope)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, EPS, rope=rope), (q, w))
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, b, EPS), (q, w))


def test_fused_rope_equals_the_attention_ops_rope():
    """attention(rms_norm(q, rope), rms_norm(k, rope), v) == attention(rms_norm(q), rms_norm(k), v, rope=rope):
    output and the gradients of q, k, v and the norm weights (fp64)."""
    q, wq, rope = qk_inputs(2, 9, 2, 16, torch.float64, "nd", seed=6)
    k, wk, _ = qk_inputs(2, 9, 2, 16, torch.float64, None, seed=7)
    v = torch.randn(2, 9, 2, 16, dtype=torch.float64)
    go = torch.randn(2, 9, 2, 16, dtype=torch.float64)
    rope = tuple(t.double() for t in rope)
    results = []
    for fused in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, wq, wk)]
        a, b, c, d, e = leaves
        if fused:
            out = ops.attention(ops.rms_norm(a, d, EPS, rope=rope), ops.rms_norm(b, e, EPS, rope=rope), c)
        else:
            out = ops.attention(ops.rms_norm(a, d, EPS), ops.rms_norm(b, e, EPS), c, rope=rope)
        results.append([out, *torch.autograd.grad(out, leaves, go)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Gradient masks, saved tensors, edge shapes.


@pytest.mark.parametrize("wanted", [[0], [1], [2], [1, 2], [3, 4], [0, 3]])
def test_gated_adaln_partial_gradients(wanted, ln_path):
    """Only the wanted inputs get gradients (the op's output mask), each equal to the all-inputs run."""
    inputs = block_inputs(2, 7, 12, torch.float64, seed=8, strided=True)
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(2, 7, 12, generator=g, dtype=torch.float64) for _ in range(2)]
    _, some = run(ops.gated_adaln, inputs, grads, wanted)
    _, every = run(ops.gated_adaln, inputs, grads, [0, 1, 2, 3, 4])
    for k, i in enumerate(wanted):
        torch.testing.assert_close(some[k], every[i], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", ["h", "out"])
def test_gated_adaln_one_output_differentiated(which, ln_path):
    """Only h or only out reaches the loss: the other output's gradient arrives as None."""
    inputs = [t.requires_grad_() for t in block_inputs(2, 6, 10, torch.float64, seed=10)]
    h, out = ops.gated_adaln(*inputs)
    got = torch.autograd.grad((h if which == "h" else out).square().sum(), inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    hr, outr = gated_adaln_reference(*ref_inputs)
    want = torch.autograd.grad((hr if which == "h" else outr).square().sum(), ref_inputs, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wanted", [[0], [1], [0, 1]])
def test_rms_norm_partial_gradients(wanted):
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.float64, "nd", seed=11)
    rope = tuple(t.double() for t in rope)
    fn = lambda a, b: ops.rms_norm(a, b, EPS, rope=rope)  # noqa: E731
    grad = [torch.randn(2, 5, 2, 8, dtype=torch.float64)]
    _, some = run(fn, [q, w], grad, wanted)
    _, every = run(fn, [q, w], grad, [0, 1])
    for k, i in enumerate(wanted):
        torch.testing.assert_close(some[k], every[i], rtol=1e-12, atol=1e-12)


def _saved_full_size(fn, full_shape):
    """Storages of the [B, N, C]-sized tensors autograd keeps for the graph `fn()` builds (deduplicated)."""
    saved = []

    def pack(t):
        if t.numel() and tuple(t.shape) == tuple(full_shape):
            saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return set(saved), out


def test_saved_tensors_are_inputs_and_statistics_only(ln_path):
    """adaln keeps x (no normalised copy); gated_adaln keeps x and y, not h; gated_residual keeps its update only
    when the gate is trained, and nothing full-size when the modulation is frozen (LoRA training)."""
    x, gate, y, scale, shift = block_inputs(2, 9, 16, torch.float32, seed=12)
    x, y = x.requires_grad_(), y.requires_grad_()
    shape = x.shape
    saved, out = _saved_full_size(lambda: ops.adaln(x, scale, shift), shape)
    assert saved == {x.untyped_storage().data_ptr()}
    saved, (h, out) = _saved_full_size(lambda: ops.gated_adaln(x, gate, y, scale, shift), shape)
    assert saved == {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    assert h.untyped_storage().data_ptr() not in saved
    saved, _ = _saved_full_size(lambda: ops.gated_residual(x, gate, y), shape)
    assert saved == set()  # gate frozen: dy = gate·grad needs the [B, C] gate only
    gate = gate.requires_grad_()
    saved, _ = _saved_full_size(lambda: ops.gated_residual(x, gate, y), shape)
    assert saved == {y.untyped_storage().data_ptr()}


def test_empty_inputs():
    for batch, n in ((0, 5), (2, 0)):
        x, gate, y, scale, shift = (t.requires_grad_() for t in block_inputs(batch, n, 8, torch.float32))
        out = ops.adaln(x, scale, shift)
        h, out2 = ops.gated_adaln(x, gate, y, scale, shift)
        r = ops.gated_residual(x, gate, y)
        assert out.shape == out2.shape == h.shape == r.shape == x.shape
        grads = torch.autograd.grad((out.sum() + out2.sum() + h.sum() + r.sum()), (x, gate, y, scale, shift))
        assert all(gr.shape == t.shape and (gr == 0).all() for gr, t in zip(grads, (x, gate, y, scale, shift)))
        q = torch.randn(batch, n, 2, 8, requires_grad=True)
        w = torch.ones(8, requires_grad=True)
        yq = ops.rms_norm(q, w, rope=(torch.zeros(n, 4), torch.zeros(n, 4)))
        dq, dw = torch.autograd.grad(yq.sum(), (q, w))
        assert yq.shape == q.shape and dq.shape == q.shape and (dw == 0).all()


def test_expanded_gradient_from_sum():
    """`.sum().backward()` hands the ops stride-0 gradients."""
    x, gate, y, scale, shift = (t.requires_grad_() for t in block_inputs(2, 5, 8, torch.float64, seed=13))
    for fn, ref in ((ops.gated_residual, gated_residual_reference), (ops.adaln, adaln_reference)):
        args = (x, gate, y) if fn is ops.gated_residual else (x, scale, shift)
        got = torch.autograd.grad(fn(*args).sum(), args)
        want = torch.autograd.grad(ref(*args).sum(), args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise_value_errors():
    x, gate, y, scale, shift = block_inputs(2, 5, 8, torch.float32)
    with pytest.raises(ValueError, match=r"adaln: `x` must be \[B, N, C\]"):
        ops.adaln(x[0], scale, shift)
    with pytest.raises(ValueError, match=r"adaln: `scale` must be \[B, C\] = \[2, 8\]"):
        ops.adaln(x, scale[:, :4], shift)
    with pytest.raises(ValueError, match="gated_residual: `y` must have x's dtype"):
        ops.gated_residual(x, gate, y.double())
    with pytest.raises(ValueError, match="gated_adaln: `y` has shape"):
        ops.gated_adaln(x, gate, y[:, :3], scale, shift)
    with pytest.raises(ValueError, match="eps"):
        ops.adaln(x, scale, shift, eps=-1.0)
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.float32, "nd")
    with pytest.raises(ValueError, match=r"rms_norm: `weight` must be \[D\] = \[8\]"):
        ops.rms_norm(q, w[:4])
    with pytest.raises(ValueError, match=r"rms_norm: `rope\[0\] \(cos\)` must be \[N, D/2\]"):
        ops.rms_norm(q, w, rope=(rope[0][:3], rope[1][:3]))
    with pytest.raises(ValueError, match="rank 4"):
        ops.rms_norm(q[0], w, rope=rope)


# ----------------------------------------------------------------------------------------------------------------
# The custom-op registrations (schema, fake tensors, autograd, AOT dispatch).


def test_opcheck_every_op():
    x, gate, y, scale, shift = block_inputs(2, 5, 8, torch.float32, seed=14, strided=True)
    x, gate, y, scale, shift = (t.requires_grad_() for t in (x, gate, y, scale, shift))
    torch.library.opcheck(torch.ops.nftcore.adaln.default, (x, scale, shift, EPS))
    torch.library.opcheck(torch.ops.nftcore.gated_adaln.default, (x, gate, y, scale, shift, EPS))
    torch.library.opcheck(torch.ops.nftcore.gated_residual.default, (x, gate, y))
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.float32, "nd", seed=15)
    q, w = q.requires_grad_(), w.requires_grad_()
    torch.library.opcheck(torch.ops.nftcore.rms_norm.default, (q, w, rope[0], rope[1], EPS))
    torch.library.opcheck(torch.ops.nftcore.rms_norm.default, (q, w, None, None, EPS))
    with torch.no_grad():
        _, mean, rstd = torch.ops.nftcore.adaln(x, scale, shift, EPS)
        g = torch.randn(2, 5, 8)
        torch.library.opcheck(torch.ops.nftcore.adaln_backward.default, (g, x, scale, mean, rstd, [True, False, True]))
        torch.library.opcheck(torch.ops.nftcore.gated_adaln_backward.default,
                              (None, g, x, gate, y, scale, mean, rstd, [True, True, True, True, True]))
        torch.library.opcheck(torch.ops.nftcore.gated_residual_backward.default, (g, gate, None, [False, True]))


# ----------------------------------------------------------------------------------------------------------------
# The MMDiT runs on them.


def test_mmdit_blocks_call_the_block_ops(monkeypatch):
    from nftcore.models import MMDiT, MMDiTConfig, flux_image_ids

    cfg = MMDiTConfig(family="flux", patch_size=1, in_channels=8, out_channels=8, num_layers=1, num_single_layers=1,
                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
                      guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    model = MMDiT(cfg)
    calls = {}
    for name in ("adaln", "gated_adaln", "gated_residual", "rms_norm", "attention"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _o=original, _n=name, **k: calls.setdefault(_n, []).append(
            k.get("rope")) or _o(*a, **k))
    img_ids = flux_image_ids(2, 3)
    x = torch.randn(1, 6, 8, requires_grad=True)
    out = model(x, torch.randn(1, 4, 12), timestep=0.5, pooled_projections=torch.randn(1, 6), img_ids=img_ids,
                txt_ids=torch.zeros(4, 3)).sample
    counts = {k: len(v) for k, v in calls.items()}  # forward calls (the backward rebuilds call adaln again)
    out.sum().backward()
    # double block: 2 streams x (adaln, gated_adaln, gated_residual, 2 rms_norm); single: adaln, 2 rms_norm,
    # gated_residual; the final layer: adaln
    assert counts == {"adaln": 4, "gated_adaln": 2, "gated_residual": 3, "rms_norm": 6, "attention": 2}, counts
    assert all(r is not None for r in calls["rms_norm"]) and all(r is None for r in calls["attention"])
    assert x.grad is not None and torch.isfinite(x.grad).all()
