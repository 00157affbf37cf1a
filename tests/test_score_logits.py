"""`nftcore.ops.score_logits`: both modes, both backends (the chunked PyTorch fallback and the Triton kernels - on
CUDA when there is a GPU, else forced onto CPU under the interpreter) against a naive fp64 log_softmax over the full
[M, V] logits; the hidden-state gradient; that the fallback never holds [M, V]; bad inputs; the custom-op
registration; an sm_90 AOT compile of every shipped GPU config; and (`gpu` marker) the Qwen2.5-VL-7B head on a GPU.

Tolerance: max|ours - fp64| <= 2 x max|PyTorch in the same dtype - fp64| + EPS, where
"PyTorch in the same dtype" is what a caller would write without this op: `log_softmax(hidden @ weight.T)` in the
inputs' dtype. Both see the same (rounded) inputs; ours accumulates in fp32, PyTorch rounds the logits to the dtype.
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from nftcore.ops import last_backend, score_logits
from nftcore.ops.dispatch import Backend, native_available
from nftcore.ops.reference import naive_score_logits
from nftcore.testing.memory import peak_allocated_bytes
from nftcore.testing.tiny_judge import QWEN_DIGIT_IDS

sl_mod = importlib.import_module("nftcore.ops.score_logits")  # the module (the package attribute is the function)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Added to 2x PyTorch's own error so a near-exact PyTorch result cannot make the bound vanish: a few fp32 ulps at the
# |log p| ~ 10-20 of a 19k vocabulary (the op's output is fp32 whatever the input dtype).
EPS = 2e-5
# Where the Triton tests run: the GPU when there is one, else CPU tensors through the interpreter (conftest sets
# TRITON_INTERPRET=1 on machines without CUDA; NFTCORE_FORCE_TRITON=1 then sends CPU tensors to the kernels).
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QWEN_VOCAB = 151936  # Qwen2.5-VL-3B's head rows


def use_backend(env, backend: str) -> torch.device:
    """Select `backend` ("fallback" or "triton") through the environment; return the device its tensors go on. The
    fallback is the PyTorch reference: the native CPU kernels are switched off too (tests/test_native_ops.py)."""
    if backend == "fallback":
        env.setenv("NFTCORE_DISABLE_TRITON", "1")
        env.setenv("NFTCORE_DISABLE_NATIVE", "1")
        return torch.device("cpu")
    if TRITON_DEVICE.type == "cpu":
        env.setenv("NFTCORE_FORCE_TRITON", "1")
    return TRITON_DEVICE


# ----------------------------------------------------------------------------------------------------------------
# Oracle and inputs.


def make_inputs(M, V, H, K, dtype, seed=0, device="cpu"):
    """Logits with std ~3 (a confident LM head) and K distinct random ids, generated on CPU (same values anywhere)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=g).to(dtype)
    weight = (3.0 * torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    ids = torch.randperm(V, generator=g)[:K]
    return hidden.to(device), weight.to(device), ids.to(device)


def check_against_oracle(out, hidden, weight, ids, mode, label):
    """Assert the tolerance rule; return (our error, PyTorch's own error) for the log."""
    ref = naive_score_logits(hidden, weight, ids, mode)
    err = (out.double() - ref).abs().max().item()
    torch_err = (naive_score_logits(hidden, weight, ids, mode, dtype=hidden.dtype).double() - ref).abs().max().item()
    print(f"{label}: max err {err:.2e} (PyTorch {hidden.dtype} {torch_err:.2e})")
    assert out.dtype == torch.float32 and out.shape == (hidden.shape[0], len(ids))
    assert err <= 2 * torch_err + EPS, f"{label}: {err:.3e} > 2 x {torch_err:.3e} + {EPS}"
    return err, torch_err


# ----------------------------------------------------------------------------------------------------------------
# Forward against the oracle.

# (M, V, H, K): odd everything; V = 18992 spans several 1024-row interpreter tiles and several fallback chunks.
SHAPES = [(1, 18992, 72, 6), (3, 1001, 200, 11), (17, 18992, 200, 1), (17, 1001, 72, 16)]


@pytest.mark.parametrize("mode", ["subset", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_V{}_H{}_K{}".format(*s))
def test_fallback_matches_oracle(env, shape, dtype, mode):
    hidden, weight, ids = make_inputs(*shape, DTYPES[dtype], device=use_backend(env, "fallback"))
    out = score_logits(hidden, weight, ids, mode=mode)
    assert last_backend("score_logits") is Backend.REFERENCE
    check_against_oracle(out, hidden, weight, ids, mode, f"fallback {mode} {dtype} {shape}")


# Forced-Triton cases. The interpreter costs ~1 s per 19 full-mode tiles, so the V = 18992 rows are spread over the
# dtypes rather than crossed with them; subset mode runs the finalize kernel only and is crossed with everything.
TRITON_FULL = [
    ((1, 18992, 72, 6), "fp32"), ((17, 18992, 200, 1), "bf16"), ((3, 18992, 72, 11), "fp16"),
    ((3, 1001, 200, 11), "fp32"), ((3, 1001, 200, 11), "fp16"), ((3, 1001, 200, 11), "bf16"),
    ((17, 1001, 72, 16), "bf16"),
]


@pytest.mark.parametrize("shape,dtype", TRITON_FULL,
                         ids=lambda x: x if isinstance(x, str) else "M{}_V{}_H{}_K{}".format(*x))
def test_triton_full_matches_oracle(env, shape, dtype):
    hidden, weight, ids = make_inputs(*shape, DTYPES[dtype], device=use_backend(env, "triton"))
    out = score_logits(hidden, weight, ids, mode="full")
    assert last_backend("score_logits") is Backend.TRITON
    check_against_oracle(out, hidden, weight, ids, "full", f"triton full {dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}_V{}_H{}_K{}".format(*s))
def test_triton_subset_matches_oracle(env, shape, dtype):
    hidden, weight, ids = make_inputs(*shape, DTYPES[dtype], device=use_backend(env, "triton"))
    out = score_logits(hidden, weight, ids, mode="subset")
    assert last_backend("score_logits") is Backend.TRITON
    check_against_oracle(out, hidden, weight, ids, "subset", f"triton subset {dtype} {shape}")


def test_triton_small_tiles_cover_every_loop_and_mask(env):
    """GPU-sized tiles under the interpreter: 2 M-blocks (M = 17 > BLOCK_M = 16), a ragged last V tile (1001 = 7 x
    128 + 105), 8 tiles over 3 splits (3 + 3 + 2) combined 2 at a time (2 + 1), and a ragged H loop (72 = 32 + 32 + 8)
    - the paths the big interpreter tiles skip. Mixed dtypes too (fp32 hidden, bf16 head: the kernel upcasts both),
    and a strided hidden (row stride 2H, as a `last_hidden_state[:, -1]` view has)."""
    kern = importlib.import_module("nftcore.kernels.score_logits")
    hidden, weight, ids = make_inputs(17, 1001, 72, 6, torch.bfloat16, device=TRITON_DEVICE)
    hidden = torch.cat([hidden.float(), torch.full_like(hidden, float("nan"), dtype=torch.float32)], dim=1)[:, :72]
    assert hidden.stride() == (144, 1)
    config = kern.Config(BLOCK_M=16, BLOCK_V=128, BLOCK_H=32, num_warps=4, num_stages=1)
    env.setattr(kern, "FINALIZE_BLOCK_S", 2)
    for mode in ("full", "subset"):
        out, lse = kern.score_logits_forward(hidden, weight, ids, mode == "full", config=config, splits=3)
        ref = naive_score_logits(hidden, weight, ids, mode)
        err = (out.double() - ref).abs().max().item()
        print(f"triton small tiles {mode}: max err {err:.2e}")
        assert err <= EPS
    z = hidden.double() @ weight.double().T
    assert (lse.double() - torch.logsumexp(z[:, ids], dim=1)).abs().max() <= EPS  # subset: lse over the K ids


@pytest.mark.parametrize("mode", ["subset", "full"])
def test_real_qwen_digit_ids_at_full_vocab(env, mode):
    """The reward's real case: ids 15..20 of a 151936-row head, hidden taken as `last_hidden_state[:, -1]` (a strided
    view). Fallback only: the interpreter would need 149 tiles per row block."""
    use_backend(env, "fallback")
    g = torch.Generator().manual_seed(1)
    last_hidden_state = torch.randn(2, 5, 64, generator=g)  # [B, T, H]
    hidden = last_hidden_state[:, -1]  # [B, H], row stride T * H
    weight = 3.0 * torch.randn(QWEN_VOCAB, 64, generator=g) / 8.0
    out = score_logits(hidden, weight, QWEN_DIGIT_IDS, mode=mode)
    check_against_oracle(out, hidden, weight, QWEN_DIGIT_IDS, mode, f"qwen digits {mode}")
    if mode == "subset":  # the reward: expected digit / 5, in [0, 1]
        score = (out.exp() * torch.arange(6.0)).sum(-1) / 5
        assert ((score >= 0) & (score <= 1)).all()


@pytest.mark.parametrize("backend", ["fallback", "triton"])
def test_empty_batch(env, backend):
    hidden, weight, ids = make_inputs(0, 300, 40, 3, torch.float32, device=use_backend(env, backend))
    for mode in ("full", "subset"):
        assert score_logits(hidden, weight, ids, mode=mode).shape == (0, 3)


# ----------------------------------------------------------------------------------------------------------------
# Gradient.


@pytest.mark.parametrize("mode", ["subset", "full"])
@pytest.mark.parametrize("backend", ["fallback", "triton_fwd"])
def test_hidden_gradient_matches_autograd(env, mode, backend):
    device = use_backend(env, "triton" if backend == "triton_fwd" else "fallback")
    hidden, weight, ids = make_inputs(3, 1001, 72, 6, torch.float32, device=device)
    grad_out = torch.randn(3, 6, generator=torch.Generator().manual_seed(2)).to(device)
    h = hidden.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score_logits(h, weight, ids, mode=mode), h, grad_out)
    h64 = hidden.double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(naive_score_logits(h64, weight, ids, mode), h64, grad_out.double())
    err = (g.double() - g_ref).abs().max().item()
    print(f"grad {mode} {backend}: max err {err:.2e}")
    assert g.dtype == hidden.dtype and err <= 1e-5


def test_weight_gradient_is_refused(env):
    hidden, weight, ids = make_inputs(2, 300, 40, 6, torch.float32)
    out = score_logits(hidden, weight.requires_grad_(True), ids)
    with pytest.raises(RuntimeError, match="no gradient for `weight`"):
        out.sum().backward()


# ----------------------------------------------------------------------------------------------------------------
# Memory: the fallback holds chunks, never [M, V].


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fallback_never_allocates_m_by_v(env, dtype):
    use_backend(env, "fallback")
    M, V, H = 64, 18992, 72
    hidden, weight, ids = make_inputs(M, V, H, 6, DTYPES[dtype])
    m_by_v = M * V * 4  # the fp32 logits the naive path holds (twice: logits and log_softmax)
    logit_budget, stage_budget = 64 * 2**10, 256 * 2**10  # [64, 256] fp32 logit chunks; [910, 72] fp32 staging rows
    env.setattr(sl_mod, "LOGIT_CHUNK_BYTES", logit_budget)
    env.setattr(sl_mod, "STAGE_CHUNK_BYTES", stage_budget)
    peak = peak_allocated_bytes(lambda: score_logits(hidden, weight, ids, mode="full"))
    naive = peak_allocated_bytes(lambda: naive_score_logits(hidden, weight, ids, "full", torch.float32))
    print(f"{dtype}: fallback peak {peak / 2**10:.0f} KiB, naive {naive / 2**10:.0f} KiB, [M, V] fp32 "
          f"{m_by_v / 2**10:.0f} KiB")
    assert naive >= m_by_v  # the measurement sees an [M, V] buffer when there is one ...
    # ... and the fallback's live set is one logit chunk, the staging buffer (16-bit heads only) and small [M, K] /
    # [K, H] / [M] tensors (16 KiB of slack).
    bound = logit_budget + (stage_budget if dtype != "fp32" else 0) + 16 * 2**10
    assert peak <= bound < m_by_v
    # The same measurement fails when the chunk covers the vocabulary: the check can tell.
    env.setattr(sl_mod, "LOGIT_CHUNK_BYTES", 2**40)
    env.setattr(sl_mod, "STAGE_CHUNK_BYTES", 2**40)
    env.setattr(sl_mod, "MAX_CHUNK_ROWS", V)
    assert peak_allocated_bytes(lambda: score_logits(hidden, weight, ids, mode="full")) >= m_by_v


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs, dispatch, registration.

BAD_INPUTS = [
    (dict(hidden=torch.zeros(2, 3, 8)), "`hidden` must be 2-D"),
    (dict(weight=torch.zeros(50)), "`weight` must be 2-D"),
    (dict(hidden=torch.zeros(2, 9)), "hidden sizes H differ"),
    (dict(hidden=torch.zeros(2, 8, dtype=torch.int64)), "`hidden` must be float16/bfloat16/float32"),
    (dict(weight=torch.zeros(50, 8, dtype=torch.float64)), "`weight` must be float16/bfloat16/float32"),
    (dict(weight=torch.zeros(8, 50).T), "`weight` must have unit stride"),
    (dict(token_ids=[1, 50]), r"out of range: \[50\]"),
    (dict(token_ids=torch.tensor([-1, 3])), r"out of range: \[-1\]"),
    (dict(token_ids=[4, 7, 4]), r"repeated: \[4\]"),
    (dict(token_ids=torch.tensor([1.0, 2.0])), "`token_ids` must be an integer tensor"),
    (dict(token_ids=[1, 2.5]), "`token_ids` must be integers"),
    (dict(token_ids=torch.tensor([True, False])), "`token_ids` must be an integer tensor"),
    (dict(token_ids=torch.tensor([[1, 2]])), "`token_ids` must be 1-D"),
    (dict(token_ids=[]), "`token_ids` must hold between 1 and 256"),
    (dict(token_ids=list(range(257))), "`token_ids` must hold between 1 and 256"),
    (dict(token_ids="01"), "`token_ids` must be a 1-D integer tensor or a sequence"),
    (dict(mode="vocab"), "`mode` must be one of"),
]


@pytest.mark.parametrize("flag", ["NFTCORE_DISABLE_TRITON", "NFTCORE_FORCE_TRITON"], ids=["fallback", "triton"])
@pytest.mark.parametrize("change,match", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_raise_value_error_naming_the_argument(env, flag, change, match):
    """Every check runs before dispatch, so both backends refuse the same inputs with the same message."""
    env.setenv(flag, "1")
    kw = dict(hidden=torch.zeros(2, 8), weight=torch.zeros(50, 8), token_ids=[1, 2, 3], mode="subset") | change
    with pytest.raises(ValueError, match=match):
        score_logits(kw.pop("hidden"), kw.pop("weight"), kw.pop("token_ids"), **kw)


def test_launcher_checks_its_inputs():
    kern = importlib.import_module("nftcore.kernels.score_logits")
    h, w = torch.zeros(2, 8), torch.zeros(50, 8)
    with pytest.raises(ValueError, match="distinct ids in"):
        kern.score_logits_forward(h, w, torch.tensor([3, 3]), True)
    with pytest.raises(ValueError, match="int32/int64"):
        kern.score_logits_forward(h, w, torch.tensor([1, 2], dtype=torch.int16), True)
    with pytest.raises(ValueError, match=r"\[V, H\]"):
        kern.score_logits_forward(h, torch.zeros(50, 9), torch.tensor([1]), True)
    with pytest.raises(ValueError, match="unit stride"):
        kern.score_logits_forward(torch.zeros(8, 2).T, w, torch.tensor([1]), True)
    assert kern.MAX_K == sl_mod.MAX_K  # the op's limit is the kernel's


def test_dispatch_follows_the_environment(env):
    hidden, weight, ids = make_inputs(2, 300, 40, 3, torch.float32, device=use_backend(env, "triton"))
    score_logits(hidden, weight, ids)
    assert last_backend("score_logits") is Backend.TRITON  # CUDA by default, CPU when forced
    env.delenv("NFTCORE_FORCE_TRITON", raising=False)
    env.setenv("NFTCORE_DISABLE_TRITON", "1")
    score_logits(hidden, weight, ids)
    native = hidden.device.type == "cpu" and native_available()
    assert last_backend("score_logits") is (Backend.NATIVE if native else Backend.REFERENCE)
    env.delenv("NFTCORE_DISABLE_TRITON")
    score_logits(hidden.cpu(), weight.cpu(), ids.cpu())
    # CPU tensors default to the native kernels where they are built, else to the fallback
    assert last_backend("score_logits") is (Backend.NATIVE if native_available() else Backend.REFERENCE)
    env.setenv("NFTCORE_DISABLE_NATIVE", "1")
    score_logits(hidden.cpu(), weight.cpu(), ids.cpu())
    assert last_backend("score_logits") is Backend.REFERENCE


@pytest.mark.parametrize("backend", ["fallback", "triton"])
def test_opcheck(env, backend):
    """Schema, fake tensor, autograd registration and AOT dispatch of both custom ops. The fake implementation is
    shared, so the Triton backend is checked in one mode (opcheck runs the op ~10 times; each costs ~1 s here)."""
    hidden, weight, ids = make_inputs(5, 300, 40, 6, torch.float32, device=use_backend(env, backend))
    for full in (True, False) if backend == "fallback" else (True,):
        torch.library.opcheck(sl_mod._score_logits_op, (hidden.clone().requires_grad_(True), weight, ids, full))
    if backend == "fallback":
        out, lse = sl_mod._score_logits_op(hidden, weight, ids, True)
        torch.library.opcheck(sl_mod._score_logits_backward_op,
                              (torch.randn_like(out), torch.randn_like(lse), hidden, weight, ids, lse, True))


def test_torch_compile_fullgraph(env):
    hidden, weight, ids = make_inputs(3, 300, 40, 6, torch.float32)
    compiled = torch.compile(lambda h: score_logits(h, weight, ids, mode="full"), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(hidden), score_logits(hidden, weight, ids, mode="full"))


@functools.cache
def _gpu_qwen7b_head(dtype: str) -> torch.Tensor:
    """The Qwen2.5-VL-7B head shape [152064, 3584], generated on the GPU once per dtype (545M values: slow on CPU)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return (3.0 * torch.randn(152064, 3584, generator=g, device="cuda") / 3584**0.5).to(DTYPES[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 64, 288])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gpu_qwen7b_head(env, M, dtype):
    """The shipped GPU configs at the real size: Qwen2.5-VL-7B head (H = 3584, V = 152064), the digit ids, M over the
    reward's range (one config bucket each), both modes, against fp64 with the same tolerance rule."""
    weight = _gpu_qwen7b_head(dtype)
    hidden = torch.randn(M, 3584, generator=torch.Generator(device="cuda").manual_seed(M), device="cuda")
    hidden = hidden.to(DTYPES[dtype])
    for mode in ("full", "subset"):
        out = score_logits(hidden, weight, QWEN_DIGIT_IDS, mode=mode)
        assert last_backend("score_logits") is Backend.TRITON
        check_against_oracle(out, hidden, weight, QWEN_DIGIT_IDS, mode, f"gpu qwen7b {mode} {dtype} M={M}")


# ----------------------------------------------------------------------------------------------------------------
# sm_90 AOT compile of every shipped GPU config.


def _aot_specs():
    """Every distinct shipped partial-kernel config, the finalize kernel in both modes per dtype class, the mixed-dtype
    partial kernel and the largest K tile. Signatures as a launch on torch tensors specialises them."""
    from tests.helpers.aot import AOTSpec

    kern = importlib.import_module("nftcore.kernels.score_logits")
    mod = "nftcore.kernels.score_logits"

    def partial(label, c, hidden_dt, weight_dt, upcast, prec):
        sig = {"Hidden": f"*{hidden_dt}", "Weight": f"*{weight_dt}", "PartMax": "*fp32", "PartSum": "*fp32",
               "M": "i32", "V": "i32", "H": "i32", "stride_hm": "i32", "stride_wv": "i32", "stride_pm": "i32",
               "tiles_per_split": "i32"}
        consts = dict(BLOCK_M=c.BLOCK_M, BLOCK_V=c.BLOCK_V, BLOCK_H=c.BLOCK_H, UPCAST=upcast, DOT_PRECISION=prec)
        return AOTSpec(mod, "_lse_partial_kernel", sig, consts, num_warps=c.num_warps, num_stages=c.num_stages,
                       label=label)

    def finalize(label, dt, full, block_k, prec):
        sig = {"Hidden": f"*{dt}", "Weight": f"*{dt}", "Ids": "*i64", "PartMax": "*fp32", "PartSum": "*fp32",
               "Out": "*fp32", "Lse": "*fp32", "M": "i32", "H": "i32", "K": "i32", "SPLITS": "i32",
               "stride_hm": "i32", "stride_wv": "i32", "stride_pm": "i32"}
        block_h = kern.finalize_block_h(block_k, "fp32" if dt == "fp32" else "16bit")
        consts = dict(FULL=full, BLOCK_M=kern.FINALIZE_BLOCK_M, BLOCK_K=block_k, BLOCK_H=block_h,
                      BLOCK_S=kern.FINALIZE_BLOCK_S, UPCAST=False, DOT_PRECISION=prec)
        return AOTSpec(mod, "_finalize_kernel", sig, consts, num_warps=kern.FINALIZE_NUM_WARPS,
                       num_stages=kern.FINALIZE_NUM_STAGES, label=label)

    specs = []
    for dt, table, prec in (("bf16", kern.GPU_CONFIGS_16BIT, "tf32"), ("fp32", kern.GPU_CONFIGS_FP32, "ieee")):
        for c in dict.fromkeys(table.values()):  # distinct configs, in table order
            specs.append(partial(f"partial {dt} BM{c.BLOCK_M}", c, dt, dt, False, prec))
        specs += [finalize(f"finalize {mode} {dt} K16", dt, mode == "full", 16, prec) for mode in ("full", "subset")]
    specs.append(partial("partial fp32xbf16 (upcast) BM128", kern.GPU_CONFIGS_16BIT[128], "fp32", "bf16", True,
                         "tf32"))
    specs.append(finalize(f"finalize full bf16 K{kern.MAX_K}", "bf16", True, kern.MAX_K, "tf32"))
    return specs


@pytest.mark.slow  # 13 compiles in one child: ~15 s on an idle 2-core box, under a minute when it is shared
def test_every_gpu_config_compiles_for_sm90():
    pytest.importorskip("triton")
    from tests.helpers.aot import H100_SHARED_LIMIT, compile_many

    results = compile_many(_aot_specs())
    for res in results:
        print(res.summary())
    failed = [r.summary() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    too_big = [r.label for r in results if r.shared_bytes > H100_SHARED_LIMIT]
    assert not too_big, f"over the H100 shared-memory limit: {too_big}"
    assert not any(r.has_atomics for r in results)
    spills = [r.label for r in results if r.stack_bytes]
    assert not spills, f"register spills: {spills}"
