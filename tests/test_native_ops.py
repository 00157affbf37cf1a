"""The native CPU backend (`nftcore._C`, built from csrc/ by setup.py) behind `nft_loss` and `score_logits`.

Tolerance rule (flash-attention's): the truth is the op evaluated in fp64 on the same (rounded) inputs; PyTorch's own
error is the eager reference backend's error against it in the inputs' precision; the native result may be off the
truth by at most 2x that error plus a few units in the last place of the output's dtype at the output's scale (so a
reference that happens to be exact cannot make the bound vanish).

Also: gradients through both backward paths, odd/ragged/one-row/empty shapes, mixed dtypes, bit-identical results for
1, 2 and 3 threads, the memory bound of the streamed full mode, the disable / missing-build / stale / skipped / failed
paths, and `python -m nftcore.info`. Tests that need the module skip when it is not built - except
`test_native_module_is_built`, which fails then unless NFTCORE_SKIP_NATIVE is set: CI must not lose the native path
silently.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nftcore import _native
from nftcore.ops import NFTLossOutput, last_backend, nft_loss, score_logits
from nftcore.ops.dispatch import Backend, env_flag
from nftcore.ops.reference import naive_score_logits
from nftcore.testing.memory import peak_allocated_bytes
from tests.helpers.backends import BACKEND_FLAGS
from tests.helpers.native import STATUS, check_rule, needs_native

sl_mod = importlib.import_module("nftcore.ops.score_logits")
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def test_native_module_is_built():
    if env_flag("NFTCORE_SKIP_NATIVE"):
        pytest.skip("NFTCORE_SKIP_NATIVE is set: the native build was skipped on purpose")
    assert STATUS.loaded, (f"the native CPU kernels are not available ({STATUS.reason}); the install must build "
                           "nftcore._C (scripts/dev.sh does), or set NFTCORE_SKIP_NATIVE=1 to go without them")
    assert {"nft_loss_forward", "nft_loss_backward", "score_logits_forward"} <= set(_native.registered_ops())


# ----------------------------------------------------------------------------------------------------------------
# nft_loss


def nft_inputs(shape, dtype, seed=0, *, with_ref=True):
    """Inputs shaped like one NFT step (x_t on the flow path, velocities near eps - x0), made in fp64 and rounded."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    t = 0.02 + 0.98 * torch.rand(B, generator=g, dtype=torch.float64)
    tv = t.view((B,) + (1,) * (len(shape) - 1))
    v_old = eps - x0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    inputs = dict(v_theta=v_old + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64), v_old=v_old,
                  x_t=(1 - tv) * x0 + tv * eps, x0=x0, t=t.float(), r=torch.rand(B, generator=g).float())
    if with_ref:
        inputs["v_ref"] = v_old + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    return {k: (v.to(dtype) if v.dim() > 1 else v) for k, v in inputs.items()}


def run_nft(inputs, options, weights=None):
    """Outputs, the gradient of `loss` (cached path) and, with `weights`, of a mix of all outputs (general backward)."""
    v = inputs["v_theta"].clone().requires_grad_(True)
    rest = {k: x for k, x in inputs.items() if k != "v_theta"}
    out = nft_loss(v, **rest, **options)
    (grad_loss,) = torch.autograd.grad(out.loss, v, retain_graph=True)
    forward_backend = last_backend("nft_loss")
    grad_mix = None
    if weights is not None:
        w, w_ps = weights
        mix = w[0] * out.loss + w[1] * out.policy_loss + w[2] * out.kl_loss + (w_ps * out.per_sample).sum()
        (grad_mix,) = torch.autograd.grad(mix, v)
    return out, grad_loss, grad_mix, forward_backend


NFT_SHAPES = {
    "odd_3x37x65": (3, 37, 65),
    "ragged_pieces_2x4097": (2, 4097),  # one element past a 4096-element piece
    "one_row_1x5000": (1, 5000),
    "4d_5x3x7x11": (5, 3, 7, 11),
    "demo_16x16x48": (16, 16, 48),
    "qwen512_3x1024x64": (3, 1024, 64),
}
NFT_OPTIONS = {
    "defaults": dict(),
    "kl_mask_beta": dict(kl_weight=0.1, beta=0.6, negative_weight=0.5, mask=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])),
    "positive_only": dict(beta=1.7, loss_scale=2.0, negative_weight=0.0, kl_weight=1e-4),
}


@needs_native
@pytest.mark.parametrize("options", NFT_OPTIONS.values(), ids=list(NFT_OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", NFT_SHAPES.values(), ids=list(NFT_SHAPES))
def test_nft_loss_matches_the_reference_rule(env, shape, dtype, options):
    options = dict(options)
    if "mask" in options:
        options["mask"] = options["mask"].repeat(4)[: shape[0]]
    inputs = nft_inputs(shape, DTYPES[dtype], with_ref=options.get("kl_weight", 0.0) != 0.0)
    if "v_ref" in inputs:
        options["v_ref"] = inputs.pop("v_ref")
    g = torch.Generator().manual_seed(7)
    weights = (torch.randn(3, generator=g), torch.randn(shape[0], generator=g))
    native, n_grad, n_mix, n_backend = run_nft(inputs, options, weights)
    assert n_backend is Backend.NATIVE and last_backend("nft_loss_backward") is Backend.NATIVE
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    ref, r_grad, r_mix, r_backend = run_nft(inputs, options, weights)
    assert r_backend is Backend.REFERENCE
    wide = {k: x.double() for k, x in inputs.items()}
    wide_opts = {k: (x.double() if isinstance(x, torch.Tensor) else x) for k, x in options.items()}
    truth, t_grad, t_mix, _ = run_nft(wide, wide_opts, tuple(w.double() for w in weights))
    label = f"{dtype} {shape}"
    for field in NFTLossOutput._fields:
        check_rule(getattr(native, field), getattr(ref, field), getattr(truth, field), f"{label} {field}", ulps=8)
    check_rule(n_grad, r_grad, t_grad, f"{label} d loss")
    check_rule(n_mix, r_mix, t_mix, f"{label} d mix")
    assert n_grad.dtype == inputs["v_theta"].dtype


@needs_native
@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0)], ids=["no_samples", "empty_samples"])
def test_nft_loss_empty_inputs_fall_back_to_the_reference(env, shape):
    inputs = nft_inputs(shape, torch.float32, with_ref=False)
    options = dict(check_values=False)  # an empty sample's means are NaN (0/0), as in the reference
    out, grad, _, backend = run_nft(inputs, options)
    assert backend is Backend.REFERENCE and last_backend("nft_loss") is Backend.REFERENCE  # recorded fallback
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    ref, ref_grad, _, _ = run_nft(inputs, options)
    for field in NFTLossOutput._fields:
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), equal_nan=True)
    assert grad.shape == inputs["v_theta"].shape


@needs_native
def test_nft_loss_fp64_falls_back_to_the_reference_and_says_so(env):
    inputs = nft_inputs((3, 7, 5), torch.float64)
    v_ref = inputs.pop("v_ref")
    out, _, _, backend = run_nft(inputs, dict(v_ref=v_ref, kl_weight=0.1), (torch.ones(3), torch.ones(3)))
    assert backend is Backend.REFERENCE and last_backend("nft_loss_backward") is Backend.REFERENCE
    assert out.loss.dtype == torch.float64


@needs_native
def test_nft_loss_mixed_dtypes_and_strided_v_theta(env):
    """bf16 v_theta with fp32 companions: computed on the exact fp32 upcast, the gradient rounded once to bf16. A
    permuted v_theta gets its gradient in its own layout (like the op's fake implementation's empty_like)."""
    inputs = nft_inputs((3, 33, 20), torch.float32)
    v_ref = inputs.pop("v_ref")
    mixed = dict(inputs, v_theta=inputs["v_theta"].bfloat16())
    out, grad, _, backend = run_nft(mixed, dict(v_ref=v_ref.bfloat16(), kl_weight=0.1))
    assert backend is Backend.NATIVE and grad.dtype == torch.bfloat16
    up = dict(inputs, v_theta=inputs["v_theta"].bfloat16().float())
    out_up, grad_up, _, _ = run_nft(up, dict(v_ref=v_ref.bfloat16().float(), kl_weight=0.1))
    assert torch.equal(out.per_sample, out_up.per_sample)
    assert torch.equal(grad, grad_up.bfloat16())

    permuted = {k: (x.transpose(1, 2).contiguous().transpose(1, 2) if x.dim() == 3 else x) for k, x in inputs.items()}
    assert not permuted["v_theta"].is_contiguous()
    out_p, grad_p, _, _ = run_nft(permuted, dict(v_ref=v_ref, kl_weight=0.1))
    out_c, grad_c, _, _ = run_nft(inputs, dict(v_ref=v_ref, kl_weight=0.1))
    assert grad_p.stride() == permuted["v_theta"].stride()
    assert torch.equal(grad_p, grad_c) and torch.equal(out_p.loss, out_c.loss)


@needs_native
def test_nft_loss_bits_do_not_depend_on_the_thread_count(env, threads):
    inputs = nft_inputs((3, 65536 + 17), torch.float32, seed=3)  # 17 pieces per sample: every thread gets several
    v_ref = inputs.pop("v_ref")
    weights = (torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.3, -1.0, 0.7]))
    results = []
    for n in (1, 2, 3):
        torch.set_num_threads(n)
        out, grad, mix, backend = run_nft(inputs, dict(v_ref=v_ref, kl_weight=0.1), weights)
        assert backend is Backend.NATIVE
        results.append((tuple(out), grad, mix))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0][0], other[0]))
        assert torch.equal(results[0][1], other[1]) and torch.equal(results[0][2], other[2])


# ----------------------------------------------------------------------------------------------------------------
# score_logits


def sl_inputs(M, V, H, K, dtype, seed=0, weight_dtype=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=g).to(dtype)
    weight = (3.0 * torch.randn(V, H, generator=g) / H**0.5).to(weight_dtype or dtype)
    return hidden, weight, torch.randperm(V, generator=g)[:K]


SL_SHAPES = [(1, 18992, 72, 6), (3, 1001, 200, 11), (17, 18992, 200, 1), (64, 5000, 3584, 6), (5, 300, 40, 256)]


@needs_native
@pytest.mark.parametrize("mode", ["subset", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SL_SHAPES, ids=lambda s: "M{}_V{}_H{}_K{}".format(*s))
def test_score_logits_matches_the_reference_rule(env, shape, dtype, mode):
    hidden, weight, ids = sl_inputs(*shape, DTYPES[dtype])
    out = score_logits(hidden, weight, ids, mode=mode)
    assert last_backend("score_logits") is Backend.NATIVE
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    ref = score_logits(hidden, weight, ids, mode=mode)
    assert last_backend("score_logits") is Backend.REFERENCE
    truth = naive_score_logits(hidden, weight, ids, mode)
    # ulps: the output is a difference of two fp32 numbers of the size of lse (|log p| ~ 10-20 here).
    check_rule(out, ref, truth, f"{mode} {dtype} {shape}", ulps=16)


@needs_native
def test_score_logits_strided_mixed_and_single_chunk(env):
    """A strided hidden (a last_hidden_state[:, -1] view), an fp32 hidden with a bf16 head, a vocabulary smaller than
    one chunk, and fp16."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 5, 64, generator=g)[:, -1]
    assert hidden.stride(0) == 5 * 64
    for weight_dtype in (torch.float32, torch.bfloat16, torch.float16):
        weight = (3.0 * torch.randn(700, 64, generator=g) / 8.0).to(weight_dtype)
        for mode in ("subset", "full"):
            out = score_logits(hidden, weight, [3, 699, 15], mode=mode)
            assert last_backend("score_logits") is Backend.NATIVE
            env.setenv("NFTCORE_DISABLE_NATIVE", "1")
            ref = score_logits(hidden, weight, [3, 699, 15], mode=mode)
            env.delenv("NFTCORE_DISABLE_NATIVE")
            check_rule(out, ref, naive_score_logits(hidden, weight, [3, 699, 15], mode), f"{weight_dtype} {mode}",
                       ulps=16)


@needs_native
def test_score_logits_empty_batch(env):
    hidden, weight, ids = sl_inputs(0, 300, 40, 3, torch.float32)
    for mode in ("subset", "full"):
        assert score_logits(hidden, weight, ids, mode=mode).shape == (0, 3)
        assert last_backend("score_logits") is Backend.NATIVE


@needs_native
@pytest.mark.parametrize("gemm", ["default", "aten"])
def test_score_logits_bits_do_not_depend_on_the_thread_count(env, threads, gemm):
    """The selected logits and the logsumexp have a fixed order; the chunk GEMMs are the library's (oneDNN/MKL), and
    were thread-count invariant at every shape tried (this one included)."""
    if gemm == "aten":
        env.setenv("NFTCORE_NATIVE_GEMM", "aten")
    hidden, weight, ids = sl_inputs(64, 9001, 3584, 6, torch.float32, seed=2)
    for mode in ("subset", "full"):
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(score_logits(hidden, weight, ids, mode=mode))
        assert last_backend("score_logits") is Backend.NATIVE
        assert all(torch.equal(results[0], r) for r in results[1:]), mode


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_score_logits_full_mode_never_holds_m_by_v(env, dtype):
    """The reference's memory test, on the native backend: same chunk budgets (the native chunks come from
    `chunk_rows`), same bound: one logit chunk, the staging buffer of a 16-bit head, 16 KiB of small tensors."""
    M, V, H = 64, 18992, 72
    hidden, weight, ids = sl_inputs(M, V, H, 6, DTYPES[dtype])
    logit_budget, stage_budget = 64 * 2**10, 256 * 2**10
    env.setattr(sl_mod, "LOGIT_CHUNK_BYTES", logit_budget)
    env.setattr(sl_mod, "STAGE_CHUNK_BYTES", stage_budget)
    peak = peak_allocated_bytes(lambda: score_logits(hidden, weight, ids, mode="full"))
    assert last_backend("score_logits") is Backend.NATIVE
    bound = logit_budget + (stage_budget if dtype != "fp32" else 0) + 16 * 2**10
    print(f"{dtype}: native peak {peak / 2**10:.0f} KiB, bound {bound / 2**10:.0f} KiB")
    assert peak <= bound < M * V * 4


@needs_native
def test_score_logits_full_mode_memory_at_a_real_hidden_size(env):
    """At H = 3584 the chunk GEMMs go to oneDNN, whose per-thread scratch comes from torch's allocator: one 2 MiB
    logit chunk plus that scratch (~256 KiB per thread measured; 512 KiB allowed), against the naive [M, V] twice."""
    M, V, H = 64, 24000, 3584
    hidden, weight, ids = sl_inputs(M, V, H, 6, torch.float32, seed=4)
    peak = peak_allocated_bytes(lambda: score_logits(hidden, weight, ids, mode="full"))
    naive = peak_allocated_bytes(lambda: naive_score_logits(hidden, weight, ids, "full", torch.float32))
    print(f"native peak {peak / 2**20:.2f} MiB, naive {naive / 2**20:.2f} MiB")
    scratch = 512 * 2**10 * torch.get_num_threads()
    assert peak <= sl_mod.LOGIT_CHUNK_BYTES + scratch and naive >= 2 * M * V * 4 > 2 * peak


# ----------------------------------------------------------------------------------------------------------------
# Disable, missing, stale, skipped and failed builds.


@needs_native
def test_disable_native_runs_the_reference(env, recwarn):
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    inputs = nft_inputs((2, 9), torch.float32, with_ref=False)
    run_nft(inputs, {}, (torch.ones(3), torch.ones(2)))
    assert last_backend("nft_loss") is Backend.REFERENCE and last_backend("nft_loss_backward") is Backend.REFERENCE
    hidden, weight, ids = sl_inputs(2, 50, 8, 3, torch.float32)
    score_logits(hidden, weight, ids, mode="full")
    assert last_backend("score_logits") is Backend.REFERENCE
    assert not [w for w in recwarn if "native" in str(w.message)]
    env.delenv("NFTCORE_DISABLE_NATIVE")  # read per call: back on without re-importing
    score_logits(hidden, weight, ids, mode="full")
    assert last_backend("score_logits") is Backend.NATIVE


MISSING_BUILD = """
import json, pathlib, sys, warnings
sys.modules["nftcore._C"] = None  # as if the module had not been built
import torch
import nftcore._native as native
native.BUILD_RECORD = pathlib.Path(sys.argv[1])
from nftcore.ops import last_backend, nft_loss, score_logits
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        out = nft_loss(torch.randn(2, 8, requires_grad=True), torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8),
                       torch.rand(2), torch.rand(2))
        out.loss.backward()
        score_logits(torch.randn(2, 8), torch.randn(50, 8), [1, 2], mode="full")
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print(json.dumps({"warnings": messages, "nft_loss": last_backend("nft_loss").value,
                  "score_logits": last_backend("score_logits").value}))
"""


@pytest.mark.parametrize("record", [
    {"status": "skipped", "reason": "NFTCORE_SKIP_NATIVE=1 at build time"},
    {"status": "failed", "reason": "`cmake --build ...` exited with 1; full log: /x/build.log\nerror: boom"},
    {},
], ids=["skipped", "failed", "no_record"])
def test_missing_build_warns_once_and_runs_the_reference(tmp_path, record):
    path = tmp_path / "_native_build.json"
    if record:
        path.write_text(json.dumps(record))
    environ = {k: v for k, v in os.environ.items() if k not in BACKEND_FLAGS}
    done = subprocess.run([sys.executable, "-c", MISSING_BUILD, str(path)], capture_output=True, text=True,
                          cwd=REPO, env=environ, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["nft_loss"] == "reference" and result["score_logits"] == "reference"
    (message,) = result["warnings"]  # once per process, however many calls
    assert "NFTCORE_DISABLE_NATIVE=1" in message
    expected = {"skipped": "NFTCORE_SKIP_NATIVE=1 at build time", "failed": "the build failed"}.get(
        record.get("status"), "nftcore._C is missing")
    assert expected in message, message


@needs_native
def test_stale_or_foreign_module_is_refused(monkeypatch):
    monkeypatch.setattr(_native, "sources_hash", lambda root=None: "0" * 64)
    st = _native.check()
    assert not st.loaded and "stale" in st.reason
    monkeypatch.setattr(_native, "sources_hash", lambda root=None: None)  # a wheel: no tree to compare with
    assert _native.check().loaded
    monkeypatch.setattr(_native, "_torch_release", lambda version: "0.0.1")  # running another torch than built for
    st = _native.check()
    assert not st.loaded and "built against torch" in st.reason and "0.0.1" in st.reason


def _build_ext(tmp_path, environ):
    """`setup.py build_ext` into a scratch build_lib; returns (process, build record or None, built modules)."""
    lib = tmp_path / "lib"
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp",
                           str(tmp_path / "tmp")], cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
    record = lib / "nftcore" / "_native_build.json"
    return done, (json.loads(record.read_text()) if record.exists() else None), list(lib.glob("nftcore/_C*.so"))


def test_setup_skip_is_recorded_and_does_not_fail(tmp_path):
    done, record, modules = _build_ext(tmp_path, dict(os.environ, NFTCORE_SKIP_NATIVE="1"))
    assert done.returncode == 0, done.stderr
    assert record["status"] == "skipped" and "NFTCORE_SKIP_NATIVE=1" in record["reason"] and not modules
    assert "SKIPPED" in done.stderr


def test_setup_failure_is_recorded_and_does_not_fail(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cmake").write_text("#!/bin/sh\necho 'CMake Error: simulated failure' >&2\nexit 3\n")
    (fake / "cmake").chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k != "NFTCORE_SKIP_NATIVE"}
    environ["PATH"] = f"{fake}{os.pathsep}{environ.get('PATH', '')}"
    environ["NFTCORE_NATIVE_BUILD_DIR"] = str(tmp_path / "cmake-build")  # not the tree's build/native/
    done, record, modules = _build_ext(tmp_path, environ)
    assert done.returncode == 0, done.stderr
    assert record["status"] == "failed" and "exited with 3" in record["reason"] and not modules
    assert "simulated failure" in record["reason"]  # the log's tail is in the record
    assert "FAILED" in done.stderr and "PyTorch references" in done.stderr


# ----------------------------------------------------------------------------------------------------------------
# python -m nftcore.info


def test_info_names_every_op_its_backends_and_the_build():
    done = subprocess.run([sys.executable, "-m", "nftcore.info", "--json"], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env={k: v for k, v in os.environ.items() if k not in BACKEND_FLAGS})
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    ops = {row["op"]: row for row in info["ops"]}
    assert {"attention", "nft_loss", "score_logits"} <= set(ops)
    native = "native" if STATUS.loaded else "reference"
    assert ops["nft_loss"]["cpu"] == native and ops["nft_loss"]["backward_cpu"] == native
    assert ops["score_logits"]["cpu"] == native and ops["score_logits"]["backward_cpu"] == "reference"
    assert ops["attention"]["cpu"] == "reference"
    if "triton" in ops["nft_loss"]["implements"] and info["triton"][0].isdigit():
        assert ops["nft_loss"]["cuda"] == "triton"
    assert info["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["torch"] == torch.__version__ and info["cpu"]
    assert info["native"]["loaded"] is STATUS.loaded
    if STATUS.loaded:
        for key in ("build_compiler", "build_flags", "build_isa", "build_torch_version"):
            assert info["native"][key], key
        assert "-march=native" not in info["native"]["build_flags"]
    else:
        assert info["native"]["reason"]
    text = subprocess.run([sys.executable, "-m", "nftcore.info"], capture_output=True, text=True, cwd=REPO,
                          timeout=120).stdout
    assert "ATen CPU capability" in text and "score_logits" in text and "native CPU kernels" in text
