"""AdaLN modulation and gated residuals of MMDiT blocks in Triton: one pass forward, one pass backward per op.

Design anchors: Liger-Kernel's LayerNorm (a program owns whole rows, statistics in fp32 registers, the weight
gradient as per-program partial sums reduced afterwards) with the modulation vectors per sample instead of per
channel. x is [B, N, C] (unit stride on C, any batch/token strides), scale/shift/gate [B, C].

- `_adaln_fwd_kernel`, grid (⌈N / BLOCK_R⌉, B): a [BLOCK_R, BLOCK_C] tile of rows of one sample; optional gated
  prologue h = round(x + gate·y) (written, and normalised as rounded); mean/var in fp32; out = x̂·(1 + scale) + shift;
  writes out, mean, rstd.
- `_adaln_bwd_kernel`, grid (splits, B): each program walks a contiguous chunk of one sample's rows, recomputes x̂
  (and h) from the saved mean/rstd, writes dx (dh = adaln backward + grad_h in the gated form; then dy = gate·dh) and
  accumulates Σ g·x̂, Σ g, Σ dh·y in fp32 registers, stored as one row of a [B, splits, 3, C] workspace that a single
  `sum` reduces: deterministic, no atomics, no zero-fill.
- `_gated_residual_fwd_kernel` / `_gated_residual_bwd_kernel`: out = x + gate·y; dy = gate·g and Σ g·y partials.

Every load is upcast to fp32 right after it (the interpreter's bf16 arithmetic is broken; free on a GPU, the kernels
are memory-bound). Under the interpreter fp32 → bf16 casts truncate, so bf16 outputs (and the rounded h) are
rounded to nearest-even by hand there (`ROUND_BF16`). fp64 is not handled here: the ops send it to the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_C = 8192  # one row per tile up to here (FLUX / Qwen-Image: C = 3072)
# H100 SXM has 132 SMs; two resident programs per SM keep every SM streaming while the other waits on memory.
_TARGET_PROGRAMS = 2 * 132
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def block_config(c: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_R, num_warps) for rows of C channels: a tile of ~2048 elements (one row from C = 2048 up),
    16 fp32 elements per thread per tensor in the forward. The backward keeps three [BLOCK_C] fp32 accumulators and
    more live tiles, so it gets twice the warps (sm_90 AOT, C = 3072, gated, every gradient: 210 registers per thread
    at 8 warps, 85 at 16 - twice the resident warps per SM, no spills either way)."""
    block_c = max(16, triton.next_power_of_2(c))
    block_r = max(1, min(16, 2048 // block_c))
    tile = block_c * block_r
    num_warps = 4 if tile <= 2048 else 8 if tile <= 4096 else 16
    return block_c, block_r, min(16, 2 * num_warps) if backward else num_warps


def split_config(n: int, batch: int, block_r: int) -> tuple[int, int]:
    """(splits, chunk) for the backward: `splits` programs per sample, each owning `chunk` rows (a multiple of
    BLOCK_R), about _TARGET_PROGRAMS programs in all when N allows."""
    tiles = triton.cdiv(max(n, 1), block_r)
    splits = max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, max(batch, 1))))
    chunk = triton.cdiv(tiles, splits) * block_r
    return triton.cdiv(max(n, 1), chunk), chunk


@triton.jit
def _round(v, DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 `v` rounded to DTYPE (nearest-even) and back to fp32."""
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(DTYPE).to(tl.float32)


@triton.jit
def _store(ptr, v, mask, ROUND_BF16: tl.constexpr):
    """Store fp32 `v` in the pointer's dtype, rounding to nearest-even by hand for bf16 under the interpreter."""
    if ROUND_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_fwd_kernel(
    X, Y, GATE, SCALE, SHIFT,  # x, y [B, N, C] (row strides below, unit stride on C); gate/scale/shift [B, C]
    H, OUT, MEAN, RSTD,  # h, out [B, N, C] contiguous (h only with GATED); mean, rstd [B, N] fp32
    N, C, sxb, sxn, syb, syn, sgb, ssb, stb,
    eps,
    GATED: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    live_r = rows < N
    live_c = cols < C
    live = live_r[:, None] & live_c[None, :]
    x = tl.load(X + b * sxb + rows[:, None] * sxn + cols[None, :], mask=live, other=0.0).to(tl.float32)
    dense = (b * N + rows)[:, None] * C + cols[None, :]
    if GATED:
        gate = tl.load(GATE + b * sgb + cols, mask=live_c, other=0.0).to(tl.float32)
        y = tl.load(Y + b * syb + rows[:, None] * syn + cols[None, :], mask=live, other=0.0).to(tl.float32)
        x = _round(x + gate[None, :] * y, H.dtype.element_ty, ROUND_BF16)  # normalise h as the caller sees it
        _store(H + dense, x, live, ROUND_BF16)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(live, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    scale = tl.load(SCALE + b * ssb + cols, mask=live_c, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * stb + cols, mask=live_c, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    _store(OUT + dense, out, live, ROUND_BF16)
    tl.store(MEAN + b * N + rows, mean, mask=live_r)
    tl.store(RSTD + b * N + rows, rstd, mask=live_r)


@triton.jit
def _adaln_bwd_kernel(
    DOUT, DH, X, Y, GATE, SCALE, MEAN, RSTD,  # DOUT: grad of out; DH: grad of h (gated form); as in the forward
    DX, DY, WS,  # dx (dh in the gated form), dy [B, N, C] contiguous; WS [B, splits, 3, C] fp32 partial sums
    N, C, chunk, splits,
    sdb, sdn, shb, shn, sxb, sxn, syb, syn, sgb, ssb,
    GATED: tl.constexpr, HAS_DOUT: tl.constexpr, HAS_DH: tl.constexpr, WANT_DX: tl.constexpr,
    WANT_DY: tl.constexpr, WANT_DGATE: tl.constexpr, WANT_DMOD: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    live_c = cols < C
    w = 1.0 + tl.load(SCALE + b * ssb + cols, mask=live_c, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * sgb + cols, mask=live_c, other=0.0).to(tl.float32)  # unused without GATED
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_gate = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = s.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, N)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        live_r = rows < end
        live = live_r[:, None] & live_c[None, :]
        dh = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        if GATED:
            y = tl.load(Y + b * syb + rows[:, None] * syn + cols[None, :], mask=live, other=0.0).to(tl.float32)
        if HAS_DOUT:
            x = tl.load(X + b * sxb + rows[:, None] * sxn + cols[None, :], mask=live, other=0.0).to(tl.float32)
            if GATED:
                x = _round(x + gate[None, :] * y, DX.dtype.element_ty, ROUND_BF16)  # h, exactly as the forward
            mean = tl.load(MEAN + b * N + rows, mask=live_r, other=0.0)
            rstd = tl.load(RSTD + b * N + rows, mask=live_r, other=0.0)
            xhat = tl.where(live, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = tl.load(DOUT + b * sdb + rows[:, None] * sdn + cols[None, :], mask=live, other=0.0).to(tl.float32)
            if WANT_DMOD:
                acc_scale += tl.sum(g * xhat, axis=0)
                acc_shift += tl.sum(g, axis=0)
            gw = g * w[None, :]
            c1 = tl.sum(gw, axis=1) / C
            c2 = tl.sum(gw * xhat, axis=1) / C
            dh = tl.where(live, (gw - c1[:, None] - xhat * c2[:, None]) * rstd[:, None], 0.0)
        if HAS_DH:
            dh += tl.load(DH + b * shb + rows[:, None] * shn + cols[None, :], mask=live, other=0.0).to(tl.float32)
        dense = (b * N + rows)[:, None] * C + cols[None, :]
        if WANT_DX:
            _store(DX + dense, dh, live, ROUND_BF16)
        if GATED:
            if WANT_DY:
                _store(DY + dense, dh * gate[None, :], live, ROUND_BF16)
            if WANT_DGATE:
                acc_gate += tl.sum(dh * y, axis=0)
    ws = WS + ((b * splits + s) * 3) * C + cols
    tl.store(ws, acc_scale, mask=live_c)
    tl.store(ws + C, acc_shift, mask=live_c)
    tl.store(ws + 2 * C, acc_gate, mask=live_c)


@triton.jit
def _gated_residual_fwd_kernel(
    X, Y, GATE, OUT, N, C, sxb, sxn, syb, syn, sgb,
    ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    live_c = cols < C
    live = (rows < N)[:, None] & live_c[None, :]
    x = tl.load(X + b * sxb + rows[:, None] * sxn + cols[None, :], mask=live, other=0.0).to(tl.float32)
    y = tl.load(Y + b * syb + rows[:, None] * syn + cols[None, :], mask=live, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * sgb + cols, mask=live_c, other=0.0).to(tl.float32)
    _store(OUT + (b * N + rows)[:, None] * C + cols[None, :], x + gate[None, :] * y, live, ROUND_BF16)


@triton.jit
def _gated_residual_bwd_kernel(
    G, Y, GATE, DY, WS,  # G: grad of out; DY [B, N, C] contiguous; WS [B, splits, C] fp32 partial Σ g·y
    N, C, chunk, splits, sgrb, sgrn, syb, syn, sgb,
    WANT_DY: tl.constexpr, WANT_DGATE: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    live_c = cols < C
    if WANT_DY:
        gate = tl.load(GATE + b * sgb + cols, mask=live_c, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = s.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, N)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        live = (rows < end)[:, None] & live_c[None, :]
        g = tl.load(G + b * sgrb + rows[:, None] * sgrn + cols[None, :], mask=live, other=0.0).to(tl.float32)
        if WANT_DY:
            _store(DY + (b * N + rows)[:, None] * C + cols[None, :], g * gate[None, :], live, ROUND_BF16)
        if WANT_DGATE:
            y = tl.load(Y + b * syb + rows[:, None] * syn + cols[None, :], mask=live, other=0.0).to(tl.float32)
            acc += tl.sum(g * y, axis=0)
    if WANT_DGATE:
        tl.store(WS + (b * splits + s) * C + cols, acc, mask=live_c)


# ---------------------------------------------------------------------------------------------------------------
# Launchers.


def _unit_c(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/token strides but a unit one on C (`.sum().backward()` hands in stride-0 grads)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x: torch.Tensor, *vectors: torch.Tensor) -> None:
    if x.dim() != 3 or x.dtype not in KERNEL_DTYPES or x.shape[-1] > MAX_C:
        raise ValueError(f"adaln kernel: x must be [B, N, C ≤ {MAX_C}] fp16/bf16/fp32, got {list(x.shape)} {x.dtype}")
    for v in vectors:
        if v is not None and v.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"adaln kernel: modulation vectors must be [B, C], got {list(v.shape)}")


def _round_bf16(x: torch.Tensor) -> bool:
    return _INTERPRETED and x.dtype == torch.bfloat16


def adaln_forward(x, scale, shift, eps, *, gate=None, y=None):
    """(h, out, mean, rstd): h = x + gate·y (None without gate), out = LayerNorm(h or x)·(1 + scale) + shift.

    x, y: [B, N, C] fp16/bf16/fp32 (y in x's dtype); scale, shift, gate: [B, C] any float dtype. Outputs are
    contiguous in x's dtype; mean, rstd [B, N] fp32."""
    gated = gate is not None
    _check(x, scale, shift, gate)
    batch, n, c = x.shape
    x, scale, shift = _unit_c(x), _unit_c(scale), _unit_c(shift)
    y = _unit_c(y) if gated else x
    gate = _unit_c(gate) if gated else scale
    out = torch.empty((batch, n, c), device=x.device, dtype=x.dtype)
    h = torch.empty_like(out) if gated else out
    mean = torch.empty((batch, n), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_c, block_r, warps = block_config(c)
    _adaln_fwd_kernel[(triton.cdiv(n, block_r), batch)](
        x, y, gate, scale, shift, h, out, mean, rstd,
        n, c, x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), scale.stride(0), shift.stride(0),
        float(eps),
        GATED=gated, ROUND_BF16=_round_bf16(x), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return (h if gated else None), out, mean, rstd


def adaln_backward(grad_out, grad_h, x, scale, mean, rstd, *, gate=None, y=None, output_mask=(True,) * 5):
    """(dx, dgate, dy, dscale, dshift) of `adaln_forward`; an entry whose `output_mask` flag is False is an empty
    [0] tensor. grad_out and grad_h (gated form only) may be None (no gradient reached that output)."""
    gated = gate is not None
    want_dx, want_dgate, want_dy, want_ds, want_db = (bool(m) for m in output_mask)
    if not gated:
        want_dgate = want_dy = False
    _check(x, scale, gate)
    batch, n, c = x.shape
    x, scale, mean, rstd = _unit_c(x), _unit_c(scale), mean.contiguous(), rstd.contiguous()
    y = _unit_c(y) if gated else x
    gate = _unit_c(gate) if gated else scale
    has_dout, has_dh = grad_out is not None, grad_h is not None and gated
    dout = _unit_c(grad_out) if has_dout else x
    dh_in = _unit_c(grad_h) if has_dh else x
    dx = torch.empty((batch, n, c), device=x.device, dtype=x.dtype) if want_dx else None
    dy = torch.empty((batch, n, c), device=x.device, dtype=x.dtype) if want_dy else None
    block_c, block_r, warps = block_config(c, backward=True)
    splits, chunk = split_config(n, batch, block_r)
    ws = torch.empty((batch, splits, 3, c), device=x.device, dtype=torch.float32)
    _adaln_bwd_kernel[(splits, batch)](
        dout, dh_in, x, y, gate, scale, mean, rstd, dx if want_dx else x, dy if want_dy else x, ws,
        n, c, chunk, splits,
        dout.stride(0), dout.stride(1), dh_in.stride(0), dh_in.stride(1), x.stride(0), x.stride(1),
        y.stride(0), y.stride(1), gate.stride(0), scale.stride(0),
        GATED=gated, HAS_DOUT=has_dout, HAS_DH=has_dh, WANT_DX=want_dx, WANT_DY=want_dy,
        WANT_DGATE=want_dgate, WANT_DMOD=want_ds or want_db, ROUND_BF16=_round_bf16(x),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    def empty() -> torch.Tensor:  # a masked-out gradient: a fresh [0] tensor each (returns must not alias)
        return x.new_empty((0,))

    def total(col: int, dtype: torch.dtype) -> torch.Tensor:  # one fresh [B, C] per gradient: returns never alias
        return ws[:, :, col].sum(1).to(dtype)

    return (dx if want_dx else empty(),
            total(2, gate.dtype) if want_dgate else empty(),  # Σ dh·y
            dy if want_dy else empty(),
            total(0, scale.dtype) if want_ds else empty(),  # Σ g·x̂
            total(1, scale.dtype) if want_db else empty())  # Σ g


def gated_residual_forward(x, gate, y):
    """x + gate·y: x, y [B, N, C] (one dtype), gate [B, C] -> contiguous [B, N, C] in x's dtype."""
    _check(x, gate)
    batch, n, c = x.shape
    x, y, gate = _unit_c(x), _unit_c(y), _unit_c(gate)
    out = torch.empty((batch, n, c), device=x.device, dtype=x.dtype)
    block_c, block_r, warps = block_config(c)
    _gated_residual_fwd_kernel[(triton.cdiv(n, block_r), batch)](
        x, y, gate, out, n, c, x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0),
        ROUND_BF16=_round_bf16(x), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return out


def gated_residual_backward(grad, gate, y, output_mask=(True, True)):
    """(dgate, dy) of x + gate·y for the incoming `grad` [B, N, C]; dgate needs y, dy needs gate (either may be None
    when its gradient is not wanted)."""
    want_dgate, want_dy = (bool(m) for m in output_mask)
    _check(grad)
    batch, n, c = grad.shape
    grad = _unit_c(grad)
    y = _unit_c(y) if want_dgate else grad
    gate_dtype = gate.dtype if gate is not None else y.dtype
    gate = _unit_c(gate) if want_dy else grad.new_empty((batch, c))
    dy = torch.empty((batch, n, c), device=grad.device, dtype=grad.dtype) if want_dy else grad.new_empty((0,))
    block_c, block_r, warps = block_config(c, backward=True)
    splits, chunk = split_config(n, batch, block_r)
    ws = torch.empty((batch, splits, c) if want_dgate else (1,), device=grad.device, dtype=torch.float32)
    _gated_residual_bwd_kernel[(splits, batch)](
        grad, y, gate, dy if want_dy else grad, ws, n, c, chunk, splits,
        grad.stride(0), grad.stride(1), y.stride(0), y.stride(1), gate.stride(0),
        WANT_DY=want_dy, WANT_DGATE=want_dgate, ROUND_BF16=_round_bf16(grad),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )
    return (ws.sum(1).to(gate_dtype) if want_dgate else grad.new_empty((0,))), dy
