"""Fused non-causal attention for MMDiT blocks (FLUX.1-Kontext, Qwen-Image-Edit): FlashAttention-2 style forward and
backward in Triton, with the interleaved-pair RoPE and a key padding mask applied inside the kernels.

Origin: the algorithm of FlashAttention-2 (Dao, 2023) and the structure of Triton's tutorial 06-fused-attention
(online softmax in exp2, a Δ = rowsum(dO∘O) pre-pass, dK/dV per key block and dQ per query block). Written for
nftcore; no code copied. Differences from the tutorial:

- Layout `[B, N, H, D]` read through strides (what a Linear's output reshapes to): no transposes anywhere.
- Separate N_q and N_k, any lengths (masked tails: MMDiT token counts like 2·1024 + 237 are not multiples of 128),
  head dims up to 128, padded to a power of two >= 32 by masked loads (D = 16, 48, ... work).
- RoPE: in the forward, q and k tiles are rotated in registers right after their load (fp32 math, rounded back to
  the input dtype, like the reference); the pair split uses reshape/split/join on the loaded tile, so the global
  loads stay contiguous (vectorised). The backward rotates q and k once in a pre-pass (`_rope_kernel`, same
  rounding, so it sees exactly the forward's values) because rotating inside its inner loops spilled registers;
  dq/dk come out in the rotated basis and get the inverse rotation (−θ) in the epilogue, before the store.
- key_padding_mask: masked keys get −inf logits; a row with no attended key has l = 0, yields zeros and stores
  lse = +inf, which makes every recomputed probability exp(s − lse) exactly 0 in the backward: no NaN anywhere.
- The backward is always deterministic: no atomics (dQ has its own kernel that loops over key blocks). The price is
  recomputing QKᵀ and dO·Vᵀ once more (7 matmuls instead of 5); `deterministic=False` takes the same path.

Caveats: `UPCAST` (set under TRITON_INTERPRET) converts fp16/bf16 tiles to fp32 right after each load, because the
interpreter multiplies raw bf16 bit patterns; on GPU the dots run on fp16/bf16 with fp32 accumulation. fp32 inputs
run only under the interpreter (IEEE dots, a faithful test oracle): they have no GPU configuration (see below).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x·log2 e); folded into the softmax scale
# Kernels may only read globals that are tl.constexpr (the interpreter does not enforce it; the GPU compiler does).
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): converts the base-2 running max/sum back to a natural-log lse
MAX_HEAD_DIM = 128  # largest padded head dim with a shipped config (FLUX/Qwen use 128; 256 spilled registers)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Shared device helpers.


@triton.jit
def _load_rope(Cos, Sin, base, offs, n, scn, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """cos/sin tiles [BLOCK, BLOCK_D/2] fp32 of the rows `offs` (zeros past n and past D/2)."""
    offs_i = tl.arange(0, BLOCK_D // 2)
    ptrs = base + offs[:, None] * scn + offs_i[None, :]
    ok = (offs[:, None] < n) & (offs_i[None, :] < HEAD_DIM // 2)
    return tl.load(Cos + ptrs, mask=ok, other=0.0), tl.load(Sin + ptrs, mask=ok, other=0.0)


@triton.jit
def _rotate(x, c, s, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate adjacent pairs of x [BLOCK, BLOCK_D] (fp32) by θ: (e, o) → (e·c − o·s, e·s + o·c), with c, s of shape
    [BLOCK, BLOCK_D/2]. Pass −s for the inverse rotation (the transpose, i.e. the backward of the rotation)."""
    even, odd = tl.split(tl.reshape(x, (BLOCK, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(even * c - odd * s, even * s + odd * c), (BLOCK, BLOCK_D))


@triton.jit
def _load_tile(base, offs, n, stride_n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `offs` of a [N, D] slice with row stride `stride_n` (unit column stride) → [BLOCK, BLOCK_D], zero-padded."""
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(base + offs[:, None] * stride_n + offs_d[None, :],
                mask=(offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 → DTYPE with round-to-nearest-even (the interpreter truncates fp32→bf16 by default; rtne matches torch
    and the GPU); a no-op for fp32."""
    if DTYPE == tl.float32 or x.dtype == DTYPE:
        y = x
    else:
        y = x.to(DTYPE, fp_downcast_rounding="rtne")
    return y


@triton.jit
def _store_tile(base, offs, n, stride_n, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(base + offs[:, None] * stride_n + offs_d[None, :], _round(x, base.dtype.element_ty),
             mask=(offs[:, None] < n) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _key_ok(Mask, mask_base, offs_n, n_k, HAS_MASK: tl.constexpr):
    """[BLOCK_N] bool: the key exists (tail) and the padding mask says attend."""
    ok = offs_n < n_k
    if HAS_MASK:
        ok = ok & (tl.load(Mask + mask_base + offs_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _load_qk(X, x_base, Cos, Sin, rope_base, offs, n, stride_n, scn, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
             BLOCK_D: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr):
    """A q or k tile [BLOCK, BLOCK_D], rotated when ROPE (fp32 math, rounded back to the tile dtype)."""
    x = _load_tile(X + x_base, offs, n, stride_n, HEAD_DIM, BLOCK_D, UPCAST)
    if ROPE:
        c, s = _load_rope(Cos, Sin, rope_base, offs, n, scn, HEAD_DIM, BLOCK_D)
        # Round to the input dtype even when UPCAST: the forward, the backward's pre-pass and the reference must
        # all see the same rotated values, or the recomputed probabilities drift from the saved lse.
        x = _round(_rotate(x.to(tl.float32), c, s, BLOCK, BLOCK_D), X.dtype.element_ty)
        if UPCAST:
            x = x.to(tl.float32)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Grids: axis 0 = query (fwd, Δ, dQ) or key (dK/dV) blocks, axis 1 = B·H. Strides are in elements; the
# last dim of every tensor is contiguous. lse and Δ are [B, H, N_q] contiguous fp32; Mask is [B, N_k] uint8 with
# unit stride along N_k; Cos/Sin are [B or 1, N, D/2] fp32 with unit stride along D/2 (scb = 0 broadcasts over B).


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse, Mask, Cos, Sin,
                     sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh, smb, scb, scn,
                     H, N_Q, N_K, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_MASK: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online-softmax forward of one query block. ROPE rotates the q tile here (once per program); K arrives
    already rotated (see `attention_forward`)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)  # int64: B·N·H·D can pass 2**31 elements at large batch
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_qk(Q, off_b * sqb + off_h * sqh, Cos, Sin, off_b * scb, offs_m, N_Q, sqn, scn,
                 HEAD_DIM, BLOCK_M, BLOCK_D, ROPE, UPCAST)  # [BM, BD]
    k_base = off_b * skb + off_h * skh
    v_base = off_b * svb + off_h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 logits
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(logit - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + k_base, offs_n, N_K, skn, HEAD_DIM, BLOCK_D, UPCAST)  # [BN, BD], rotated by the launcher
        v = _load_tile(V + v_base, offs_n, N_K, svn, HEAD_DIM, BLOCK_D, UPCAST)  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], base-2 logits
        s = tl.where(_key_ok(Mask, off_b * smb, offs_n, N_K, HAS_MASK)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: avoid (−inf) − (−inf) = NaN
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    _store_tile(Out + off_b * sob + off_h * soh, offs_m, N_Q, son, acc / l_safe[:, None], HEAD_DIM, BLOCK_D)
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))  # natural log; +inf: no key
    tl.store(Lse + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_preprocess_kernel(Out, DO, Delta, sob, son, soh, sdb, sdn, sdh, H, N_Q,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ[b, h, i] = Σ_d dO[b, i, h, d]·O[b, i, h, d] (fp32): the row term of dS = P∘(dP − Δ)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(Out + off_b * sob + off_h * soh, offs_m, N_Q, son, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + off_b * sdb + off_h * sdh, offs_m, N_Q, sdn, HEAD_DIM, BLOCK_D, True)
    tl.store(Delta + pid_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit
def _rope_kernel(X, Y, Cos, Sin, sxb, sxn, sxh, syb, syn, syh, scb, scn, H, N,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, INVERSE: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Y = RoPE(X) for [B, N, H, D] tensors, rounded to Y's dtype exactly as the forward rounds its rotated tiles.

    The forward rotates k with it (k is read once per query block); the backward reads q and k once per
    (key block, query block) pair: rotating them inside its inner loops made
    every dK/dV configuration spill registers at D = 128 on sm_90 (AOT: 72-536 B of stack), while this pass costs
    one read and one write of q and k (about 1 % of the backward at the FLUX-Kontext 1024² shape). With INVERSE it
    rotates by −θ: dq and dk, the gradients of the rotated q and k, go back to the caller's basis (a pass after the
    backward kernels rather than inside them, where it made dK/dV spill at D = 128 with Triton 3.6)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x = _load_tile(X + off_b * sxb + off_h * sxh, offs_m, N, sxn, HEAD_DIM, BLOCK_D, UPCAST)
    c, s = _load_rope(Cos, Sin, off_b * scb, offs_m, N, scn, HEAD_DIM, BLOCK_D)
    if INVERSE:
        s = -s
    # Every program reads its whole tile before it writes it, so Y may be X (the backward rotates dq, dk in place).
    _store_tile(Y + off_b * syb + off_h * syh, offs_m, N, syn, _rotate(x.to(tl.float32), c, s, BLOCK_M, BLOCK_D),
                HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, Mask,
                          sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh,
                          sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, smb,
                          H, N_Q, N_K, sm_scale, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """One key block: dV = Σ_i Pᵀ·dO, dK = scale·Σ_i dSᵀ·Q over all query blocks (transposed tiles, [BN, BM]).
    With RoPE, Q and K arrive rotated and dK leaves in the rotated basis (see `attention_backward`)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(K + off_b * skb + off_h * skh, offs_n, N_K, skn, HEAD_DIM, BLOCK_D, UPCAST)  # [BN, BD]
    v = _load_tile(V + off_b * svb + off_h * svh, offs_n, N_K, svn, HEAD_DIM, BLOCK_D, UPCAST)  # [BN, BD]
    key_ok = _key_ok(Mask, off_b * smb, offs_n, N_K, HAS_MASK)  # [BN]
    q_base = off_b * sqb + off_h * sqh
    do_base = off_b * sdb + off_h * sdh
    row_base = pid_bh.to(tl.int64) * N_Q

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q + q_base, offs_m, N_Q, sqn, HEAD_DIM, BLOCK_D, UPCAST)  # [BM, BD]
        do = _load_tile(DO + do_base, offs_m, N_Q, sdn, HEAD_DIM, BLOCK_D, UPCAST)  # [BM, BD]
        # Rows past N_Q load lse = +inf, so their probabilities are exp2(−inf) = 0, like fully masked rows.
        lse2 = tl.load(Lse + row_base + offs_m, mask=offs_m < N_Q, other=float("inf")) * LOG2E
        delta = tl.load(Delta + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
        p_t = tl.where(key_ok[:, None], tl.math.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)

    dk = dk * sm_scale
    _store_tile(DK + off_b * sdkb + off_h * sdkh, offs_n, N_K, sdkn, dk, HEAD_DIM, BLOCK_D)
    _store_tile(DV + off_b * sdvb + off_h * sdvh, offs_n, N_K, sdvn, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, Mask,
                        sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdb, sdn, sdh, sdqb, sdqn, sdqh, smb,
                        H, N_Q, N_K, sm_scale, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """One query block: dQ = scale·Σ_j dS·K over all key blocks; each program owns its rows, so no atomics.
    With RoPE, Q and K arrive rotated and dQ leaves in the rotated basis."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + off_b * sqb + off_h * sqh, offs_m, N_Q, sqn, HEAD_DIM, BLOCK_D, UPCAST)  # [BM, BD]
    do = _load_tile(DO + off_b * sdb + off_h * sdh, offs_m, N_Q, sdn, HEAD_DIM, BLOCK_D, UPCAST)  # [BM, BD]
    row_base = pid_bh.to(tl.int64) * N_Q
    lse2 = tl.load(Lse + row_base + offs_m, mask=offs_m < N_Q, other=float("inf")) * LOG2E
    delta = tl.load(Delta + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
    k_base = off_b * skb + off_h * skh
    v_base = off_b * svb + off_h * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K + k_base, offs_n, N_K, skn, HEAD_DIM, BLOCK_D, UPCAST)  # [BN, BD]
        v = _load_tile(V + v_base, offs_n, N_K, svn, HEAD_DIM, BLOCK_D, UPCAST)  # [BN, BD]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
        key_ok = _key_ok(Mask, off_b * smb, offs_n, N_K, HAS_MASK)
        p = tl.where(key_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq = dq * sm_scale
    _store_tile(DQ + off_b * sdqb + off_h * sdqh, offs_m, N_Q, sdqn, dq, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------------------------------------
# Configurations: a plain function of (kernel, padded D, dtype), because multi-config autotune fails under the
# interpreter and a per-shape sweep at training time would cost more than it wins. Each entry is
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M is the query tile, BLOCK_N the key tile in every kernel.
# Every shipped entry is AOT-compiled for sm_90 in tests/test_attention_triton.py (shared memory, wgmma, no spills).
#
# Sweep for re-tuning on a GPU (bench/bench_attention.py --sweep is the place to run it):
#   BLOCK_M ∈ {64, 128}, BLOCK_N ∈ {32, 64, 128}, num_warps ∈ {4, 8}, num_stages ∈ {2, 3, 4, 5}
#   (fwd: the tutorial's H100 picks are 128×64 / 8 warps / 3 stages at D=128 and 128×64 / 4 warps at D=64;
#    bwd: the tutorial uses 32×128 for dK/dV and 128×32 for dQ, 4 warps, 5 stages).
# First picked by the AOT compile alone (shared memory <= 227 KiB, wgmma, zero stack = no spills); then timed on an
# H200 (2026-11-27, Triton 3.6, bf16, FLUX-Kontext 1024² shape B=1 H=24 N=8704 D=128, RoPE on; sweep results in
# bench/RESULTS.md): fwd 128×64/8w/3s 402 TFLOP/s (best of 36: 411, kept); dQ 128×64/8w/3s the best of 24 (354 TFLOP/s
# for the whole backward); dK/dV D=128 moved from 32×128/8w/3s (6.68 ms backward) to 32×64/4w/4s (6.10 ms, -9 %,
# no spills with Triton 3.6 or 3.7; 64×64/4w/2s, as fast, spills 32-48 B).

_GPU_CONFIGS = {
    # kernel: {padded D: (BLOCK_M, BLOCK_N, num_warps, num_stages)}
    "fwd": {32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3)},
    "dkdv": {32: (64, 128, 8, 3), 64: (64, 128, 8, 3), 128: (32, 64, 4, 4)},
    "dq": {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3)},
}
# No GPU config for fp32: IEEE fp32 dots run on CUDA cores, and every fp32 config tried spilled registers on sm_90
# (AOT at 64×32 / 4 warps / 2 stages: 320-7792 B of stack, 10-60 s compiles). fp32 is for the interpreter tests;
# on CUDA the op sends fp32 to the reference (SDPA), see `GPU_DTYPES`.
GPU_DTYPES = (torch.float16, torch.bfloat16)
# Under the interpreter a program×inner-iteration costs ~3.5 ms whatever the tile, so large square tiles keep the
# number of (program, iteration) pairs small.
_INTERPRETER_CONFIG = (64, 64, 4, 1)
_PREPROCESS_BLOCK_M = 64  # Δ and RoPE are bandwidth passes: 64 rows × D per program is plenty


def padded_head_dim(head_dim: int) -> int:
    """Next power of two >= max(D, 32): tl.arange needs a power of two, and RoPE splits D in halves that must
    each be >= 16 for tl.dot's K on the GPU (the 32 floor costs only masked lanes for D = 16)."""
    return max(32, triton.next_power_of_2(head_dim))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ("", "0", "false", "no", "off")


def select_config(kernel: str, head_dim: int, dtype: torch.dtype, interpret: bool | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for `kernel` ∈ {fwd, dkdv, dq} at head dim `head_dim`."""
    if interpreting() if interpret is None else interpret:
        return _INTERPRETER_CONFIG
    if dtype not in GPU_DTYPES:
        raise ValueError(f"attention kernel: no GPU configuration for {dtype}; use fp16/bf16 (fp32: the reference)")
    return _GPU_CONFIGS[kernel][padded_head_dim(head_dim)]


def shipped_configs():
    """Every (kernel, padded D, dtype, config) the launchers can pick on a GPU: what the AOT test compiles."""
    for kernel, table in _GPU_CONFIGS.items():
        for bd in table:
            for dtype in GPU_DTYPES:
                yield kernel, bd, dtype, select_config(kernel, bd, dtype, interpret=False)


# ---------------------------------------------------------------------------------------------------------------
# Launchers.


def _check(q, k, v, mask, cos, sin, scale) -> None:
    for name, x in dict(q=q, k=k, v=v).items():
        if x.dim() != 4 or x.stride(-1) != 1:
            raise ValueError(f"attention kernel: `{name}` must be [B, N, H, D] with unit stride on D, "
                             f"got shape {list(x.shape)} strides {list(x.stride())}")
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(f"attention kernel: `{name}` is {x.dtype} on {x.device}, `q` is {q.dtype} on {q.device}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"attention kernel: dtype must be one of {KERNEL_DTYPES}, got {q.dtype}")
    batch, _, heads, head_dim = q.shape
    if k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"attention kernel: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} disagree")
    if padded_head_dim(head_dim) > MAX_HEAD_DIM:
        raise ValueError(f"attention kernel: head dim {head_dim} > {MAX_HEAD_DIM} is not supported")
    if mask is not None and (mask.shape != (batch, k.shape[1]) or mask.dtype != torch.bool):
        raise ValueError(f"attention kernel: mask must be bool [B, N_k] = [{batch}, {k.shape[1]}]")
    if cos is not None:
        want = (q.shape[1], head_dim // 2)
        if q.shape[1] != k.shape[1] or cos.shape != sin.shape or tuple(cos.shape[-2:]) != want:
            raise ValueError(f"attention kernel: cos/sin must be [N, D/2] or [B, N, D/2] = {want}, got "
                             f"{list(cos.shape)} with N_q={q.shape[1]}, N_k={k.shape[1]}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"attention kernel: scale must be finite and positive, got {scale}")


def _extras(q, mask, cos, sin):
    """(mask as uint8 [B, N_k] + its batch stride, cos/sin fp32 [B|1, N, D/2] + batch and row strides). Absent
    tensors come back as `q`, a placeholder pointer: callers must take HAS_MASK/ROPE from the original arguments."""
    if mask is not None:
        mask_u8 = mask.contiguous().view(torch.uint8)  # same bytes as bool; Triton reads it as an integer row
        smb = mask_u8.stride(0)
    else:
        mask_u8, smb = q, 0  # never read (HAS_MASK=False): any pointer of the right device will do
    if cos is not None:
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
        scb = 0 if cos.dim() == 2 else cos.stride(0)  # [N, D/2] broadcasts over the batch
        scn = cos.stride(-2)
    else:
        cos, sin, scb, scn = q, q, 0, 0
    return mask_u8, smb, cos, sin, scb, scn


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for fp16/bf16 operands


def attention_forward(q, k, v, mask, cos, sin, scale):
    """Fused attention forward.

    Args:
        q: [B, N_q, H, D] fp16/bf16/fp32, unit stride on D (other strides free).
        k, v: [B, N_k, H, D], q's dtype and device.
        mask: None or [B, N_k] bool, True = attend.
        cos, sin: None or [N, D/2] / [B, N, D/2] float (any dtype; read as fp32), N = N_q = N_k.
        scale: softmax scale (float).

    Returns:
        out: [B, N_q, H, D] in q's dtype, contiguous.
        lse: [B, H, N_q] fp32, natural-log log-sum-exp of the scaled logits per row; +inf for a row with no key.
    """
    _check(q, k, v, mask, cos, sin, scale)
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    mask_u8, smb, cos_t, sin_t, scb, scn = _extras(q, mask, cos, sin)
    if cos is not None:
        # k is read once per query block: rotate it once here (a bandwidth pass) rather than in the inner loop,
        # which cost 30-40 % of the forward's throughput on an H200. q is rotated in the kernel, once per program.
        k = _rotate_copy(k, cos_t, sin_t, scb, scn)
    block_m, block_n, warps, stages = select_config("fwd", head_dim, q.dtype)
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, mask_u8, cos_t, sin_t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), smb, scb, scn,
        heads, n_q, n_k, scale * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_MASK=mask is not None, ROPE=cos is not None, UPCAST=interpreting(), DOT_PREC=_dot_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def _rotate_copy(x, cos, sin, scb, scn, *, inverse=False, out=None):
    """RoPE(x) (−θ when `inverse`) into `out` (default: a new contiguous tensor; `out` may be x itself) in x's dtype;
    x, out are [B, N, H, D], cos/sin already fp32 from `_extras`."""
    batch, n, heads, head_dim = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _rope_kernel[(triton.cdiv(n, _PREPROCESS_BLOCK_M), batch * heads)](
        x, y, cos, sin, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), scb, scn,
        heads, n, HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=_PREPROCESS_BLOCK_M,
        INVERSE=inverse, UPCAST=interpreting(),
    )
    return y


def attention_backward(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic=True):
    """Fused attention backward: Δ pre-pass (and RoPE pre-pass), then dK/dV per key block and dQ per query block.

    Args:
        grad_out: [B, N_q, H, D] in q's dtype, unit stride on D.
        q, k, v, mask, cos, sin, scale: as given to `attention_forward` (unrotated q and k).
        out: [B, N_q, H, D] the forward's output; lse: [B, H, N_q] fp32 the forward's log-sum-exp.
        deterministic: accepted for the op's API; every path here is deterministic (no atomics).

    Returns:
        dq: [B, N_q, H, D], dk, dv: [B, N_k, H, D], in q's dtype, contiguous.
    """
    del deterministic  # the only path is the deterministic one
    _check(q, k, v, mask, cos, sin, scale)
    for name, x in dict(grad_out=grad_out, out=out).items():
        if x.shape != q.shape or x.stride(-1) != 1 or x.dtype != q.dtype:
            raise ValueError(f"attention kernel: `{name}` must match q's shape/dtype with unit stride on D")
    batch, n_q, heads, head_dim = q.shape
    n_k = k.shape[1]
    if lse.shape != (batch, heads, n_q) or lse.dtype != torch.float32:
        raise ValueError(f"attention kernel: lse must be fp32 [B, H, N_q] = [{batch}, {heads}, {n_q}]")
    lse = lse.contiguous()
    block_d = padded_head_dim(head_dim)
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, _PREPROCESS_BLOCK_M), batch * heads)](
        out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), heads, n_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    mask_u8, smb, cos_t, sin_t, scb, scn = _extras(q, mask, cos, sin)
    if cos is not None:  # rotate q and k once here instead of in every inner-loop iteration (see _rope_kernel)
        q, k = _rotate_copy(q, cos_t, sin_t, scb, scn), _rotate_copy(k, cos_t, sin_t, scb, scn)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_MASK=mask is not None, UPCAST=interpreting(),
                 DOT_PREC=_dot_precision(q.dtype))

    block_m, block_n, warps, stages = select_config("dkdv", head_dim, q.dtype)
    _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, block_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, mask_u8, *common,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), smb,
        heads, n_q, n_k, scale, scale * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags,
    )
    block_m, block_n, warps, stages = select_config("dq", head_dim, q.dtype)
    _attn_bwd_dq_kernel[(triton.cdiv(n_q, block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, mask_u8, *common,
        dq.stride(0), dq.stride(1), dq.stride(2), smb,
        heads, n_q, n_k, scale, scale * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **flags,
    )
    if cos is not None:  # the gradients of the rotated q and k: back to the caller's basis (−θ), in place
        _rotate_copy(dq, cos_t, sin_t, scb, scn, inverse=True, out=dq)
        _rotate_copy(dk, cos_t, sin_t, scb, scn, inverse=True, out=dk)
    return dq, dk, dv
