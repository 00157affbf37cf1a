"""The Triton backends of the block ops (kernels/adaln.py, kernels/rms_norm.py) through the public ops, under the
interpreter on CPU (`NFTCORE_FORCE_TRITON=1`, conftest sets TRITON_INTERPRET), plus the sm_90 ahead-of-time compile
of every shipped kernel configuration.

Tolerances: the flash rule of test_block_ops.py (the kernel's max error against fp64 on the same rounded inputs
within 2x / 3x the eager dtype computation's error, plus a few ulps of the output scale). Sizes stay small (the
interpreter costs milliseconds per program); the backward's multi-iteration row loop and ragged last chunk are
covered by forcing a small split configuration.
"""

from __future__ import annotations

import sys

import nftcore.kernels.adaln as adaln_kernel
import nftcore.kernels.rms_norm as rms_kernel
import pytest
import torch

from nftcore import ops
from nftcore.ops.adaln import adaln_reference, gated_adaln_reference, gated_residual_reference
from nftcore.ops.dispatch import FORCE_TRITON, Backend, interpreter_active, last_backend, triton_available
from nftcore.ops.rms_norm import rms_norm_reference
from tests.helpers.aot import H100_SHARED_LIMIT, AOTSpec, compile_many
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

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton does not import here")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]
adaln_op_module = sys.modules["nftcore.ops.adaln"]


@pytest.fixture
def force_triton(monkeypatch):
    if not ON_GPU and not interpreter_active():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 set before the kernels are imported (conftest)")
    monkeypatch.setenv(FORCE_TRITON, "1")
    monkeypatch.delenv("NFTCORE_DISABLE_TRITON", raising=False)


@pytest.fixture(params=["shipped", "small_chunks"])
def splits(request, monkeypatch):
    """The shipped split of the backward, and a forced one where every program loops twice over BLOCK_R rows and the
    last chunk of each sample is ragged."""
    if request.param == "small_chunks":
        def forced(n, *rest):
            block_r = rest[-1]
            chunk = 2 * block_r
            return max(1, -(-n // chunk)), chunk

        monkeypatch.setattr(adaln_kernel, "split_config", forced)
        monkeypatch.setattr(rms_kernel, "split_config", forced)
        small_tiles = lambda width, backward=False: (max(16, 1 << (width - 1).bit_length()), 4, 4)  # noqa: E731
        monkeypatch.setattr(adaln_kernel, "block_config", small_tiles)
        monkeypatch.setattr(rms_kernel, "block_config", small_tiles)
    return request.param


def _on(device, tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def _assert_triton(*names):
    for name in names:
        assert last_backend(name) is Backend.TRITON, (name, last_backend(name))


# (B, N, C): C not a power of two with a ragged row tile, one token, the benchmark's width
SHAPES = [(2, 37, 48), (1, 1, 7), (3, 9, 256)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adaln(shape, dtype, force_triton, splits):
    x, _, _, scale, shift = _on(DEVICE, block_inputs(*shape, dtype, strided=True))
    check_op(ops.adaln, adaln_eager, adaln_reference, [x, scale, shift], 1, [0, 1, 2], dtype,
             ["x", "scale", "shift"])
    _assert_triton("adaln", "adaln_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_adaln(shape, dtype, force_triton, splits):
    inputs = _on(DEVICE, block_inputs(*shape, dtype, seed=1, strided=True))
    check_op(ops.gated_adaln, gated_adaln_eager, gated_adaln_reference, inputs, 2, [0, 1, 2, 3, 4], dtype,
             ["x", "gate", "y", "scale", "shift"])
    _assert_triton("gated_adaln", "gated_adaln_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual(shape, dtype, force_triton, splits):
    x, gate, y, _, _ = _on(DEVICE, block_inputs(*shape, dtype, seed=2, strided=True))
    check_op(ops.gated_residual, gated_residual_eager, gated_residual_reference, [x, gate, y], 1, [0, 1, 2], dtype,
             ["x", "gate", "y"])
    _assert_triton("gated_residual", "gated_residual_backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("rope_kind", [None, "nd", "bnd", "slice"])
@pytest.mark.parametrize("shape", [(2, 13, 3, 16), (1, 1, 1, 64), (2, 5, 2, 48)], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm(shape, rope_kind, dtype, force_triton, splits):
    q, w, rope = qk_inputs(*shape, dtype, rope_kind)
    q, w = _on(DEVICE, [q, w])
    rope = None if rope is None else tuple(_on(DEVICE, rope))
    check_op(lambda a, b: ops.rms_norm(a, b, EPS, rope=rope), lambda a, b: rms_norm_eager(a, b, EPS, rope),
             lambda a, b: rms_norm_reference(a, b, EPS, None if rope is None else [t.double() for t in rope]),
             [q, w], 1, [0, 1], dtype, ["x", "weight"])
    _assert_triton("rms_norm", "rms_norm_backward")


def test_rms_norm_rank3_wide_rows(force_triton):
    """Qwen-Image's text norm layout: rank 3, rows of 300 (a padded 512 tile)."""
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(2, 11, 300, generator=g)).to(torch.bfloat16).to(DEVICE)
    w = (1 + 0.1 * torch.randn(300, generator=g)).to(torch.bfloat16).to(DEVICE)
    check_op(lambda a, b: ops.rms_norm(a, b, EPS), rms_norm_eager, rms_norm_reference, [x, w], 1, [0, 1],
             torch.bfloat16, ["x", "weight"])
    _assert_triton("rms_norm", "rms_norm_backward")


@pytest.mark.parametrize("wanted", [[0], [1, 2], [3, 4], [0, 3]])
def test_gated_adaln_gradient_masks(wanted, force_triton):
    """Each WANT_* combination of the backward kernel: the wanted gradients equal those of an all-inputs run."""
    inputs = _on(DEVICE, block_inputs(2, 7, 12, torch.float32, seed=8, strided=True))
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(2, 7, 12, generator=g).to(DEVICE) for _ in range(2)]
    _, some = run(ops.gated_adaln, inputs, grads, wanted)
    _, every = run(ops.gated_adaln, inputs, grads, [0, 1, 2, 3, 4])
    _assert_triton("gated_adaln_backward")
    for k, i in enumerate(wanted):
        torch.testing.assert_close(some[k], every[i], rtol=0, atol=0)


@pytest.mark.parametrize("which", ["h", "out"])
def test_gated_adaln_one_output_differentiated(which, force_triton):
    """HAS_DOUT / HAS_DH off: only h or only out reaches the loss."""
    inputs = [t.requires_grad_() for t in _on(DEVICE, block_inputs(2, 6, 10, torch.float32, seed=10))]
    h, out = ops.gated_adaln(*inputs)
    got = torch.autograd.grad((h if which == "h" else out).square().sum(), inputs)
    _assert_triton("gated_adaln_backward")
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    hr, outr = gated_adaln_reference(*ref_inputs)
    want = torch.autograd.grad((hr if which == "h" else outr).square().sum(), ref_inputs, allow_unused=True)
    for a, b in zip(got, want):
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_frozen_gate_and_expanded_gradient(force_triton):
    """gated_residual with a frozen gate (LoRA training: y not saved, no dgate pass) under `.sum().backward()`'s
    stride-0 gradient."""
    x, gate, y, _, _ = _on(DEVICE, block_inputs(2, 5, 24, torch.float32, seed=13))
    x, y = x.requires_grad_(), y.requires_grad_()
    dx, dy = torch.autograd.grad(ops.gated_residual(x, gate, y).sum(), (x, y))
    _assert_triton("gated_residual_backward")
    torch.testing.assert_close(dx, torch.ones_like(x), rtol=0, atol=0)
    torch.testing.assert_close(dy, gate[:, None].expand_as(y), rtol=0, atol=0)


def test_deterministic(force_triton):
    inputs = _on(DEVICE, block_inputs(2, 37, 48, torch.bfloat16, seed=14, strided=True))
    g = torch.Generator().manual_seed(15)
    grads = [torch.randn(2, 37, 48, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2)]
    first = run(ops.gated_adaln, inputs, grads, [0, 1, 2, 3, 4])
    second = run(ops.gated_adaln, inputs, grads, [0, 1, 2, 3, 4])
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], second[0] + second[1]))


def test_fp64_and_disable_take_the_reference(force_triton, monkeypatch):
    x, _, _, scale, shift = _on(DEVICE, block_inputs(2, 5, 8, torch.float64))
    ops.adaln(x, scale, shift)
    assert last_backend("adaln") is Backend.REFERENCE
    q, w, _ = qk_inputs(2, 5, 2, 8, torch.float64, None)
    ops.rms_norm(q.to(DEVICE), w.to(DEVICE))
    assert last_backend("rms_norm") is Backend.REFERENCE
    monkeypatch.delenv(FORCE_TRITON, raising=False)
    monkeypatch.setenv("NFTCORE_DISABLE_TRITON", "1")
    monkeypatch.setenv("NFTCORE_DISABLE_NATIVE", "1")
    ops.adaln(x.float(), scale.float(), shift.float())
    assert last_backend("adaln") is Backend.REFERENCE


def test_opcheck_on_the_triton_backend(force_triton):
    x, gate, y, scale, shift = (t.requires_grad_() for t in _on(DEVICE, block_inputs(2, 5, 8, torch.bfloat16,
                                                                                      seed=16, strided=True)))
    torch.library.opcheck(torch.ops.nftcore.gated_adaln.default, (x, gate, y, scale, shift, EPS))
    torch.library.opcheck(torch.ops.nftcore.gated_residual.default, (x, gate, y))
    torch.library.opcheck(torch.ops.nftcore.adaln.default, (x, scale, shift, EPS))
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.bfloat16, "nd", seed=17)
    q, w = (t.to(DEVICE).requires_grad_() for t in (q, w))
    torch.library.opcheck(torch.ops.nftcore.rms_norm.default, (q, w, rope[0].to(DEVICE), rope[1].to(DEVICE), EPS))
    assert last_backend("rms_norm") is Backend.TRITON


def test_mmdit_block_on_the_triton_backend_matches_the_reference(force_triton, monkeypatch):
    """A tiny FLUX MMDiT (one double, one single block) forward + backward with every block op on Triton agrees with
    the same model on the reference backend (fp32; attention stays on its reference to keep the interpreter run short).
    """
    from nftcore.models import MMDiT, MMDiTConfig, flux_image_ids

    attention_module = sys.modules["nftcore.ops.attention"]  # `nftcore.ops.attention` the attribute is the function

    cfg = MMDiTConfig(family="flux", patch_size=1, in_channels=8, out_channels=8, num_layers=1, num_single_layers=1,
                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
                      guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    torch.manual_seed(0)
    model = MMDiT(cfg).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    monkeypatch.setattr(attention_module, "_FORWARD_IMPLS",
                        {Backend.REFERENCE: attention_module._FORWARD_IMPLS[Backend.REFERENCE]})
    monkeypatch.setattr(attention_module, "_BACKWARD_IMPLS",
                        {Backend.REFERENCE: attention_module._BACKWARD_IMPLS[Backend.REFERENCE]})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, generator=g).to(DEVICE)
    kwargs = dict(encoder_hidden_states=torch.randn(2, 4, 12, generator=g).to(DEVICE), timestep=0.5,
                  pooled_projections=torch.randn(2, 6, generator=g).to(DEVICE), img_ids=flux_image_ids(2, 3),
                  txt_ids=torch.zeros(4, 3))
    results = []
    for triton_on in (True, False):
        if not triton_on:
            monkeypatch.delenv(FORCE_TRITON, raising=False)
            monkeypatch.setenv("NFTCORE_DISABLE_TRITON", "1")
        xi = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        out = model(xi, **kwargs).sample
        out.square().sum().backward()
        if triton_on:
            _assert_triton("adaln", "gated_adaln", "gated_residual", "rms_norm", "adaln_backward",
                           "gated_adaln_backward", "gated_residual_backward", "rms_norm_backward")
        results.append([out.detach(), xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# sm_90 ahead-of-time compile of every shipped configuration (no GPU needed; see tests/helpers/aot.py).

_ADALN = "nftcore.kernels.adaln"
_RMS = "nftcore.kernels.rms_norm"
# Widths the models ship: FLUX / Qwen-Image hidden 3072, the CPU benchmark's 256; head dims 128 (both families) and
# 64; Qwen-Image's text norm over 3584.
_HIDDEN = (3072, 256)
_HEAD_DIMS = (128, 64)


def _adaln_specs():
    specs = []
    for c in _HIDDEN:
        block_c, block_r, warps = adaln_kernel.block_config(c)
        bwd_warps = adaln_kernel.block_config(c, backward=True)[2]
        for dt in ("bf16", "fp16", "fp32"):
            big = {k: f"*{dt}" for k in ("X", "Y", "H", "OUT", "DOUT", "DH", "DX", "DY", "G")}
            vec = {k: f"*{dt}" for k in ("GATE", "SCALE", "SHIFT")}
            ints = {k: "i32" for k in ("N", "C", "chunk", "splits", "sxb", "sxn", "syb", "syn", "sgb", "ssb", "stb",
                                       "sdb", "sdn", "shb", "shn", "sgrb", "sgrn")}
            sig = {**big, **vec, **ints, "MEAN": "*fp32", "RSTD": "*fp32", "WS": "*fp32", "eps": "fp32"}
            tiles = dict(ROUND_BF16=False, BLOCK_R=block_r, BLOCK_C=block_c)
            tag = f"{dt} C={c}"
            for gated in (False, True):
                specs.append(AOTSpec(_ADALN, "_adaln_fwd_kernel", sig, dict(GATED=gated, **tiles), num_warps=warps,
                                     label=f"adaln fwd gated={gated} {tag}"))
            # backward variants: full fine-tuning (every gradient) and LoRA (frozen modulation: dx, dy only), for the
            # plain and the gated form; gated with only out differentiated too.
            for gated, dout, dh, dy, dgate, dmod in ((False, True, False, False, False, True),
                                                     (False, True, False, False, False, False),
                                                     (True, True, True, True, True, True),
                                                     (True, True, True, True, False, False),
                                                     (True, True, False, True, True, True)):
                flags = dict(GATED=gated, HAS_DOUT=dout, HAS_DH=dh, WANT_DX=True, WANT_DY=dy, WANT_DGATE=dgate,
                             WANT_DMOD=dmod, **tiles)
                specs.append(AOTSpec(_ADALN, "_adaln_bwd_kernel", sig, flags, num_warps=bwd_warps,
                                     label=f"adaln bwd gated={gated} dh={dh} dy={dy} dgate={dgate} dmod={dmod} {tag}"))
            specs.append(AOTSpec(_ADALN, "_gated_residual_fwd_kernel", sig, tiles, num_warps=warps,
                                 label=f"gated_residual fwd {tag}"))
            for dy, dgate in ((True, True), (True, False)):
                specs.append(AOTSpec(_ADALN, "_gated_residual_bwd_kernel", sig,
                                     dict(WANT_DY=dy, WANT_DGATE=dgate, **tiles), num_warps=bwd_warps,
                                     label=f"gated_residual bwd dy={dy} dgate={dgate} {tag}"))
    return specs


def _rms_specs():
    specs = []
    for d, ropes in [(hd, (True, False)) for hd in _HEAD_DIMS] + [(3584, (False,))]:
        block_d, block_r, warps = rms_kernel.block_config(d)
        bwd_warps = rms_kernel.block_config(d, backward=True)[2]
        for dt in ("bf16", "fp16", "fp32"):
            sig = {"X": f"*{dt}", "W": f"*{dt}", "Y": f"*{dt}", "G": f"*{dt}", "DX": f"*{dt}", "COS": "*fp32",
                   "SIN": "*fp32", "RSTD": "*fp32", "WS": "*fp32", "eps": "fp32",
                   **{k: "i32" for k in ("R", "N", "H", "D", "chunk", "sxb", "sxn", "sxh", "sgb", "sgn", "sgh",
                                         "scb", "scn")}}
            for rope in ropes:
                tiles = dict(ROPE=rope, ROUND_BF16=False, BLOCK_R=block_r, BLOCK_D=block_d)
                specs.append(AOTSpec(_RMS, "_rms_norm_fwd_kernel", sig, tiles, num_warps=warps,
                                     label=f"rms fwd rope={rope} {dt} D={d}"))
                for want_dw in (True, False):
                    specs.append(AOTSpec(_RMS, "_rms_norm_bwd_kernel", sig,
                                         dict(WANT_DX=True, WANT_DW=want_dw, **tiles), num_warps=bwd_warps,
                                         label=f"rms bwd rope={rope} dw={want_dw} {dt} D={d}"))
    return specs


@pytest.mark.slow
def test_aot_sm90_every_shipped_config():
    results = compile_many(_adaln_specs() + _rms_specs())
    for res in results:
        print(res.summary())
    failed = [res.summary() for res in results if not res.ok]
    assert not failed, "\n".join(failed)
    assert all(res.shared_bytes <= H100_SHARED_LIMIT for res in results)
    assert not any(res.has_atomics for res in results)  # deterministic by construction
    spills = [res.label for res in results if res.stack_bytes]
    assert not spills, f"register spills in {spills}"


def test_config_selection():
    assert adaln_kernel.block_config(3072) == (4096, 1, 8)
    assert adaln_kernel.block_config(3072, backward=True) == (4096, 1, 16)
    assert adaln_kernel.block_config(256) == (256, 8, 4)
    assert rms_kernel.block_config(128) == (128, 16, 4)
    assert rms_kernel.block_config(3584) == (4096, 1, 8)
    splits, chunk = adaln_kernel.split_config(4096, 1, 1)
    assert splits * chunk >= 4096 and splits <= 264 and (splits - 1) * chunk < 4096
    splits, chunk = rms_kernel.split_config(2 * 2560 * 24, 16)
    assert 132 < splits <= 264 and chunk % 16 == 0 and (splits - 1) * chunk < 2 * 2560 * 24 <= splits * chunk
