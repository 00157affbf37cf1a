"""`attention`: non-causal multi-head attention for the MMDiT blocks of FLUX.1-Kontext and Qwen-Image-Edit, with the
interleaved-pair RoPE and a key padding mask folded in, as one traceable op.

Layout is `[B, N, H, D]` (what a Linear's output reshapes to), so the model never transposes. Defined once as
`torch.library.custom_op`s (forward and backward) with fake implementations, so `torch.compile` and FSDP2 see one
opaque node; behind each, `dispatch` picks the backend per call (the op pattern: docs/DESIGN.md §5):

- Triton (`kernels/attention.py`) on CUDA, or on CPU with `NFTCORE_FORCE_TRITON=1` under `TRITON_INTERPRET=1`
  (fp64, fp32 on CUDA and head dims above 128 have no kernel and run the reference even then);
- the reference otherwise: RoPE in fp32 (cast back to q's dtype, the same rounding as diffusers), then SDPA.
  Its backward uses aten's CPU flash-attention backward when that op exists in this torch (it consumes the forward's
  log-sum-exp), and otherwise (CUDA fallback, a torch without the op) the attention backward written out in fp32 over
  query chunks, recomputing P from the saved log-sum-exp: correctness first, it is the fallback.

Conventions shared by every backend:

- RoPE rotates adjacent pairs `(x[2i], x[2i+1])` by angle θ_i: `out[2i] = x[2i]·cos_i − x[2i+1]·sin_i`,
  `out[2i+1] = x[2i]·sin_i + x[2i+1]·cos_i`. This is diffusers' `apply_rotary_emb(use_real=True,
  use_real_unbind_dim=-1)` (FLUX, cos/sin repeat-interleaved to D) and the complex multiply of Qwen-Image; the tests
  check both. The tables get no gradient (they are constants of the positions).
- `key_padding_mask` is True = attend. A query whose keys are all masked (a batch row with an all-False mask) gets a
  zero output and zero gradients - never NaN - so padded samples in a batch are harmless.
- The log-sum-exp the forward returns is private to the backend's own backward (fp32 [B, H, N_q], fp64 for fp64).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import checks
from .dispatch import Backend, dispatch, record_fallback
from .eager import BackwardOp, ForwardOp

OP = "attention"
ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# aten's CPU flash attention returns (out, logsumexp) and has a matching backward (torch >= 2.3). Checked by name
# and schema, because the private op's signature is not a stable API (another torch version may differ).
_CPU_FLASH_FWD = "_scaled_dot_product_flash_attention_for_cpu"
_CPU_FLASH_BWD = "_scaled_dot_product_flash_attention_for_cpu_backward"
# The generic path computes the log-sum-exp in query chunks with at most this many fp32 scores alive at once
# (2**26 floats = 256 MiB), so the fallback never materialises a full [B, H, N_q, N_k] fp32 tensor.
_LSE_CHUNK_ELEMENTS = 1 << 26


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is fp32 (fp64 for fp64 inputs, so the fp64 test reference keeps its precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _has_cpu_flash() -> bool:
    try:
        fwd = getattr(torch.ops.aten, _CPU_FLASH_FWD).default
        bwd = getattr(torch.ops.aten, _CPU_FLASH_BWD).default
    except (AttributeError, RuntimeError):
        return False
    fwd_args = {a.name for a in fwd._schema.arguments}
    bwd_args = [a.name for a in bwd._schema.arguments]
    return {"attn_mask", "scale"} <= fwd_args and bwd_args[:6] == ["grad_out", "query", "key", "value", "out",
                                                                   "logsumexp"] and "attn_mask" in bwd_args


# Module-level so a test can force the generic path on CPU.
USE_CPU_FLASH = _has_cpu_flash()


# ----------------------------------------------------------------------------------------------------------------
# RoPE (reference): interleaved pairs, computed in fp32 (fp64 for fp64 inputs) and cast back.


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D/2] or [B, N, D/2] → broadcastable against [B, N, H, D/2]: [1|B, N, 1, D/2] in the compute dtype."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return cos[:, :, None, :].to(cd), sin[:, :, None, :].to(cd)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate adjacent pairs of x [B, N, H, D] by θ (or −θ when `inverse`, which is also the rotation's backward:
    the transpose of a rotation is its inverse). Math in fp32 (fp64 for fp64), result in x's dtype."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    c, s = _rope_tables(cos, sin, cd)
    if inverse:
        s = -s
    # As one complex multiply (x[2i] + i·x[2i+1])·(cos + i·sin): a single fused kernel instead of four products
    # and a stack - an order of magnitude faster on CPU, and bit-identical.
    pairs = torch.view_as_complex(x.to(cd).unflatten(-1, (-1, 2)).contiguous())  # [B, N, H, D/2] complex
    out = torch.view_as_real(pairs * torch.complex(c, s)).flatten(-2)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reference backend.


def _alive_and_mask(mask: torch.Tensor | None, batch: int):
    """(alive [B] bool or None, the mask SDPA sees as [B, 1, 1, N_k] or None).

    A batch row with every key masked has no softmax; SDPA's answer for it varies by backend and version (NaN for
    some), so such rows attend to every key instead and their output (and incoming gradient) is zeroed afterwards.
    No host sync: everything stays a tensor op."""
    if mask is None:
        return None, None
    alive = mask.any(dim=-1)  # [B]
    effective = mask | ~alive[:, None]  # [B, N_k]
    return alive, effective[:, None, None, :]


def _bhnd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [B, N, H, D] -> [B, H, N, D] view, what SDPA and aten expect


def _cpu_flash_mask(mask4: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # aten's CPU flash kernel takes an additive mask in the query's dtype (a bool mask is rejected).
    if mask4 is None:
        return None
    return torch.zeros(mask4.shape, dtype=dtype, device=mask4.device).masked_fill(~mask4, float("-inf"))


def _chunked_lse(q: torch.Tensor, k: torch.Tensor, mask4: torch.Tensor | None, scale: float) -> torch.Tensor:
    """logsumexp_j(scale·q_i·k_j) over attended keys, [B, H, N_q] in fp32 (fp64 for fp64); q, k in [B, H, N, D]."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = max(1, _LSE_CHUNK_ELEMENTS // max(1, batch * heads * n_k))
    parts = []
    for start in range(0, n_q, rows):
        s = torch.matmul(q[:, :, start:start + rows].to(cd), k.to(cd).transpose(-1, -2)) * scale  # [B, H, rows, N_k]
        if mask4 is not None:
            s = s.masked_fill(~mask4, float("-inf"))
        parts.append(torch.logsumexp(s, dim=-1))
    return torch.cat(parts, dim=-1)


def _chunked_backward(grad_out, q, k, v, out, lse, mask4, scale):
    """The attention backward written out, all [B, H, N, D], recomputing P = exp(scale·QKᵀ − lse) per query chunk:

        Δ = rowsum(dO ∘ O),  dV = Pᵀ·dO,  dS = P ∘ (dO·Vᵀ − Δ),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q

    Written out rather than recomputed under autograd because autograd does not record inside a custom op's
    implementation (the dispatcher is already below the Autograd key there), so `enable_grad` has no effect."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc, doc = q.to(cd), k.to(cd), v.to(cd), grad_out.to(cd)
    delta = (doc * out.to(cd)).sum(-1, keepdim=True)  # [B, H, N_q, 1]
    dq = torch.empty_like(qc)
    dk, dv = torch.zeros_like(kc), torch.zeros_like(vc)
    rows = max(1, _LSE_CHUNK_ELEMENTS // max(1, batch * heads * n_k))
    for start in range(0, n_q, rows):
        sl = slice(start, start + rows)
        s = torch.matmul(qc[:, :, sl], kc.transpose(-1, -2)) * scale  # [B, H, rows, N_k]
        if mask4 is not None:
            s = s.masked_fill(~mask4, float("-inf"))
        p = torch.exp(s - lse[:, :, sl, None].to(cd))
        dv += torch.matmul(p.transpose(-1, -2), doc[:, :, sl])
        ds = p * (torch.matmul(doc[:, :, sl], vc.transpose(-1, -2)) - delta[:, :, sl])
        dq[:, :, sl] = torch.matmul(ds, kc) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc[:, :, sl]) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _reference_core(q, k, v, alive, mask4, scale):
    """Attention on already-rotated [B, N, H, D] inputs → (out [B, N_q, H, D] contiguous, lse [B, H, N_q])."""
    qt, kt, vt = _bhnd(q), _bhnd(k), _bhnd(v)
    if USE_CPU_FLASH and q.device.type == "cpu":
        fwd = getattr(torch.ops.aten, _CPU_FLASH_FWD).default
        out, lse = fwd(qt, kt, vt, 0.0, False, attn_mask=_cpu_flash_mask(mask4, q.dtype), scale=scale)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask4, scale=scale)
        lse = _chunked_lse(qt, kt, mask4, scale)
    out = out.transpose(1, 2)  # [B, N_q, H, D]
    if alive is not None:
        out = out * alive.view(-1, 1, 1, 1).to(out.dtype)
    return out.contiguous(), lse.contiguous()


def _reference_forward(q, k, v, mask, cos, sin, scale, deterministic):
    if cos is not None:
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
    alive, mask4 = _alive_and_mask(mask, q.shape[0])
    return _reference_core(q, k, v, alive, mask4, scale)


def _reference_backward(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic):
    if cos is not None:
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
    alive, mask4 = _alive_and_mask(mask, q.shape[0])
    if alive is not None:
        grad_out = grad_out * alive.view(-1, 1, 1, 1).to(grad_out.dtype)  # dead rows: zero out, zero gradients
    if USE_CPU_FLASH and q.device.type == "cpu":
        bwd = getattr(torch.ops.aten, _CPU_FLASH_BWD).default
        dq, dk, dv = bwd(
            _bhnd(grad_out), _bhnd(q), _bhnd(k), _bhnd(v), _bhnd(out), lse, 0.0, False,
            attn_mask=_cpu_flash_mask(mask4, q.dtype), scale=scale,
        )
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    else:
        dq, dk, dv = (x.transpose(1, 2) for x in _chunked_backward(
            _bhnd(grad_out), _bhnd(q), _bhnd(k), _bhnd(v), _bhnd(out), lse, mask4, scale))
    if cos is not None:  # the gradients arrived in the rotated basis; rotate them back (−θ)
        dq, dk = rotate_pairs(dq, cos, sin, inverse=True), rotate_pairs(dk, cos, sin, inverse=True)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Triton backend (loaded lazily so `TRITON_INTERPRET` can be set first).


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()  # the kernels take any strides but a unit one on D


def _kernel_covers(q: torch.Tensor) -> bool:
    """Whether the Triton kernels take these inputs; the reference serves the rest even on the Triton backend:
    fp64 (a test dtype), fp32 on CUDA (no GPU configuration: IEEE fp32 dots spill; fp32 runs the kernels only
    under the interpreter) and head dims above the shipped configurations (> 128)."""
    from nftcore.kernels.attention import GPU_DTYPES, KERNEL_DTYPES, MAX_HEAD_DIM, padded_head_dim

    dtypes = KERNEL_DTYPES if q.device.type == "cpu" else GPU_DTYPES
    return q.dtype in dtypes and padded_head_dim(q.shape[-1]) <= MAX_HEAD_DIM


def _triton_forward_impl():
    from nftcore.kernels.attention import attention_forward

    def impl(q, k, v, mask, cos, sin, scale, deterministic):
        if not _kernel_covers(q):
            record_fallback(OP)
            return _reference_forward(q, k, v, mask, cos, sin, scale, deterministic)
        return attention_forward(_unit_last(q), _unit_last(k), _unit_last(v), mask, cos, sin, scale)

    return impl


def _triton_backward_impl():
    from nftcore.kernels.attention import attention_backward

    def impl(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic):
        if not _kernel_covers(q):
            record_fallback(OP)
            return _reference_backward(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic)
        q, k, v, grad_out, out = (_unit_last(x) for x in (q, k, v, grad_out, out))
        return attention_backward(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic=deterministic)

    return impl


_FORWARD_IMPLS = {Backend.REFERENCE: lambda: _reference_forward, Backend.TRITON: _triton_forward_impl}
_BACKWARD_IMPLS = {Backend.REFERENCE: lambda: _reference_backward, Backend.TRITON: _triton_backward_impl}


# ----------------------------------------------------------------------------------------------------------------
# The custom ops.


@torch.library.custom_op("nftcore::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(q, k, v, mask, cos, sin, scale, deterministic)


def _attention_forward(q, k, v, mask, cos, sin, scale, deterministic):
    """The op's body: (out, lse) from the backend dispatch picks."""
    return dispatch(OP, q.device, _FORWARD_IMPLS)(q, k, v, mask, cos, sin, scale, deterministic)


@_attention_op.register_fake
def _(q, k, v, mask, cos, sin, scale, deterministic):
    batch, n_q, heads, _ = q.shape
    lse = q.new_empty((batch, heads, n_q), dtype=lse_dtype(q.dtype))
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@torch.library.custom_op("nftcore::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_backward(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic)


def _attention_backward(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic):
    """The backward op's body: (dq, dk, dv) from the backend dispatch picks."""
    impl = dispatch(OP + "_backward", q.device, _BACKWARD_IMPLS)
    return impl(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, mask, cos, sin, scale, deterministic):
    fmt = torch.contiguous_format
    return torch.empty_like(q, memory_format=fmt), torch.empty_like(k, memory_format=fmt), torch.empty_like(
        v, memory_format=fmt
    )


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cos, sin, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cos, sin)
    ctx.scale, ctx.deterministic = scale, deterministic


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask, cos, sin = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # `.sum().backward()` hands in an expanded, stride-0 gradient; the kernels want real strides.
    grad_out = grad_out.contiguous()
    dq, dk, dv = _ATTENTION_BACKWARD(grad_out, q, k, v, out, lse, mask, cos, sin, ctx.scale, ctx.deterministic,
                                     tensors=(grad_out, q, k, v, out, lse, mask, cos, sin))
    return (
        dq,
        dk,
        dv,
        None,  # key_padding_mask: boolean, no gradient
        None,  # rope cos: a constant table of the positions
        None,  # rope sin: idem
        None,  # scale: a Python float
        None,  # deterministic: a flag
    )


_attention_op.register_autograd(_backward, setup_context=_setup_context)
_ATTENTION = ForwardOp("AttentionFunction", _attention_op, _attention_forward, _setup_context, _backward)
_ATTENTION_BACKWARD = BackwardOp(_attention_backward_op, _attention_backward)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.


def _check_inputs(q, k, v, key_padding_mask, rope, scale) -> None:
    for name, x in dict(q=q, k=k, v=v).items():
        checks.check_tensor(OP, name, x)
        if x.dim() != 4:
            raise ValueError(f"{OP}: `{name}` must be [B, N, H, D] (rank 4), got {checks.shape_str(x)}")
        if x.dtype not in ATTN_DTYPES:
            raise ValueError(f"{OP}: `{name}` must be float16/bfloat16/float32/float64, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{OP}: `q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{OP}: `k` {checks.shape_str(k)} and `v` {checks.shape_str(v)} must have the same shape")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            f"{OP}: `q` {checks.shape_str(q)} and `k` {checks.shape_str(k)} must agree on B, H and D "
            "([B, N_q, H, D] vs [B, N_k, H, D])"
        )
    batch, n_q, _, head_dim = q.shape
    n_k = k.shape[1]
    named = dict(q=q, k=k, v=v)
    if key_padding_mask is not None:
        checks.check_tensor(OP, "key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"{OP}: `key_padding_mask` must be bool (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (batch, n_k):
            raise ValueError(
                f"{OP}: `key_padding_mask` must be [B, N_k] = [{batch}, {n_k}], "
                f"got {checks.shape_str(key_padding_mask)}"
            )
        named["key_padding_mask"] = key_padding_mask
    if rope is not None:
        if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            raise ValueError(f"{OP}: `rope` must be a (cos, sin) pair of tensors, got {type(rope).__name__}")
        cos, sin = rope
        checks.check_tensor(OP, "rope[0] (cos)", cos)
        checks.check_tensor(OP, "rope[1] (sin)", sin)
        if head_dim % 2:
            raise ValueError(f"{OP}: RoPE rotates pairs, so D must be even; got D={head_dim}")
        if n_q != n_k:
            raise ValueError(f"{OP}: `rope` needs N_q == N_k (one position per token), got {n_q} and {n_k}")
        allowed = ((n_q, head_dim // 2), (batch, n_q, head_dim // 2))
        for name, t in (("rope[0] (cos)", cos), ("rope[1] (sin)", sin)):
            checks.check_float(OP, name, t)
            if tuple(t.shape) not in allowed:
                raise ValueError(
                    f"{OP}: `{name}` must be [N, D/2] = [{n_q}, {head_dim // 2}] or [B, N, D/2] = "
                    f"[{batch}, {n_q}, {head_dim // 2}], got {checks.shape_str(t)}"
                )
        if cos.shape != sin.shape:
            raise ValueError(f"{OP}: rope cos {checks.shape_str(cos)} and sin {checks.shape_str(sin)} must match")
        named |= {"rope[0] (cos)": cos, "rope[1] (sin)": sin}
    checks.check_same_device(OP, **named)
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{OP}: `scale` must be a finite positive number, got {scale!r}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """softmax(RoPE(q)·RoPE(k)ᵀ·scale + mask)·v, non-causal, in the `[B, N, H, D]` layout.

    Args:
        q: [B, N_q, H, D] float16/bfloat16/float32 (float64 for tests).
        k, v: [B, N_k, H, D], q's dtype; N_k may differ from N_q (e.g. cross-attention), unless `rope` is given.
        key_padding_mask: [B, N_k] bool, True = attend. A batch row with no attended key yields zeros (output and
            gradients), never NaN.
        rope: (cos, sin), each [N, D/2] or [B, N, D/2] (any float dtype; math in fp32), rotating the interleaved
            pairs (q[2i], q[2i+1]) and (k[2i], k[2i+1]) by θ_i. Needs N_q == N_k == N and even D.
        scale: softmax scale, default D**-0.5.
        deterministic: ask for a bitwise run-to-run reproducible backward. Both backends already are (the Triton
            backward computes dQ in its own kernel, without atomics; the reference has no atomics), so today the
            flag changes nothing; it exists so a faster atomic dQ path can be added without an API change.

    Returns:
        [B, N_q, H, D] in q's dtype, contiguous.
    """
    _check_inputs(q, k, v, key_padding_mask, rope, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    cos, sin = (None, None) if rope is None else (rope[0].detach(), rope[1].detach())
    mask = None if key_padding_mask is None else key_padding_mask.detach()
    out, _lse = _ATTENTION(q, k, v, mask, cos, sin, scale, bool(deterministic), tensors=(q, k, v, mask, cos, sin))
    return out
