"""The sm_90 ahead-of-time compile helper (tests/helpers/aot.py) on small sample kernels.

Why these checks: they pin what the helper must tell apart before it is trusted on product kernels: a config that
compiles vs one the GPU compiler rejects (K=8 dot, which the interpreter happily runs), wgmma vs no MMA, atomics vs
none, and shared memory under vs over the H100 limit. All configs compile in one subprocess (module fixture).
"""

import pytest
import torch

from tests.helpers.aot import H100_SHARED_LIMIT, AOTResult, AOTSpec, compile_many, compile_sm90

MOD = "tests.helpers.aot_sample_kernels"
ADD_SIG = {"X": "*fp32", "Y": "*fp32", "Out": "*fp32", "n": "i32"}
MM_SIG = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "M": "i32", "N": "i32", "K": "i32",
          "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"}

SPECS = {
    "add": AOTSpec(MOD, "add_kernel", ADD_SIG, {"BLOCK": 1024}),
    "dot64": AOTSpec(MOD, "matmul_kernel", MM_SIG, {"BM": 64, "BN": 64, "BK": 64}, num_warps=4, num_stages=3),
    "dot_k8": AOTSpec(MOD, "matmul_kernel", MM_SIG, {"BM": 64, "BN": 64, "BK": 8}),
    # 4 stages x (128x128 + 128x128) fp16 tiles = 256 KiB of shared memory: compiles, but cannot launch on H100.
    "dot_too_big": AOTSpec(MOD, "matmul_kernel", MM_SIG, {"BM": 128, "BN": 128, "BK": 128}, num_warps=8, num_stages=4),
    "atomic": AOTSpec(MOD, "atomic_sum_kernel", {"X": "*fp32", "Out": "*fp32", "n": "i32"}, {"BLOCK": 1024}),
    "no_module": AOTSpec("tests.no_such_kernel_module", "k", {}),
    "untyped_arg": AOTSpec(MOD, "add_kernel", {"X": "*fp32"}, {"BLOCK": 1024}),
}


@pytest.fixture(scope="module")
def results() -> dict[str, AOTResult]:
    out = dict(zip(SPECS, compile_many(list(SPECS.values()))))
    for name, res in out.items():
        print(name, "->", res.summary())
    return out


def test_vector_add_compiles_without_mma_or_atomics(results):
    res = results["add"]
    assert res.ok, res.error
    assert res.fits_shared and res.shared_bytes <= H100_SHARED_LIMIT
    assert res.uses_wgmma is False and res.has_atomics is False
    assert res.num_warps == 4 and res.ptx_lines > 0


def test_fp16_dot_64x64x64_uses_wgmma_on_sm90(results):
    res = results["dot64"]
    assert res.ok, res.error
    assert res.uses_wgmma, "a 64x64x64 fp16 tl.dot with 4 warps should lower to Hopper wgmma"
    # Software-pipelined (pointers and strides specialized as multiples of 16), so at least two stages of the A and
    # B tiles live in shared memory; triton 3.7.1 gives exactly 3 x (64x64 + 64x64) x 2 B = 49152. A range, not the
    # exact number, so triton 3.6 / 3.9 may place barriers or epilogue buffers differently.
    tile = (64 * 64 + 64 * 64) * 2
    assert 2 * tile <= res.shared_bytes <= 3 * tile + 4096
    assert res.fits_shared and res.has_atomics is False


def test_dot_with_k8_is_rejected_and_the_error_is_captured(results):
    res = results["dot_k8"]
    assert not res.ok and not res.fits_shared
    assert "CompilationError" in res.error and "K >= 16" in res.error
    assert res.shared_bytes is None


def test_shared_memory_over_the_h100_limit_is_reported(results):
    res = results["dot_too_big"]
    assert res.ok, res.error  # Triton only checks shared memory when loading onto a device
    assert res.shared_bytes > H100_SHARED_LIMIT and not res.fits_shared


def test_atomic_add_is_detected(results):
    res = results["atomic"]
    assert res.ok, res.error
    assert res.has_atomics is True and res.uses_wgmma is False


def test_bad_specs_fail_per_config_not_per_batch(results):
    assert not results["no_module"].ok and "ModuleNotFoundError" in results["no_module"].error
    assert not results["untyped_arg"].ok and "'Y'" in results["untyped_arg"].error
    assert results["add"].ok  # the same batch still compiled the good ones


def test_compile_sm90_single_config():
    res = compile_sm90(MOD, "add_kernel", {**ADD_SIG, "X": "*bf16", "Y": "*bf16", "Out": "*bf16"}, {"BLOCK": 512},
                       num_warps=2, num_stages=1)
    assert res.ok, res.error
    assert res.num_warps == 2 and res.uses_wgmma is False and res.compile_s is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter, which only runs without a GPU here")
def test_interpreter_accepts_the_k8_dot_that_sm90_rejects():
    """The reason the AOT step exists: the CPU interpreter runs BK=8 and even gets the right answer."""
    from tests.helpers.aot_sample_kernels import matmul_kernel

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=g).half()
    b = torch.randn(16, 64, generator=g).half()
    c = torch.empty(64, 64, dtype=torch.float16)
    matmul_kernel[(1, 1)](a, b, c, 64, 64, 16, a.stride(0), b.stride(0), c.stride(0), BM=64, BN=64, BK=8)
    torch.testing.assert_close(c.float(), a.float() @ b.float(), atol=2e-2, rtol=1e-2)
