"""The native CPU backend (`csrc/block_ops.cpp`, `csrc/rms_norm.cpp`) of the fused MMDiT block ops: `adaln`,
`gated_adaln`, `gated_residual` and `rms_norm` (with and without RoPE).

Tolerance rule (test_native_ops.py's): the truth is the op's autograd reference in fp64 on the same rounded inputs;
the native result may be off it by at most 2x the error of the eager reference backend (NFTCORE_DISABLE_NATIVE=1)
plus a few units in the last place of the output's dtype at the truth's scale. Also: the shapes, dtypes and layouts of
every output (the saved fp32 statistics included) equal the reference's, gradient masks, odd / one-row / empty shapes,
strided and stride-0 inputs as the MMDiT and `.sum().backward()` make them, bit-identical results for 1, 2 and 3
threads and under another ATen CPU capability, and the fallbacks (disabled, fp64, empty) that say so in
`last_backend`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nftcore import _native, ops
from nftcore.ops import last_backend
from nftcore.ops.adaln import adaln_reference, gated_adaln_reference, gated_residual_reference
from nftcore.ops.dispatch import Backend
from nftcore.ops.rms_norm import rms_norm_reference
from tests.helpers.backends import BACKEND_FLAGS
from tests.helpers.block_ops import EPS, block_inputs, qk_inputs, run
from tests.helpers.native import check_rule, needs_native

pytestmark = needs_native
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS = ("adaln_forward", "adaln_backward", "gated_adaln_forward", "gated_adaln_backward", "gated_residual_forward",
           "gated_residual_backward", "rms_norm_forward", "rms_norm_backward")
# (B, N, C): odd widths (not multiples of 16), one token, one sample, a wide-ish row, FLUX's width.
SHAPES = [(2, 37, 48), (1, 1, 7), (3, 5, 250), (1, 19, 2), (2, 9, 1000), (1, 40, 3072)]


def test_kernels_are_registered():
    assert set(KERNELS) <= set(_native.registered_ops())


# ----------------------------------------------------------------------------------------------------------------
# Against fp64, beside the reference backend.


def compare(env, op_name, fn, reference, inputs, n_out, wanted, names, seed=0, ulps=4):
    """Native vs the reference backend vs the fp64 truth, outputs and the gradients of `wanted` inputs."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grad_outs = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    nat, nat_g = run(fn, inputs, grad_outs, wanted)
    assert last_backend(op_name) is Backend.NATIVE and last_backend(op_name + "_backward") is Backend.NATIVE
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    ref, ref_g = run(fn, inputs, grad_outs, wanted)
    assert last_backend(op_name) is Backend.REFERENCE
    env.delenv("NFTCORE_DISABLE_NATIVE")
    truth, truth_g = run(reference, [t.double() for t in inputs], [c.double() for c in grad_outs], wanted)
    for i in range(n_out):
        assert nat[i].is_contiguous() and nat[i].stride() == ref[i].stride()
        check_rule(nat[i], ref[i], truth[i], f"out{i}", ulps)
    for k, i in enumerate(wanted):
        assert nat_g[k].dtype == ref_g[k].dtype == inputs[i].dtype and nat_g[k].shape == inputs[i].shape
        check_rule(nat_g[k], ref_g[k], truth_g[k], f"d{names[i]}", ulps)
    return nat, nat_g


# x's dtype, and whether the [B, C] vectors are fp32 while x is 16-bit (a model whose modulation runs in fp32).
MODULATIONS = [("fp32", False), ("bf16", False), ("bf16", True), ("fp16", False), ("fp16", True)]
MODULATION_IDS = ["fp32", "bf16", "bf16_fp32_vectors", "fp16", "fp16_fp32_vectors"]


def _modulation(inputs, mixed):
    """`mixed`: the [B, C] vectors in fp32 while x and y are 16-bit (a model whose modulation runs in fp32)."""
    return [t.float() if mixed and t.dim() == 2 else t for t in inputs]


@pytest.mark.parametrize("dtype,mixed", MODULATIONS, ids=MODULATION_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adaln_matches_fp64(env, shape, dtype, mixed):
    x, _, _, scale, shift = _modulation(block_inputs(*shape, DTYPES[dtype], strided=shape[2] > 1), mixed)
    compare(env, "adaln", ops.adaln, adaln_reference, [x, scale, shift], 1, [0, 1, 2], ["x", "scale", "shift"])


@pytest.mark.parametrize("dtype,mixed", MODULATIONS, ids=MODULATION_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_adaln_matches_fp64(env, shape, dtype, mixed):
    inputs = _modulation(block_inputs(*shape, DTYPES[dtype], seed=1, strided=True), mixed)
    compare(env, "gated_adaln", ops.gated_adaln, gated_adaln_reference, inputs, 2, [0, 1, 2, 3, 4],
            ["x", "gate", "y", "scale", "shift"])


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_matches_fp64(env, shape, dtype):
    x, gate, y, _, _ = block_inputs(*shape, DTYPES[dtype], seed=2, strided=True)
    compare(env, "gated_residual", ops.gated_residual, gated_residual_reference, [x, gate, y], 1, [0, 1, 2],
            ["x", "gate", "y"])


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("rope_kind", [None, "nd", "bnd", "slice"])
@pytest.mark.parametrize("shape", [(2, 37, 3, 16), (1, 1, 1, 64), (2, 5, 2, 46), (1, 24, 4, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_fp64(env, shape, rope_kind, dtype):
    q, w, rope = qk_inputs(*shape, DTYPES[dtype], rope_kind)
    truth_rope = None if rope is None else [t.double() for t in rope]
    compare(env, "rms_norm", lambda a, b: ops.rms_norm(a, b, EPS, rope=rope),
            lambda a, b: rms_norm_reference(a, b, EPS, truth_rope), [q, w], 1, [0, 1], ["x", "weight"])


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 11, 300), (7, 33), (19,)], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_other_ranks(env, shape, dtype):
    """Qwen-Image's text norm ([B, Nt, 3584]-like rows, here 300 wide), a rank-2 strided input and one row."""
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(*shape[:-1], shape[-1] + 5, generator=g))[..., 5:].to(DTYPES[dtype])
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DTYPES[dtype])
    compare(env, "rms_norm", lambda a, b: ops.rms_norm(a, b, EPS), lambda a, b: rms_norm_reference(a, b, EPS),
            [x, w], 1, [0, 1], ["x", "weight"])


# ----------------------------------------------------------------------------------------------------------------
# What the reference returns, exactly: statistics, masks, layouts.


def test_statistics_and_outputs_match_the_reference_layouts(env):
    x, gate, y, scale, shift = block_inputs(2, 9, 40, torch.bfloat16, seed=4, strided=True)
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.bfloat16, "nd")
    calls = {
        "adaln": lambda: torch.ops.nftcore.adaln(x, scale, shift, EPS),
        "gated_adaln": lambda: torch.ops.nftcore.gated_adaln(x, gate, y, scale, shift, EPS),
        "rms_norm": lambda: torch.ops.nftcore.rms_norm(q, w, rope[0], rope[1], EPS),
    }
    for name, call in calls.items():
        nat = call()
        assert last_backend(name) is Backend.NATIVE
        env.setenv("NFTCORE_DISABLE_NATIVE", "1")
        ref = call()
        env.delenv("NFTCORE_DISABLE_NATIVE")
        for a, b in zip(nat, ref):
            assert (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), name
        torch.testing.assert_close(nat[-1], ref[-1], rtol=1e-5, atol=0)  # rstd, fp32
        if name != "rms_norm":
            torch.testing.assert_close(nat[-2], ref[-2], rtol=1e-5, atol=1e-6)  # mean, fp32


@pytest.mark.parametrize("wanted", [[0], [1], [2], [1, 2], [3, 4], [0, 3], [4]])
def test_gated_adaln_partial_gradients_are_the_full_runs_bits(env, wanted):
    inputs = block_inputs(2, 7, 36, torch.float32, seed=8, strided=True)
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(2, 7, 36, generator=g) for _ in range(2)]
    _, some = run(ops.gated_adaln, inputs, grads, wanted)
    assert last_backend("gated_adaln_backward") is Backend.NATIVE
    _, every = run(ops.gated_adaln, inputs, grads, [0, 1, 2, 3, 4])
    for k, i in enumerate(wanted):
        assert torch.equal(some[k], every[i]), i


@pytest.mark.parametrize("which", ["h", "out"])
def test_gated_adaln_one_output_differentiated(env, which):
    inputs = [t.requires_grad_() for t in block_inputs(2, 6, 20, torch.float32, seed=10)]
    h, out = ops.gated_adaln(*inputs)
    got = torch.autograd.grad((h if which == "h" else out).square().sum(), inputs)
    assert last_backend("gated_adaln_backward") is Backend.NATIVE
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    hr, outr = gated_adaln_reference(*ref_inputs)
    want = torch.autograd.grad((hr if which == "h" else outr).square().sum(), ref_inputs, allow_unused=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), torch.zeros_like(a.double()) if b is None else b, rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize("wanted", [[0], [1], [0, 1]])
def test_residual_and_rms_norm_partial_gradients(env, wanted):
    x, gate, y, _, _ = block_inputs(2, 5, 24, torch.float32, seed=11, strided=True)
    grad = [torch.randn(2, 5, 24)]
    index = [i + 1 for i in wanted]  # gate, y
    _, some = run(ops.gated_residual, [x, gate, y], grad, index)
    _, every = run(ops.gated_residual, [x, gate, y], grad, [0, 1, 2])
    assert all(torch.equal(some[k], every[i]) for k, i in enumerate(index))
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.float32, "nd", seed=12)
    fn = lambda a, b: ops.rms_norm(a, b, EPS, rope=rope)  # noqa: E731
    grad = [torch.randn(2, 5, 2, 8)]
    _, some = run(fn, [q, w], grad, wanted)
    _, every = run(fn, [q, w], grad, [0, 1])
    assert last_backend("rms_norm_backward") is Backend.NATIVE
    assert all(torch.equal(some[k], every[i]) for k, i in enumerate(wanted))


def test_expanded_gradient_from_sum(env):
    """`.sum().backward()` hands the kernels stride-0 gradients."""
    x, gate, y, scale, shift = (t.requires_grad_() for t in block_inputs(2, 5, 24, torch.float32, seed=13))
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.float32, "bnd", seed=14)
    q, w = q.requires_grad_(), w.requires_grad_()
    cases = [(ops.gated_residual, gated_residual_reference, (x, gate, y)),
             (ops.adaln, adaln_reference, (x, scale, shift)),
             (lambda *a: ops.gated_adaln(*a)[1], lambda *a: gated_adaln_reference(*a)[1], (x, gate, y, scale, shift)),
             (lambda a, b: ops.rms_norm(a, b, rope=rope), lambda a, b: rms_norm_reference(a, b, EPS, rope), (q, w))]
    for fn, ref, args in cases:
        got = torch.autograd.grad(fn(*args).sum(), args)
        want = torch.autograd.grad(ref(*args).sum(), args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_opcheck_on_the_native_backend(env):
    x, gate, y, scale, shift = (t.requires_grad_() for t in block_inputs(2, 5, 24, torch.bfloat16, seed=14,
                                                                          strided=True))
    torch.library.opcheck(torch.ops.nftcore.adaln.default, (x, scale, shift, EPS))
    torch.library.opcheck(torch.ops.nftcore.gated_adaln.default, (x, gate, y, scale, shift, EPS))
    torch.library.opcheck(torch.ops.nftcore.gated_residual.default, (x, gate, y))
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.bfloat16, "nd", seed=15)
    q, w = q.requires_grad_(), w.requires_grad_()
    torch.library.opcheck(torch.ops.nftcore.rms_norm.default, (q, w, rope[0], rope[1], EPS))
    with torch.no_grad():
        _, mean, rstd = torch.ops.nftcore.adaln(x, scale, shift, EPS)
        g = torch.randn(2, 5, 24).bfloat16()
        torch.library.opcheck(torch.ops.nftcore.adaln_backward.default, (g, x, scale, mean, rstd, [True, False, True]))
        torch.library.opcheck(torch.ops.nftcore.gated_adaln_backward.default,
                              (None, g, x, gate, y, scale, mean, rstd, [True, False, True, True, False]))
        torch.library.opcheck(torch.ops.nftcore.gated_residual_backward.default, (g, gate, None, [False, True]))
        _, rstd_q = torch.ops.nftcore.rms_norm(q, w, None, None, EPS)
        g_q = g.view(2, 5, 3, 8)[:, :, :2]  # a strided gradient
        torch.library.opcheck(torch.ops.nftcore.rms_norm_backward.default,
                              (g_q, q, w, rstd_q, rope[0], rope[1], [True, True]))
    assert last_backend("rms_norm_backward") is Backend.NATIVE


# ----------------------------------------------------------------------------------------------------------------
# Reproducibility: thread counts, ATen's CPU capability.


def _op_inputs(seed=16, dtype=torch.float32, big=True):
    """Inputs and cotangents of the four ops, at a size where the column sums have several pieces (rows.h)."""
    shape = (2, 2500, 120) if big else (2, 9, 40)
    g = torch.Generator().manual_seed(seed)
    block = block_inputs(*shape, dtype, seed=seed, strided=True)
    grads = [torch.randn(shape, generator=g).to(dtype) for _ in range(2)]
    q, w, rope = qk_inputs(2, 700 if big else 5, 4, 64, dtype, "slice", seed=seed)
    return dict(block=block, grads=grads, q=q, w=w, rope=rope, grad_q=torch.randn(q.shape, generator=g).to(dtype))


def _all_ops(inputs):
    """Outputs and every gradient of the four ops, flattened into one list."""
    x, gate, y, scale, shift = inputs["block"]
    grads, rope = inputs["grads"], inputs["rope"]
    results = run(ops.gated_adaln, [x, gate, y, scale, shift], grads, [0, 1, 2, 3, 4])
    results += run(ops.adaln, [x, scale, shift], grads[:1], [0, 1, 2])
    results += run(ops.gated_residual, [x, gate, y], grads[:1], [0, 1, 2])
    results += run(lambda a, b: ops.rms_norm(a, b, EPS, rope=rope), [inputs["q"], inputs["w"]], [inputs["grad_q"]],
                   [0, 1])
    return [t for group in results for t in group]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_bits_do_not_depend_on_the_thread_count(env, threads, dtype):
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        results.append(_all_ops(_op_inputs(dtype=DTYPES[dtype])))
        assert last_backend("rms_norm_backward") is Backend.NATIVE
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


CAPABILITY_RUN = """
import sys, torch
from tests.test_block_ops_native import _all_ops
torch.save(_all_ops(torch.load(sys.argv[1])), sys.argv[2])
print(torch.backends.cpu.get_cpu_capability())
"""


def test_bits_do_not_depend_on_atens_cpu_capability(tmp_path):
    """The kernels are compiled for the x86-64 baseline, whatever ATen dispatches its own kernels to: the same
    inputs give the same bits under ATEN_CPU_CAPABILITY=avx2 as under the CPU's default."""
    environ = {k: v for k, v in os.environ.items() if k not in BACKEND_FLAGS}
    inputs = tmp_path / "inputs.pt"
    torch.save(_op_inputs(big=False), inputs)
    runs = {}
    for capability in ("default", "avx2"):
        path = tmp_path / f"{capability}.pt"
        done = subprocess.run([sys.executable, "-c", CAPABILITY_RUN, str(inputs), str(path)], cwd=REPO,
                              env=dict(environ, ATEN_CPU_CAPABILITY=capability), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        runs[capability] = (done.stdout.split()[-1], torch.load(path))
    print(json.dumps({k: v[0] for k, v in runs.items()}))
    if runs["avx2"][0] != "AVX2":
        pytest.skip(f"this CPU does not run ATen's AVX2 kernels (capability {runs['avx2'][0]})")
    assert all(torch.equal(a, b) for a, b in zip(runs["default"][1], runs["avx2"][1]))


# ----------------------------------------------------------------------------------------------------------------
# Fallbacks and direct calls.


def test_disable_native_runs_the_reference(env):
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    _all_ops(_op_inputs(big=False))
    for op in ("adaln", "gated_adaln", "gated_residual", "rms_norm"):
        assert last_backend(op) is Backend.REFERENCE and last_backend(op + "_backward") is Backend.REFERENCE
    env.delenv("NFTCORE_DISABLE_NATIVE")  # read per call
    _all_ops(_op_inputs(big=False))
    assert last_backend("adaln") is Backend.NATIVE and last_backend("rms_norm") is Backend.NATIVE


def test_fp64_and_empty_inputs_run_the_reference(env):
    x, gate, y, scale, shift = block_inputs(2, 5, 8, torch.float32, seed=17)
    ops.gated_residual(x, gate.double(), y)  # an fp64 gate: the reference computes x + gate·y in fp64
    assert last_backend("gated_residual") is Backend.REFERENCE
    ops.adaln(x.double(), scale, shift)
    assert last_backend("adaln") is Backend.REFERENCE
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.float32, "nd")
    ops.rms_norm(q, w.double(), rope=rope)
    assert last_backend("rms_norm") is Backend.REFERENCE
    ops.rms_norm(q, w, rope=rope)
    assert last_backend("rms_norm") is Backend.NATIVE
    empty = block_inputs(2, 0, 8, torch.float32)
    assert ops.gated_adaln(*empty)[1].shape == (2, 0, 8)
    assert last_backend("gated_adaln") is Backend.REFERENCE


def test_direct_calls_check_their_inputs():
    """A direct torch.ops.nftcore_native call with bad shapes raises instead of reading out of bounds."""
    native = torch.ops.nftcore_native
    x, gate, y, scale, shift = block_inputs(2, 5, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"\[B, C\]"):
        native.adaln_forward(x, scale[:, :4], shift, EPS)
    with pytest.raises(RuntimeError, match="x's shape"):
        native.gated_residual_forward(x, gate, y[:, :3])
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        native.adaln_forward(x.double(), scale, shift, EPS)
    _, mean, rstd = native.adaln_forward(x, scale, shift, EPS)
    with pytest.raises(RuntimeError, match="B·N"):
        native.adaln_backward(x, x, scale, mean[:, :2], rstd, [True, True, True])
    q, w, rope = qk_inputs(2, 5, 2, 8, torch.float32, "nd")
    with pytest.raises(RuntimeError, match=r"\[N, D/2\]"):
        native.rms_norm_forward(q, w, rope[0][:3], rope[1][:3], EPS)
    with pytest.raises(RuntimeError, match="rstd"):
        native.rms_norm_backward(q, q, w, rstd, None, None, [True, True])
    out, mean, rstd = native.adaln_forward(x[:, :0], scale, shift, EPS)  # empty: no work, zero statistics
    assert out.shape == (2, 0, 8) and mean.shape == (2, 0)
