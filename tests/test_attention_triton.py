"""The Triton backend of `nftcore.ops.attention`, run through the public op under the interpreter
(`NFTCORE_FORCE_TRITON=1`, `TRITON_INTERPRET=1` from conftest), plus the sm_90 ahead-of-time compile of every shipped
kernel configuration.

Sizes: the interpreter costs ~3.5 ms per (program, inner iteration); with the 64×64 interpreter tiles one fwd+bwd
costs about 3·B·H·⌈N_q/64⌉·⌈N_k/64⌉ of those, so every case below stays at or under ~150 of them.
Tolerances follow the flash-attn rule: |triton − fp64| ≤ 2·|torch-in-dtype − fp64| + ε for the
output, 3× for gradients; the helpers (tests/helpers/attention.py) are shared with test_attention_op.py.
"""

from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nftcore.ops import attention
from nftcore.ops.dispatch import FORCE_TRITON, Backend, last_backend, triton_available
from nftcore.ops.reference import naive_attention
from tests.helpers.attention import assert_flash_tolerance, make_inputs, run_with_grads

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton does not import here")

KERNEL_MODULE = "nftcore.kernels.attention"
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def force_triton(monkeypatch):
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 set before the kernels are imported (conftest)")
    monkeypatch.setenv(FORCE_TRITON, "1")
    monkeypatch.delenv("NFTCORE_DISABLE_TRITON", raising=False)


def _to(device, tensors, rope, mask):
    tensors = [t.to(device) for t in tensors]
    rope = None if rope is None else tuple(t.to(device) for t in rope)
    return tensors, rope, None if mask is None else mask.to(device)


def check_against_references(b, n_q, n_k, h, d, dtype, rope_kind, mask_kind, deterministic=False, seed=0):
    (q, k, v, go), rope, mask = make_inputs(b, n_q, n_k, h, d, dtype, rope_kind, mask_kind, seed=seed)
    ref = run_with_grads(naive_attention, q.double(), k.double(), v.double(), go, mask=mask, rope=rope)
    lowp = run_with_grads(naive_attention, q, k, v, go, mask=mask, rope=rope)
    (q, k, v, go), rope, mask = _to(DEVICE, (q, k, v, go), rope, mask)
    got = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope, deterministic=deterministic)
    assert last_backend("attention") == Backend.TRITON
    got = [x.cpu() for x in got]
    assert all(x.dtype == dtype and torch.isfinite(x).all() for x in got)
    assert_flash_tolerance(got, lowp, ref, dtype)
    return got


# (B, N_q, N_k, H, D, rope, mask): head dims 64/128 and a padded 48, odd lengths, N_q ≠ N_k, B·H > 1.
CASES = [
    (1, 97, 97, 2, 64, None, None),
    (2, 97, 97, 1, 128, "nd", "partial"),
    (2, 70, 70, 1, 48, "bnd", "dead_row"),
    (2, 300, 45, 1, 64, None, "dead_row"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(str(s) for s in c[:5]) + f"-{c[5]}-{c[6]}")
def test_matches_references(case, dtype, force_triton):
    check_against_references(*case[:5], dtype, *case[5:])


def test_long_odd_sequence_with_rope_and_mask(force_triton):
    """257 tokens: four full 64-tiles and a 1-token tail in both loops, RoPE and a partial mask together."""
    check_against_references(1, 257, 257, 2, 64, torch.bfloat16, "nd", "partial", seed=1)


def test_small_head_dim_padded_to_32(force_triton):
    """D = 16 pads to 32 (RoPE halves must be >= 16 wide for tl.dot's K on the GPU)."""
    check_against_references(1, 33, 33, 2, 16, torch.float16, "nd", None, seed=2)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_flag_repeats_bitwise(deterministic, force_triton):
    """Both settings take the atomic-free backward; on CPU this checks the plumbing, on GPU the repeat test below
    checks the race freedom."""
    inputs = make_inputs(2, 65, 65, 1, 64, torch.bfloat16, "nd", "partial", seed=4)
    a = check_against_references(2, 65, 65, 1, 64, torch.bfloat16, "nd", "partial", deterministic, seed=4)
    (q, k, v, go), rope, mask = _to(DEVICE, *inputs)
    b = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope, deterministic=deterministic)
    assert all(torch.equal(x, y.cpu()) for x, y in zip(a, b))


def test_fully_masked_row_zeros_and_infinite_lse(force_triton):
    """A batch row with no attended key: zero output and gradients (no NaN), and lse = +inf for its rows, which is
    what makes every recomputed probability exp(s − lse) vanish in the backward."""
    kern = importlib.import_module(KERNEL_MODULE)
    dtype = torch.float32 if not ON_GPU else torch.bfloat16  # fp32 on CUDA goes to the reference, not the kernel
    (q, k, v, go), rope, mask = _to(DEVICE, *make_inputs(2, 40, 40, 1, 32, dtype, "nd", "dead_row"))
    out, dq, dk, dv = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope)
    for x in (out, dq, dk, dv):
        assert torch.isfinite(x).all() and x[1].abs().max() == 0
    _, lse = kern.attention_forward(q, k, v, mask, *rope, 32**-0.5)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all() and torch.isfinite(lse[0]).all()


def test_strided_inputs_from_fused_qkv(force_triton):
    """q, k, v as views of one [B, N, 3, H, D] projection: read through their strides, no copies."""
    qkv = torch.randn(2, 50, 3, 2, 32, device=DEVICE)
    q, k, v = qkv.unbind(2)
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v), rtol=1e-5, atol=1e-5)
    assert last_backend("attention") == Backend.TRITON


def test_fp64_falls_back_to_reference(force_triton):
    (q, k, v, go), rope, mask = _to(DEVICE, *make_inputs(1, 20, 20, 2, 16, torch.float64, "nd", "partial"))
    got = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope)
    assert last_backend("attention") == Backend.REFERENCE  # what ran, not what was dispatched to
    ref = run_with_grads(naive_attention, q, k, v, go, mask=mask, rope=rope)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-10)


def test_launcher_rejects_bad_layouts():
    kern = importlib.import_module(KERNEL_MODULE)
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(ValueError, match="unit stride on D"):
        kern.attention_forward(q.transpose(-1, -2).contiguous().transpose(-1, -2), q, q, None, None, None, 0.2)
    with pytest.raises(ValueError, match="dtype must be"):
        kern.attention_forward(q.double(), q.double(), q.double(), None, None, None, 0.2)
    with pytest.raises(ValueError, match="head dim 200"):
        big = torch.randn(1, 8, 1, 200)
        kern.attention_forward(big, big, big, None, None, None, 0.2)


def test_config_selection():
    kern = importlib.import_module(KERNEL_MODULE)
    assert kern.select_config("fwd", 128, torch.bfloat16, interpret=True) == kern._INTERPRETER_CONFIG
    assert kern.select_config("fwd", 128, torch.bfloat16, interpret=False) == (128, 64, 8, 3)
    assert kern.padded_head_dim(16) == 32 and kern.padded_head_dim(48) == 64 and kern.padded_head_dim(128) == 128
    shipped = list(kern.shipped_configs())
    assert {(kn, bd) for kn, bd, _, _ in shipped} == {(kn, bd) for kn in ("fwd", "dkdv", "dq") for bd in (32, 64, 128)}


# ----------------------------------------------------------------------------------------------------------------
# sm_90 ahead-of-time compile of every shipped configuration (no GPU needed; see tests/helpers/aot.py).

_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_STRIDES = {
    "fwd": "sqb sqn sqh skb skn skh svb svn svh sob son soh",
    "dkdv": "sqb sqn sqh skb skn skh svb svn svh sdb sdn sdh sdkb sdkn sdkh sdvb sdvn sdvh",
    "dq": "sqb sqn sqh skb skn skh svb svn svh sdb sdn sdh sdqb sdqn sdqh",
}
_KERNEL_NAMES = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}


def _aot_specs():
    from tests.helpers.aot import AOTSpec

    kern = importlib.import_module(KERNEL_MODULE)
    specs = []
    # Every shipped config in its heaviest variant (mask and RoPE on, D a power of two), plus, for the FLUX/Qwen
    # config (bf16), the plain variant (no mask, no RoPE) and a padded head dim (48 in a 64-wide tile).
    variants = [(kn, bd, dt, cfg, bd, True) for kn, bd, dt, cfg in kern.shipped_configs()]
    variants += [(kn, 128, torch.bfloat16, kern.select_config(kn, 128, torch.bfloat16, interpret=False), 128, False)
                 for kn in _KERNEL_NAMES]
    variants += [(kn, 64, torch.bfloat16, kern.select_config(kn, 48, torch.bfloat16, interpret=False), 48, True)
                 for kn in _KERNEL_NAMES]
    for kernel, bd, dtype, (bm, bn, warps, stages), head_dim, heavy in variants:
        t = _TYPES[dtype]
        ptrs = {"fwd": dict(Q=t, K=t, V=t, Out=t, Lse="*fp32"),
                "dkdv": dict(Q=t, K=t, V=t, DO=t, Lse="*fp32", Delta="*fp32", DK=t, DV=t),
                "dq": dict(Q=t, K=t, V=t, DO=t, Lse="*fp32", Delta="*fp32", DQ=t)}[kernel]
        # Only the forward reads the RoPE tables (it rotates q); the backward gets q, k rotated by the RoPE pass.
        ptrs |= dict(Mask="*u8", Cos="*fp32", Sin="*fp32") if kernel == "fwd" else dict(Mask="*u8")
        strides = _STRIDES[kernel].split()
        scalars = {"qk_scale": "fp32"} if kernel == "fwd" else {"sm_scale": "fp32", "qk_scale": "fp32"}
        extra = ["smb", "scb", "scn"] if kernel == "fwd" else ["smb"]
        sig = {**ptrs, **{s: "i32" for s in strides + extra + ["H", "N_Q", "N_K"]}, **scalars}
        # Pointers and row strides as a launch on [B, N, H, D] tensors specialises them (multiples of 16); the
        # lengths and the rope/mask strides not.
        const = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, HAS_MASK=heavy, UPCAST=False,
                     DOT_PREC=kern._dot_precision(dtype), **(dict(ROPE=heavy) if kernel == "fwd" else {}))
        specs.append(AOTSpec(KERNEL_MODULE, _KERNEL_NAMES[kernel], sig, const, num_warps=warps, num_stages=stages,
                             divisible_by_16=tuple(ptrs) + tuple(strides),
                             label=f"{kernel} D={head_dim}/{bd} {str(dtype)[6:]} {bm}x{bn} w{warps} s{stages}"
                                   f"{' rope+mask' if heavy else ' plain'}"))
    for bd in (32, 64, 128):  # the two bandwidth passes, launched with the default num_warps=4, num_stages=3
        for dtype in kern.GPU_DTYPES:
            t = _TYPES[dtype]
            const = dict(HEAD_DIM=bd, BLOCK_D=bd, BLOCK_M=kern._PREPROCESS_BLOCK_M)
            specs.append(AOTSpec(KERNEL_MODULE, "_attn_bwd_preprocess_kernel",
                                 {"Out": t, "DO": t, "Delta": "*fp32", **{s: "i32" for s in
                                  "sob son soh sdb sdn sdh H N_Q".split()}}, const,
                                 label=f"preprocess D={bd} {str(dtype)[6:]}"))
            specs.append(AOTSpec(KERNEL_MODULE, "_rope_kernel",
                                 {"X": t, "Y": t, "Cos": "*fp32", "Sin": "*fp32", **{s: "i32" for s in
                                  "sxb sxn sxh syb syn syh scb scn H N".split()}},
                                 {**const, "INVERSE": False, "UPCAST": False},
                                 label=f"rope D={bd} {str(dtype)[6:]}"))
    return specs


@pytest.fixture(scope="module")
def aot_results():
    from tests.helpers.aot import compile_many

    specs = _aot_specs()
    # Two children in parallel (the CPU box has 2 cores; each compile is single-threaded).
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(lambda part: compile_many(part), (specs[0::2], specs[1::2])))
    results = [None] * len(specs)
    results[0::2], results[1::2] = halves
    for res in results:
        print(res.summary())
    return results


@pytest.mark.slow
def test_every_shipped_config_compiles_for_sm90(aot_results):
    from tests.helpers.aot import H100_SHARED_LIMIT

    for res in aot_results:
        assert res.ok, f"{res.label}: {res.error}"
        assert res.shared_bytes <= H100_SHARED_LIMIT, res.summary()
        assert not res.has_atomics, f"{res.label}: the backward must stay atomic-free (deterministic)"
        # Register spills show as stack bytes (when cuobjdump is available): a config that spills is a bad pick.
        assert not res.stack_bytes, res.summary()
        if res.label.split()[0] in ("fwd", "dkdv", "dq"):
            assert res.uses_wgmma, f"{res.label}: fp16/bf16 dots should lower to Hopper wgmma"


# ----------------------------------------------------------------------------------------------------------------
# GPU only: race freedom of the backward.


@pytest.mark.gpu
def test_gpu_repeat_is_bitwise_identical():
    """flash-attn style: repeat fwd+bwd and require bitwise-equal out, dq, dk, dv (no atomics anywhere)."""
    n = 2 * 1024 + 237  # an MMDiT-like length: two image token grids plus a text tail
    (q, k, v, go), rope, mask = _to("cuda", *make_inputs(2, n, n, 4, 128, torch.bfloat16, "nd", "partial"))
    first = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope, deterministic=True)
    for _ in range(5):
        again = run_with_grads(attention, q, k, v, go, key_padding_mask=mask, rope=rope, deterministic=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
