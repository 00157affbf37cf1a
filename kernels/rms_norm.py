"""RMSNorm with a learned weight, optionally followed by the interleaved-pair RoPE, in Triton (the per-head QK norm of
MMDiT blocks): one pass forward, one pass backward.

Design anchor: Liger-Kernel's RMSNorm (programs own whole rows, fp32 statistics, the weight gradient as per-program
partial sums reduced afterwards), extended with the rotation of the attention op (`kernels/attention.py`): adjacent
pairs (y[2i], y[2i+1]) turn by θ_i, split out of the loaded tile with reshape/split/join so loads stay contiguous.

Rows are the [B, N, H] positions of x [B, N, H, D] (unit stride on D, any other strides: q and k are strided views of
the fused QKV projection and are read in place); inputs of another rank are viewed as [1, rows, 1, D]. The RoPE tables
are [N, D/2] or [B, N, D/2] fp32 with any row/batch strides (the model passes row slices of its joint table).

- `_rms_norm_fwd_kernel`, grid ⌈rows / BLOCK_R⌉: y = RoPE(x·rstd·w) written contiguous, rstd [rows] fp32.
- `_rms_norm_bwd_kernel`, grid (splits,): each program walks a contiguous chunk of rows: g = RoPE⁻¹(grad) (−θ),
  x̂ = x·rstd, dx = rstd·(g·w − x̂·mean(g·w·x̂)), and Σ g·x̂ accumulated in fp32 registers into one row of a
  [splits, D] workspace, reduced by one `sum` (deterministic, no atomics).

Loads are upcast to fp32 at once (the interpreter's bf16 arithmetic is broken); bf16 outputs are rounded to
nearest-even by hand under the interpreter, whose casts truncate. fp64 goes to the reference (see the op).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .adaln import _store  # fp32 -> the pointer's dtype, bf16 rounded by hand under the interpreter

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_D = 8192  # one row per tile up to here (QK norm: D = 128; Qwen-Image's text norm: D = 3584)
_TARGET_PROGRAMS = 2 * 132  # two resident programs per H100 SM
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def block_config(d: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, num_warps): tiles of ~2048 elements (16 rows of D = 128), 16 fp32 values per thread in the
    forward; the backward (more live tiles, an accumulator) gets twice the warps, as in `kernels/adaln.py`."""
    block_d = max(16, triton.next_power_of_2(d))
    block_r = max(1, min(64, 2048 // block_d))
    tile = block_d * block_r
    num_warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return block_d, block_r, min(16, 2 * num_warps) if backward else num_warps


def split_config(rows: int, block_r: int) -> tuple[int, int]:
    """(splits, chunk) of the backward: about _TARGET_PROGRAMS programs, each owning `chunk` rows."""
    tiles = triton.cdiv(max(rows, 1), block_r)
    splits = max(1, min(tiles, _TARGET_PROGRAMS))
    chunk = triton.cdiv(tiles, splits) * block_r
    return triton.cdiv(max(rows, 1), chunk), chunk


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, COS, SIN, Y, RSTD,  # x [B, N, H, D] strided; w [D]; tables [B|1, N, D/2]; y contiguous; rstd [rows] fp32
    R, N, H, D, sxb, sxn, sxh, scb, scn,
    eps,
    ROPE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live_r = rows < R
    h = rows % H
    n = (rows // H) % N
    b = rows // (H * N)
    cols = tl.arange(0, BLOCK_D)
    live_c = cols < D
    live = live_r[:, None] & live_c[None, :]
    x = tl.load(X + (b * sxb + n * sxn + h * sxh)[:, None] + cols[None, :], mask=live, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + cols, mask=live_c, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    if ROPE:
        half = tl.arange(0, BLOCK_D // 2)
        tab = (b * scb + n * scn)[:, None] + half[None, :]
        ok = live_r[:, None] & (half[None, :] < D // 2)
        c = tl.load(COS + tab, mask=ok, other=0.0)
        s = tl.load(SIN + tab, mask=ok, other=0.0)
        even, odd = tl.split(tl.reshape(y, (BLOCK_R, BLOCK_D // 2, 2)))
        y = tl.reshape(tl.join(even * c - odd * s, even * s + odd * c), (BLOCK_R, BLOCK_D))
    _store(Y + rows[:, None] * D + cols[None, :], y, live, ROUND_BF16)
    tl.store(RSTD + rows, rstd, mask=live_r)


@triton.jit
def _rms_norm_bwd_kernel(
    G, X, W, RSTD, COS, SIN, DX, WS,  # G: grad of y (strided like x); DX contiguous; WS [splits, D] fp32
    R, N, H, D, chunk, sgb, sgn, sgh, sxb, sxn, sxh, scb, scn,
    ROPE: tl.constexpr, WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    live_c = cols < D
    w = tl.load(W + cols, mask=live_c, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = s.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, R)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        live_r = rows < end
        live = live_r[:, None] & live_c[None, :]
        h = rows % H
        n = (rows // H) % N
        b = rows // (H * N)
        g = tl.load(G + (b * sgb + n * sgn + h * sgh)[:, None] + cols[None, :], mask=live, other=0.0)
        g = g.to(tl.float32)
        if ROPE:  # the gradient of the rotated output, turned back by −θ
            half = tl.arange(0, BLOCK_D // 2)
            tab = (b * scb + n * scn)[:, None] + half[None, :]
            ok = live_r[:, None] & (half[None, :] < D // 2)
            c = tl.load(COS + tab, mask=ok, other=0.0)
            sn = tl.load(SIN + tab, mask=ok, other=0.0)
            even, odd = tl.split(tl.reshape(g, (BLOCK_R, BLOCK_D // 2, 2)))
            g = tl.reshape(tl.join(even * c + odd * sn, odd * c - even * sn), (BLOCK_R, BLOCK_D))
        x = tl.load(X + (b * sxb + n * sxn + h * sxh)[:, None] + cols[None, :], mask=live, other=0.0)
        rstd = tl.load(RSTD + rows, mask=live_r, other=0.0)
        xhat = x.to(tl.float32) * rstd[:, None]
        if WANT_DW:
            acc += tl.sum(g * xhat, axis=0)
        if WANT_DX:
            gw = g * w[None, :]
            dot = tl.sum(gw * xhat, axis=1) / D
            _store(DX + rows[:, None] * D + cols[None, :], (gw - xhat * dot[:, None]) * rstd[:, None], live,
                   ROUND_BF16)
    if WANT_DW:
        tl.store(WS + s * D + cols, acc, mask=live_c)


# ---------------------------------------------------------------------------------------------------------------
# Launchers.


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[B, N, H, D] with unit stride on D; other ranks as a [1, rows, 1, D] view (a copy only if not viewable)."""
    if t.dim() != 4:
        t = t.reshape(1, -1, 1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(cos, sin, device):
    """fp32 tables with unit stride on D/2 and their (batch, row) strides (batch stride 0 for [N, D/2])."""
    if cos is None:
        dummy = torch.empty(1, device=device, dtype=torch.float32)
        return dummy, dummy, 0, 0
    cos, sin = (t.to(device=device, dtype=torch.float32) for t in (cos, sin))
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    scb = cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0
    return cos, sin, scb, cos.stride(-2)


def _round_bf16(x: torch.Tensor) -> bool:
    return _INTERPRETED and x.dtype == torch.bfloat16


def _check(x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES or x.shape[-1] > MAX_D:
        raise ValueError(f"rms_norm kernel: x must be [..., D ≤ {MAX_D}] fp16/bf16/fp32, got {list(x.shape)} "
                         f"{x.dtype}")


def rms_norm_forward(x, weight, cos, sin, eps):
    """(y, rstd): y = RoPE(x·rsqrt(mean(x²) + eps)·weight) contiguous in x's dtype (RoPE only with tables, which
    need x [B, N, H, D]); rstd fp32 of shape x.shape[:-1]."""
    _check(x)
    d = x.shape[-1]
    xr = _as_rows(x)
    batch, n, heads, _ = xr.shape
    rows = batch * n * heads
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    cos_t, sin_t, scb, scn = _tables(cos, sin, x.device)
    block_d, block_r, warps = block_config(d)
    _rms_norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
        xr, weight, cos_t, sin_t, y, rstd,
        rows, n, heads, d, xr.stride(0), xr.stride(1), xr.stride(2), scb, scn, float(eps),
        ROPE=cos is not None, ROUND_BF16=_round_bf16(x), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return y, rstd


def rms_norm_backward(grad, x, weight, rstd, cos, sin, output_mask=(True, True)):
    """(dx, dweight) of `rms_norm_forward` for the incoming `grad` (y's shape); masked-out entries are empty [0]."""
    want_dx, want_dw = (bool(m) for m in output_mask)
    _check(x)
    d = x.shape[-1]
    xr, gr = _as_rows(x), _as_rows(grad)
    batch, n, heads, _ = xr.shape
    rows = batch * n * heads
    rstd = rstd.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype) if want_dx else x.new_empty((0,))
    cos_t, sin_t, scb, scn = _tables(cos, sin, x.device)
    block_d, block_r, warps = block_config(d, backward=True)
    splits, chunk = split_config(rows, block_r)
    ws = torch.empty((splits, d) if want_dw else (1,), device=x.device, dtype=torch.float32)
    _rms_norm_bwd_kernel[(splits,)](
        gr, xr, weight, rstd, cos_t, sin_t, dx if want_dx else xr, ws,
        rows, n, heads, d, chunk, gr.stride(0), gr.stride(1), gr.stride(2), xr.stride(0), xr.stride(1),
        xr.stride(2), scb, scn,
        ROPE=cos is not None, WANT_DX=want_dx, WANT_DW=want_dw, ROUND_BF16=_round_bf16(x),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
    )
    return dx, (ws.sum(0).to(weight.dtype) if want_dw else x.new_empty((0,)))
