"""Log-probabilities of K chosen tokens straight from the final hidden state and the LM head, without [M, V] logits.

The reward judge (a Qwen2.5-VL) scores an edit by the expected digit at one position: softmax over the logits of the
tokens "0".."5", score = sum_k k * p_k / 5. Computing `hidden @ lm_head.T` for the whole 152k vocabulary to read six
numbers wastes memory ([M, V] fp32 is 39 MB at M = 64) and time. Two modes:

- ``subset``: out[m, k] = z[m, k] - logsumexp_k' z[m, k'], with z = hidden @ weight[token_ids].T (K rows only). This
  is what the reward needs; it reads K rows of the head.
- ``full``: out[m, k] = z[m, id_k] - logsumexp_v z[m, v], the true vocabulary log-probability. The head is streamed
  once in [BLOCK_V, BLOCK_H] tiles with an online (max, sum-exp) per row; the logits live only in registers.

Kernels (grid and layout):

- `_lse_partial_kernel`, grid (M-blocks, V-splits). Each program owns a contiguous run of BLOCK_V-row tiles of the
  head and writes one partial (max, sum-exp) per row to a [SPLITS, M] workspace. Small M (1..288 in the
  reward) gives few M-blocks, so the V-splits are what fill the GPU: the kernel is bandwidth-bound there and the
  roofline is reading the head once. The product is computed transposed, acc[BLOCK_V, BLOCK_M] = W_tile @ h^T
  ("swap AB"): the big vocabulary tile sits on the MMA's M side (wgmma wants 64+ rows there) and the few hidden rows
  on its N side, where 16 is enough.
- `_finalize_kernel`, grid (M / 16,). Gathers the K head rows (a [BLOCK_K, H] x [H, 16] dot, K <= 256), then
  either combines the V-split partials (full) or takes the logsumexp over the K logits (subset), and writes
  out[M, K] = logit - lse plus lse[M] (kept for the backward).

Precision: loads keep the storage dtype and `tl.dot` accumulates in fp32. Under the Triton interpreter bf16 arithmetic
is broken (bf16 is stored as uint16, dots multiply bit patterns), so `UPCAST` converts every tile to fp32 right after
the load; it is also used when hidden and weight dtypes differ (tl.dot needs one dtype). fp32 x fp32 dots use IEEE
precision unless torch itself allows TF32 matmuls, so the kernel matches what `hidden @ weight.T` would give.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The interpreter flavour of @triton.jit is fixed when this module is imported, so read the flag once, here.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ("", "0", "false", "no", "off")
# Start value of running maxima. Finite on purpose: with -inf, exp(m_old - m_new) is exp(-inf - -inf) = NaN for a
# row that has seen only masked values (padded rows, padded splits); -3e38 is below every fp32 logit and
# exp(-3e38 - logit) is a clean 0.
_NEG_BIG: tl.constexpr = tl.constexpr(-3.0e38)
# The finalize kernel holds all K logits of a row block in one [BLOCK_K, 16] fp32 tile (subset mode needs their
# logsumexp); 256 keeps it at 32 registers per thread with 4 warps (AOT-checked: no spills).
MAX_K = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _lse_partial_kernel(
    Hidden, Weight, PartMax, PartSum,  # [M, H], [V, H], [SPLITS, M] fp32, [SPLITS, M] fp32
    M, V, H, stride_hm, stride_wv, stride_pm, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)  # M-blocks vary fastest: programs sharing a V-range run together and share it in L2
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    mask_m = offs_m < M
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)  # the host makes every split own >= 1 valid tile
    # int64: `hidden` may be a strided view like last_hidden_state[:, -1], whose row stride T * H times M can pass 2^31.
    h_rows = Hidden + offs_m.to(tl.int64)[None, :] * stride_hm  # [1, BLOCK_M]

    m_run = tl.full([BLOCK_M], _NEG_BIG, tl.float32)  # running max per hidden row
    s_run = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(z - m_run)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        mask_v = offs_v < V
        # int64 row offsets: V * stride_wv passes 2^31 for big heads (256k vocab x 8192 hidden).
        w_rows = Weight + offs_v.to(tl.int64)[:, None] * stride_wv  # [BLOCK_V, 1]
        acc = tl.zeros([BLOCK_V, BLOCK_M], tl.float32)  # z^T for this tile
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            w = tl.load(w_rows + offs_h[None, :], mask=mask_v[:, None] & mask_h[None, :], other=0.0)  # [BV, BH]
            # h^T tile [BLOCK_H, BLOCK_M]; padded rows (m >= M) read 0 and give logits 0, never stored as results.
            x = tl.load(h_rows + offs_h[:, None],
                        mask=mask_m[None, :] & mask_h[:, None], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(w, x, acc, input_precision=DOT_PRECISION)
        acc = tl.where(mask_v[:, None], acc, float("-inf"))  # padded vocabulary rows must not count
        m_new = tl.maximum(m_run, tl.max(acc, axis=0))  # [BLOCK_M]
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(acc - m_new[None, :]), axis=0)
        m_run = m_new
    offs_out = pid_s * stride_pm + offs_m
    tl.store(PartMax + offs_out, m_run, mask=mask_m)
    tl.store(PartSum + offs_out, s_run, mask=mask_m)


@triton.jit
def _finalize_kernel(
    Hidden, Weight, Ids, PartMax, PartSum, Out, Lse,  # [M,H], [V,H], [K], [SPLITS,M] x2, [M,K] fp32, [M] fp32
    M, H, K, SPLITS, stride_hm, stride_wv, stride_pm,
    FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    mask_k = offs_k < K
    ids = tl.load(Ids + offs_k, mask=mask_k, other=0).to(tl.int64)  # padded k read row 0, masked out below
    w_rows = Weight + ids[:, None] * stride_wv  # [BLOCK_K, 1]
    h_rows = Hidden + offs_m.to(tl.int64)[None, :] * stride_hm  # [1, BLOCK_M], int64 as in the partial kernel

    # Selected logits, transposed like the partial kernel: z^T[BLOCK_K, BLOCK_M] = W[ids] @ h^T.
    z = tl.zeros([BLOCK_K, BLOCK_M], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        w = tl.load(w_rows + offs_h[None, :], mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        x = tl.load(h_rows + offs_h[:, None],
                    mask=mask_m[None, :] & mask_h[:, None], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        z = tl.dot(w, x, z, input_precision=DOT_PRECISION)

    if FULL:
        # Combine the V-splits' (max, sum-exp) pairs: lse = M + log(sum_s S_s * exp(M_s - M)).
        m_run = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
        s_run = tl.zeros([BLOCK_M], tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            ptrs = offs_s[:, None] * stride_pm + offs_m[None, :]  # [BLOCK_S, BLOCK_M]
            mask_sm = (offs_s[:, None] < SPLITS) & mask_m[None, :]
            pmax = tl.load(PartMax + ptrs, mask=mask_sm, other=float("-inf"))
            psum = tl.load(PartSum + ptrs, mask=mask_sm, other=0.0)
            m_new = tl.maximum(m_run, tl.max(pmax, axis=0))
            s_run = s_run * tl.exp(m_run - m_new) + tl.sum(psum * tl.exp(pmax - m_new[None, :]), axis=0)
            m_run = m_new
        lse = m_run + tl.log(tl.where(mask_m, s_run, 1.0))  # [BLOCK_M]; padded rows have no partials: sum 0
    else:
        zk = tl.where(mask_k[:, None], z, float("-inf"))
        m_k = tl.max(zk, axis=0)
        lse = m_k + tl.log(tl.sum(tl.exp(zk - m_k[None, :]), axis=0))

    out = z - lse[None, :]  # [BLOCK_K, BLOCK_M]
    tl.store(Out + offs_m[None, :] * K + offs_k[:, None], out, mask=mask_m[None, :] & mask_k[:, None])
    tl.store(Lse + offs_m, lse, mask=mask_m)


# ------------------------------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class Config:
    """Launch parameters of the partial (head-streaming) kernel."""

    BLOCK_M: int  # hidden rows per program (the MMA's N side); >= 16 for tl.dot on GPU
    BLOCK_V: int  # vocabulary rows per tile (the MMA's M side)
    BLOCK_H: int  # reduction chunk over the hidden size
    num_warps: int
    num_stages: int


# Vetted GPU configs, keyed by the BLOCK_M bucket that `gpu_config` picks from M. Shared memory per pipeline stage is
# (BLOCK_V + BLOCK_M) * BLOCK_H * bytes; every entry fits the H100's 227 KiB at its num_stages (tests/test_score_logits
# AOT-compiles each one for sm_90: 128-192 KiB for 16-bit, 40-64 KiB fp32; wgmma for 16-bit, no spills).
# 16-bit: a 128x128 head tile is 32 KiB, and 4 stages keep ~128 KiB of the head in flight per SM, enough to cover HBM
# latency with the one program per SM that this shared memory allows. fp32 runs IEEE FMAs (no tensor cores): smaller
# tiles, 3 stages, and BLOCK_M capped at 64 (BLOCK_M = 128 spilled registers).
# Sweep for re-tuning on a GPU (not run in CI; no multi-config autotune, it fails under the interpreter):
#   BLOCK_M in {16, 32, 64, 128} x BLOCK_V in {64, 128, 256} x BLOCK_H in {64, 128} x num_warps in {4, 8}
#   x num_stages in {3, 4, 5}, filtered by shared memory <= 232448 B; time with bench/bench_score_logits.py.
GPU_CONFIGS_16BIT = {
    16: Config(BLOCK_M=16, BLOCK_V=128, BLOCK_H=128, num_warps=4, num_stages=4),
    32: Config(BLOCK_M=32, BLOCK_V=128, BLOCK_H=128, num_warps=4, num_stages=4),
    64: Config(BLOCK_M=64, BLOCK_V=128, BLOCK_H=128, num_warps=4, num_stages=4),
    128: Config(BLOCK_M=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=4),
}
_FP32_M64 = Config(BLOCK_M=64, BLOCK_V=64, BLOCK_H=64, num_warps=4, num_stages=3)
GPU_CONFIGS_FP32 = {
    16: Config(BLOCK_M=16, BLOCK_V=64, BLOCK_H=64, num_warps=4, num_stages=3),
    32: Config(BLOCK_M=32, BLOCK_V=64, BLOCK_H=64, num_warps=4, num_stages=3),
    64: _FP32_M64,
    128: _FP32_M64,
}
# Interpreter: every program x inner iteration costs ~10-30 ms of numpy overhead on the CI box, far more than the
# arithmetic, so the tiles are as big as the test shapes allow: V = 18992 is 19 tiles of 1024 rows, H <= 256 is one
# chunk (measured at M = 17, V = 18992, H = 200: 512x128 tiles 2.7 s, 1024x256 1.3 s). Tests that need the H loop and
# ragged tiles pass a small `config`.
INTERPRETER_CONFIG = Config(BLOCK_M=64, BLOCK_V=1024, BLOCK_H=256, num_warps=4, num_stages=1)

# Finalize kernel: one fixed shape per dtype class whatever the partial config (the workspace is [SPLITS, M], not
# padded to the partial kernel's BLOCK_M), so few variants to compile. BLOCK_M = 16 is tl.dot's minimum; each program
# re-reads the K gathered head rows, which at M = 288 is 18 x K x H elements - nothing next to the head.
FINALIZE_BLOCK_M = 16
# Split partials combined per iteration: [128, 16] fp32 x 2 tiles is 32 registers per thread at 4 warps, and one or
# two iterations cover the ~one split per SM that `num_splits` makes at small M.
FINALIZE_BLOCK_S = 128
# Wide H chunks: at M <= 16 the finalize kernel is one program walking H alone, so its latency is the number of
# iterations (7 at H = 3584 for 16-bit, K <= 16), and it adds directly to the head-streaming time. The gathered
# [BLOCK_K, BLOCK_H] head tile is capped at 8192 elements (16 KiB in 16-bit, 32 KiB fp32 per stage): K = 256 with
# BLOCK_H = 512 compiled to 544 KiB of shared memory and spilled.
FINALIZE_BLOCK_H = {"16bit": 512, "fp32": 256, "interpreter": 256}
FINALIZE_TILE_ELEMS = 8192


def finalize_block_h(block_k: int, key: str) -> int:
    """BLOCK_H of the finalize kernel for a [BLOCK_K, BLOCK_H] gathered tile; >= 16 for tl.dot (BLOCK_K <= 256)."""
    return min(FINALIZE_BLOCK_H[key], FINALIZE_TILE_ELEMS // block_k)
FINALIZE_NUM_WARPS = 4
FINALIZE_NUM_STAGES = 2  # the K gathered rows are few: little to pipeline


def _m_bucket(M: int) -> int:
    """Smallest of 16/32/64/128 that holds M rows (128 for bigger M: the grid then has several M-blocks)."""
    for b in (16, 32, 64):
        if M <= b:
            return b
    return 128


def gpu_config(M: int, H: int, dtype: torch.dtype) -> Config:
    """The partial kernel's config for a GPU launch: a plain function of (M, H, dtype), no autotuning.

    H does not change the choice today (every entry masks a ragged last H-chunk); it is an argument so a re-tune for a
    small head (H < BLOCK_H) can specialise without changing callers.
    """
    del H
    table = GPU_CONFIGS_FP32 if dtype == torch.float32 else GPU_CONFIGS_16BIT
    return table[_m_bucket(M)]


def interpreter_config(M: int) -> Config:
    """One M-block for the test sizes (M <= 64); the block still is >= 16 to mirror the GPU's tl.dot rule."""
    return dataclasses.replace(INTERPRETER_CONFIG, BLOCK_M=min(_m_bucket(M), INTERPRETER_CONFIG.BLOCK_M))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(n_tiles: int, m_blocks: int, device: torch.device) -> int:
    """How many programs share the vocabulary of one M-block.

    GPU: about one program per SM in total (each holds 128-192 KiB of shared memory, so one fits per SM, and its
    4-stage pipeline keeps enough bytes in flight); at M = 1 on an H100 that is 132 splits of 9 tiles each.
    Interpreter: 4, enough to exercise the split combine and a ragged last split at no extra cost.
    """
    target = _sm_count(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(n_tiles, target // max(1, m_blocks)))


# ------------------------------------------------------------------------------------------------------ launcher

def _dot_precision(hidden: torch.Tensor, weight: torch.Tensor) -> str:
    """IEEE for fp32 x fp32 unless torch allows TF32 matmuls (then match torch); 16-bit and mixed inputs use tf32,
    which is exact for 16-bit operands and for bf16 weights, rounding only an fp32 hidden to 10 mantissa bits."""
    if hidden.dtype == weight.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def score_logits_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    full: bool,
    *,
    validate_ids: bool = True,
    config: Config | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the score-logit kernels.

    Args:
        hidden: [M, H] fp16/bf16/fp32, unit stride along H (any row stride, e.g. `last_hidden_state[:, -1]`).
        weight: [V, H] fp16/bf16/fp32, unit stride along H (the LM head as nn.Linear stores it).
        token_ids: [K] int32/int64, distinct ids in [0, V), 1 <= K <= MAX_K, contiguous, on the same device.
        full: True for vocabulary log-probs (streams the head), False for the log-softmax over the K rows.
        validate_ids: check the id values (one device sync); callers that already did pass False.
        config, splits: override the partial kernel's launch choice (tests and tuning only).

    Returns:
        out: [M, K] fp32 log-probabilities; lse: [M] fp32, the normaliser (over V if full, over the K ids otherwise).
    """
    op = "score_logits_forward"
    for name, x in (("hidden", hidden), ("weight", weight)):
        if x.dim() != 2:
            raise ValueError(f"{op}: `{name}` must be 2-D, got shape {list(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: `{name}` must be float16/bfloat16/float32, got {x.dtype}")
        if x.stride(1) != 1:
            raise ValueError(f"{op}: `{name}` must have unit stride along H, got strides {x.stride()}")
    (M, H), (V, H_w) = hidden.shape, weight.shape
    if H != H_w:
        raise ValueError(f"{op}: `hidden` is [M, H] = {list(hidden.shape)} but `weight` is [V, H] = "
                         f"{list(weight.shape)}")
    if token_ids.dim() != 1 or token_ids.dtype not in (torch.int32, torch.int64) or not token_ids.is_contiguous():
        raise ValueError(f"{op}: `token_ids` must be a contiguous 1-D int32/int64 tensor, got {token_ids.dtype} "
                         f"shape {list(token_ids.shape)}")
    K = token_ids.shape[0]
    if not 1 <= K <= MAX_K:
        raise ValueError(f"{op}: `token_ids` must hold 1..{MAX_K} ids, got {K}")
    if not (hidden.device == weight.device == token_ids.device):
        raise ValueError(f"{op}: tensors on different devices: hidden {hidden.device}, weight {weight.device}, "
                         f"token_ids {token_ids.device}")
    if validate_ids:
        ids = token_ids.tolist()
        if any(not 0 <= i < V for i in ids) or len(set(ids)) != K:
            raise ValueError(f"{op}: `token_ids` must be distinct ids in [0, {V}), got {ids}")

    out = torch.empty((M, K), device=hidden.device, dtype=torch.float32)
    lse = torch.empty((M,), device=hidden.device, dtype=torch.float32)
    if M == 0:
        return out, lse
    on_gpu = hidden.device.type == "cuda" and not _INTERPRET
    if config is None:
        config = gpu_config(M, H, weight.dtype) if on_gpu else interpreter_config(M)
    upcast = _INTERPRET or hidden.dtype != weight.dtype
    precision = _dot_precision(hidden, weight)

    if full:
        m_blocks = triton.cdiv(M, config.BLOCK_M)
        n_tiles = triton.cdiv(V, config.BLOCK_V)
        n_splits = splits or num_splits(n_tiles, m_blocks, hidden.device)
        tiles_per_split = triton.cdiv(n_tiles, n_splits)
        n_splits = triton.cdiv(n_tiles, tiles_per_split)  # drop splits that would own no tile
        part_max = torch.empty((n_splits, M), device=hidden.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        _lse_partial_kernel[(m_blocks, n_splits)](
            hidden, weight, part_max, part_sum,
            M, V, H, hidden.stride(0), weight.stride(0), part_max.stride(0), tiles_per_split,
            BLOCK_M=config.BLOCK_M, BLOCK_V=config.BLOCK_V, BLOCK_H=config.BLOCK_H,
            UPCAST=upcast, DOT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        n_splits = 0
        part_max = part_sum = out  # unused by the FULL=False specialisation; any fp32 pointer will do

    block_k = max(16, triton.next_power_of_2(K))  # tl.dot's minimum
    key = ("fp32" if weight.dtype == torch.float32 else "16bit") if on_gpu else "interpreter"
    _finalize_kernel[(triton.cdiv(M, FINALIZE_BLOCK_M),)](
        hidden, weight, token_ids, part_max, part_sum, out, lse,
        M, H, K, n_splits, hidden.stride(0), weight.stride(0), M,
        FULL=full, BLOCK_M=FINALIZE_BLOCK_M, BLOCK_K=block_k, BLOCK_H=finalize_block_h(block_k, key),
        BLOCK_S=FINALIZE_BLOCK_S, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=FINALIZE_NUM_WARPS, num_stages=FINALIZE_NUM_STAGES,
    )
    return out, lse
