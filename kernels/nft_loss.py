"""The DiffusionNFT loss and its gradient for `v_θ` in two Triton launches.

Why two: the adaptive weight d± = max(mean|e±|, 1e-5) is a reduction over a whole sample, and every element's gradient
needs it, so no single pass can both reduce and write the gradient without a grid-wide barrier.

- launch 1, `_nft_loss_partials_kernel`, grid (B, splits): each program streams one chunk of one sample and writes
  seven fp32 partial sums to a workspace [B, splits, 7] (no atomics, so the result is deterministic and the workspace
  needs no zeroing): Σ|e⁺|, Σe⁺², Σ|e⁻|, Σe⁻², Σ(v_θ − v_ref)², Σ(v_θ − v_old)², Σ(x_t − t·v_θ)², where
  e± = x_t − t·v± − x0, v⁺ = β·v_θ + (1−β)·v_old, v⁻ = (1+β)·v_old − β·v_θ.
- launch 2, `_nft_loss_finalize_kernel`, same grid: every program reduces its sample's workspace row to d±, then
  streams its chunk again writing ∂/∂v_θ[i] = ρ_i·(2·t_i·S/n)·(w·(1−r_i)·e⁻/d⁻ − r_i·e⁺/d⁺) + κ_i·2·λ·(v_θ − v_ref)/n
  (S = loss_scale, w = negative_weight, λ = kl_weight). In the forward ρ_i = κ_i = m_i/max(Σm, 1), the gradient of
  `loss`; the general backward passes any per-sample routes ρ, κ. Program (0, 0) also writes the scalar outputs.
  Programs walk the samples and chunks in the reverse order of launch 1, so the first chunks launch 2 re-reads are
  the last ones launch 1 read: on an H100 up to ~50 MB of them are still in L2.

Traffic: launch 1 reads the 4-5 [B, n] inputs once, launch 2 reads them again and writes the gradient (the re-read is
the price of the global d±; it hits L2 at real sizes, where everything is a few MB). Everything accumulates in fp32:
loads are upcast right after loading, which the interpreter needs (its bf16 arithmetic is broken) and which costs
nothing on a GPU here (memory-bound). fp64 is not handled here; `nftcore.ops.nft_loss` sends it to the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Workspace columns: per (sample, split) partial sums.
_ABS_POS, _SQ_POS, _ABS_NEG, _SQ_NEG, _SQ_REF, _SQ_OLD, _SQ_X0 = (tl.constexpr(i) for i in range(7))
N_SUMS = tl.constexpr(7)  # kernels may only read constexpr globals; the host uses N_SUMS.value
# H100 SXM has 132 SMs; two resident programs per SM keep every SM streaming while the other waits on memory.
_TARGET_PROGRAMS = 2 * 132
# The interpreter casts fp32 -> bf16 by truncation (even with fp_downcast_rounding="rtne"); round by hand there.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class NFTLossConfig:
    """Launch shape shared by both kernels: `splits` programs per sample, each owning `chunk` elements (a multiple of
    `block`) and looping over them `block` at a time."""

    block: int
    num_warps: int
    splits: int
    chunk: int


def nft_loss_config(n: int, batch: int) -> NFTLossConfig:
    """The vetted config for `batch` samples of `n` elements: ≥ _TARGET_PROGRAMS programs when n allows it.

    block 2048 / 8 warps and block 1024 / 4 warps both give each thread 8 elements per field per iteration (one or two
    16-byte loads), so seven fp32 accumulators stay in registers. 1024 is used when 2048 would leave SMs idle.
    Re-tune on a GPU with bench/bench_nft_loss.py over:
        block ∈ {512, 1024, 2048, 4096} × num_warps ∈ {4, 8} × target programs ∈ {132, 264, 528, 1056}.
    """
    block = 2048 if batch * triton.cdiv(n, 2048) >= _TARGET_PROGRAMS else 1024
    num_warps = 8 if block == 2048 else 4
    splits = max(1, min(triton.cdiv(_TARGET_PROGRAMS, batch), triton.cdiv(n, block)))
    chunk = triton.cdiv(triton.cdiv(n, splits), block) * block
    return NFTLossConfig(block, num_warps, triton.cdiv(n, chunk), chunk)


@triton.jit
def _nft_loss_partials_kernel(
    VT, VO, XT, X0, VR,  # [B, n] each, any float dtype; VR is read only with HAS_REF
    T,  # [B] σ per sample
    WS,  # [B, splits, 7] fp32 partial sums (written, every entry)
    n, chunk, splits,
    beta, one_minus_beta, one_plus_beta,  # β, 1−β, 1+β computed in fp64 on the host, as the reference rounds them
    HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    base = b.to(tl.int64) * n  # int64: B·n may pass 2**31
    start = s * chunk
    end = tl.minimum(start + chunk, n)
    t = tl.load(T + b).to(tl.float32)
    abs_pos = tl.full([BLOCK], 0.0, tl.float32)
    sq_pos = tl.full([BLOCK], 0.0, tl.float32)
    abs_neg = tl.full([BLOCK], 0.0, tl.float32)
    sq_neg = tl.full([BLOCK], 0.0, tl.float32)
    sq_ref = tl.full([BLOCK], 0.0, tl.float32)
    sq_old = tl.full([BLOCK], 0.0, tl.float32)
    sq_x0 = tl.full([BLOCK], 0.0, tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        live = idx < end
        # Out-of-range lanes load zeros everywhere, so every error and difference below is 0 there.
        vt = tl.load(VT + base + idx, mask=live, other=0.0).to(tl.float32)
        vo = tl.load(VO + base + idx, mask=live, other=0.0).to(tl.float32)
        xt = tl.load(XT + base + idx, mask=live, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + base + idx, mask=live, other=0.0).to(tl.float32)
        # x̂0 error of both implicit branches, in the reference's operation order: (x_t − t·v±) − x0.
        # Written out rather than a @jit helper: each helper call costs ~5 ms in the interpreter.
        e_pos = (xt - t * (beta * vt + one_minus_beta * vo)) - x0
        e_neg = (xt - t * (one_plus_beta * vo - beta * vt)) - x0
        abs_pos += tl.abs(e_pos)
        sq_pos += e_pos * e_pos
        abs_neg += tl.abs(e_neg)
        sq_neg += e_neg * e_neg
        if HAS_REF:
            d_ref = vt - tl.load(VR + base + idx, mask=live, other=0.0).to(tl.float32)
            sq_ref += d_ref * d_ref
        d_old = vt - vo
        sq_old += d_old * d_old
        x0_hat = xt - t * vt
        sq_x0 += x0_hat * x0_hat
    # Seven 1-D reductions rather than one over a stacked [BLOCK, 7] tile: the interpreter sums a leading axis
    # sequentially (fp32 error ~ sqrt(BLOCK)·eps, above the 1e-6 the tests hold), a 1-D axis pairwise.
    row = WS + (b * splits + s) * N_SUMS
    tl.store(row + _ABS_POS, tl.sum(abs_pos, axis=0))
    tl.store(row + _SQ_POS, tl.sum(sq_pos, axis=0))
    tl.store(row + _ABS_NEG, tl.sum(abs_neg, axis=0))
    tl.store(row + _SQ_NEG, tl.sum(sq_neg, axis=0))
    tl.store(row + _SQ_REF, tl.sum(sq_ref, axis=0))
    tl.store(row + _SQ_OLD, tl.sum(sq_old, axis=0))
    tl.store(row + _SQ_X0, tl.sum(sq_x0, axis=0))


@triton.jit
def _sample_sums(WS, B, splits, col, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """[BLOCK_B] per-sample totals of workspace column `col` (zero past B), summed over the splits."""
    bo = tl.arange(0, BLOCK_B)
    so = tl.arange(0, BLOCK_S)
    ptrs = WS + (bo[:, None] * splits + so[None, :]) * N_SUMS + col
    live = (bo[:, None] < B) & (so[None, :] < splits)
    return tl.sum(tl.load(ptrs, mask=live, other=0.0), axis=1)


@triton.jit
def _write_outputs(
    WS, R, M, LOSS, POLICY, KL, PER_SAMPLE, OLD_DEV, X0_NORM,
    B, splits, n_f, scale_over_beta, negative_weight, kl_weight, min_err,
    HAS_REF: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per-sample losses and the masked means, from the workspace (one program does this; it is [B]-sized)."""
    bo = tl.arange(0, BLOCK_B)
    live = bo < B
    r = tl.load(R + bo, mask=live, other=0.0).to(tl.float32)
    m = tl.load(M + bo, mask=live, other=0.0).to(tl.float32)
    d_pos = tl.maximum(_sample_sums(WS, B, splits, _ABS_POS, BLOCK_B, BLOCK_S) / n_f, min_err)
    d_neg = tl.maximum(_sample_sums(WS, B, splits, _ABS_NEG, BLOCK_B, BLOCK_S) / n_f, min_err)
    loss_pos = (_sample_sums(WS, B, splits, _SQ_POS, BLOCK_B, BLOCK_S) / n_f) / d_pos
    loss_neg = (_sample_sums(WS, B, splits, _SQ_NEG, BLOCK_B, BLOCK_S) / n_f) / d_neg
    policy = scale_over_beta * (r * loss_pos + negative_weight * (1.0 - r) * loss_neg)
    if HAS_REF:
        kl = kl_weight * (_sample_sums(WS, B, splits, _SQ_REF, BLOCK_B, BLOCK_S) / n_f)
    else:
        kl = tl.full([BLOCK_B], 0.0, tl.float32)
    old_dev = _sample_sums(WS, B, splits, _SQ_OLD, BLOCK_B, BLOCK_S) / n_f
    x0_norm = _sample_sums(WS, B, splits, _SQ_X0, BLOCK_B, BLOCK_S) / n_f
    denom = tl.maximum(tl.sum(m, axis=0), 1.0)  # all-zero mask: a zero loss, not 0/0
    policy_loss = tl.sum(policy * m, axis=0) / denom
    kl_loss = tl.sum(kl * m, axis=0) / denom
    tl.store(LOSS, policy_loss + kl_loss)
    tl.store(POLICY, policy_loss)
    tl.store(KL, kl_loss)
    tl.store(PER_SAMPLE + bo, policy + kl, mask=live)
    tl.store(OLD_DEV, tl.sum(old_dev * m, axis=0) / denom)
    tl.store(X0_NORM, tl.sum(x0_norm * m, axis=0) / denom)


@triton.jit
def _nft_loss_finalize_kernel(
    VT, VO, XT, X0, VR,  # [B, n] inputs as in launch 1
    T, R, M,  # [B] σ, optimality probability, fp32 0/1 mask
    RP, RK,  # [B] fp32 routes of the policy and KL terms (only with ROUTES)
    WS,  # [B, splits, 7] fp32 from launch 1
    G,  # [B, n] gradient for v_θ, in v_θ's dtype (only with WRITE_GRAD)
    LOSS, POLICY, KL, PER_SAMPLE, OLD_DEV, X0_NORM,  # fp32 scalars and [B] (only with WRITE_OUTPUTS)
    B, n, chunk, splits,
    n_f, beta, one_minus_beta, one_plus_beta, scale_over_beta, two_scale_over_n, negative_weight, kl_weight,
    two_kl_over_n, min_err,
    HAS_REF: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_OUTPUTS: tl.constexpr, ROUTES: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # store bf16 with a hand-written round-to-nearest-even (the interpreter truncates)
    BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    if WRITE_OUTPUTS:
        if (pid_b == 0) & (pid_s == 0):
            _write_outputs(WS, R, M, LOSS, POLICY, KL, PER_SAMPLE, OLD_DEV, X0_NORM,
                           B, splits, n_f, scale_over_beta, negative_weight, kl_weight, min_err,
                           HAS_REF, BLOCK_B, BLOCK_S)
    if WRITE_GRAD:
        b = B - 1 - pid_b  # reverse of launch 1's order: its last chunks are the ones still in L2
        s = splits - 1 - pid_s
        # Σ|e⁺| and Σ|e⁻| of sample b: a [2, BLOCK_S] tile of the workspace, one reduction, split in two.
        so = tl.arange(0, BLOCK_S)[None, :]
        pair = _ABS_POS + (_ABS_NEG - _ABS_POS) * tl.arange(0, 2)[:, None]  # [2, 1] column indices
        tile = tl.load(WS + (b * splits + so) * N_SUMS + pair, mask=so < splits, other=0.0)
        abs_pos, abs_neg = tl.split(tl.sum(tile, axis=1))
        d_pos = tl.maximum(abs_pos / n_f, min_err)
        d_neg = tl.maximum(abs_neg / n_f, min_err)
        t = tl.load(T + b).to(tl.float32)
        r = tl.load(R + b).to(tl.float32)
        if ROUTES:
            route_policy = tl.load(RP + b)
            route_kl = tl.load(RK + b)
        else:  # d loss / d per_sample[b] = m_b / max(Σm, 1), summed in the same order as in _write_outputs
            bo = tl.arange(0, BLOCK_B)
            denom = tl.maximum(tl.sum(tl.load(M + bo, mask=bo < B, other=0.0), axis=0), 1.0)
            route_policy = tl.load(M + b) / denom
            route_kl = route_policy
        coef = two_scale_over_n * t * route_policy
        c_pos = coef * r / d_pos
        c_neg = coef * negative_weight * (1.0 - r) / d_neg
        c_ref = two_kl_over_n * route_kl
        base = b.to(tl.int64) * n
        start = s * chunk
        end = tl.minimum(start + chunk, n)
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            live = idx < end
            vt = tl.load(VT + base + idx, mask=live, other=0.0).to(tl.float32)
            vo = tl.load(VO + base + idx, mask=live, other=0.0).to(tl.float32)
            xt = tl.load(XT + base + idx, mask=live, other=0.0).to(tl.float32)
            x0 = tl.load(X0 + base + idx, mask=live, other=0.0).to(tl.float32)
            e_pos = (xt - t * (beta * vt + one_minus_beta * vo)) - x0
            e_neg = (xt - t * (one_plus_beta * vo - beta * vt)) - x0
            grad = c_neg * e_neg - c_pos * e_pos
            if HAS_REF:
                grad += c_ref * (vt - tl.load(VR + base + idx, mask=live, other=0.0).to(tl.float32))
            if ROUND_BF16:
                bits = grad.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round half to even on the 16 dropped bits
                tl.store(G + base + idx, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=live)
            else:
                tl.store(G + base + idx, grad.to(G.dtype.element_ty), mask=live)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> contiguous [B, n] (no copy when already contiguous)."""
    return x.contiguous().view(x.shape[0], -1)


def _launch(v_theta, v_old, x_t, x0, t, r, mask, v_ref, route_policy, route_kl, grad, outputs, *, beta, loss_scale,
            kl_weight, negative_weight, min_x0_error, config):
    batch = v_theta.shape[0]
    n = v_theta[0].numel()
    cfg = config or nft_loss_config(n, batch)
    vt, vo, xt, x0f = _flat(v_theta), _flat(v_old), _flat(x_t), _flat(x0)
    has_ref = v_ref is not None and kl_weight != 0.0
    vr = _flat(v_ref) if has_ref else vt  # any valid pointer; never read without HAS_REF
    t, r = t.contiguous(), r.contiguous()
    ws = torch.empty((batch, cfg.splits, N_SUMS.value), device=v_theta.device, dtype=torch.float32)
    branch = dict(beta=float(beta), one_minus_beta=1.0 - beta, one_plus_beta=1.0 + beta)
    _nft_loss_partials_kernel[(batch, cfg.splits)](
        vt, vo, xt, x0f, vr, t, ws, n, cfg.chunk, cfg.splits, **branch,
        HAS_REF=has_ref, BLOCK=cfg.block, num_warps=cfg.num_warps,
    )
    write_grad = grad is not None
    write_outputs = outputs is not None
    routes = route_policy is not None
    dummy = ws  # stands in for pointers a constexpr branch never touches
    outs = outputs if write_outputs else (dummy,) * 6
    _nft_loss_finalize_kernel[(batch, cfg.splits) if write_grad else (1, 1)](
        vt, vo, xt, x0f, vr, t, r, mask.contiguous(),
        route_policy.contiguous() if routes else dummy, route_kl.contiguous() if routes else dummy,
        ws, grad.view(batch, n) if write_grad else dummy, *outs,
        batch, n, cfg.chunk, cfg.splits, float(n), **branch,
        scale_over_beta=loss_scale / beta, two_scale_over_n=2.0 * loss_scale / n,
        negative_weight=float(negative_weight), kl_weight=float(kl_weight), two_kl_over_n=2.0 * kl_weight / n,
        min_err=float(min_x0_error),
        HAS_REF=has_ref, WRITE_GRAD=write_grad, WRITE_OUTPUTS=write_outputs, ROUTES=routes,
        ROUND_BF16=_INTERPRETED and write_grad and grad.dtype == torch.bfloat16,
        BLOCK=cfg.block, BLOCK_B=triton.next_power_of_2(batch), BLOCK_S=triton.next_power_of_2(cfg.splits),
        num_warps=cfg.num_warps,
    )


def nft_loss_forward(
    v_theta, v_old, x_t, x0, t, r, mask, v_ref, *, beta: float, loss_scale: float, kl_weight: float,
    negative_weight: float, want_grad: bool, min_x0_error: float = 1e-5, config: NFTLossConfig | None = None,
) -> tuple[torch.Tensor, ...]:
    """Loss outputs, plus ∂loss/∂v_θ when `want_grad`, in two launches.

    Shapes/dtypes: v_theta, v_old, x_t, x0, v_ref (optional) [B, ...] fp16/bf16/fp32 (same shape, dtypes may mix);
    t, r [B] float; mask [B] fp32 0/1. `min_x0_error` is the floor of d± (nftcore.ops.reference.MIN_X0_ERROR).

    Returns the six outputs in NFTLossOutput order (loss, policy_loss, kl_loss [] fp32, per_sample [B] fp32,
    old_deviate, x0_norm [] fp32), then grad: v_theta's shape and dtype when `want_grad`, else an empty [0] tensor
    (nothing written).
    """
    dev = v_theta.device
    outputs = tuple(torch.empty((), device=dev, dtype=torch.float32) for _ in range(3))
    outputs += (torch.empty((v_theta.shape[0],), device=dev, dtype=torch.float32),)
    outputs += tuple(torch.empty((), device=dev, dtype=torch.float32) for _ in range(2))
    grad = torch.empty(v_theta.shape, device=dev, dtype=v_theta.dtype) if want_grad else None
    _launch(v_theta, v_old, x_t, x0, t, r, mask, v_ref, None, None, grad, outputs, beta=beta, loss_scale=loss_scale,
            kl_weight=kl_weight, negative_weight=negative_weight, min_x0_error=min_x0_error, config=config)
    return outputs + (grad if want_grad else v_theta.new_empty((0,)),)


def nft_loss_backward(
    route_policy, route_kl, v_theta, v_old, x_t, x0, t, r, mask, v_ref, *, beta: float, loss_scale: float,
    kl_weight: float, negative_weight: float, min_x0_error: float = 1e-5, config: NFTLossConfig | None = None,
) -> torch.Tensor:
    """Σ_i route_policy[i]·∂policy_i/∂v_θ + route_kl[i]·∂kl_i/∂v_θ (policy_i, kl_i: sample i's unmasked terms), in two
    launches (launch 1 recomputes d±). The general backward: any mix of gradients on loss/policy_loss/kl_loss/per_sample
    reduces to these two fp32 [B] routes. Returns v_theta's shape and dtype."""
    grad = torch.empty(v_theta.shape, device=v_theta.device, dtype=v_theta.dtype)
    _launch(v_theta, v_old, x_t, x0, t, r, mask, v_ref, route_policy.float(), route_kl.float(), grad, None,
            beta=beta, loss_scale=loss_scale, kl_weight=kl_weight, negative_weight=negative_weight,
            min_x0_error=min_x0_error, config=config)
    return grad
