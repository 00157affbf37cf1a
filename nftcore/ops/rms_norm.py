"""`rms_norm`: RMSNorm over the last dim with a learned weight, optionally followed by the interleaved-pair RoPE, as
one traceable op - the per-head QK norm of FLUX and Qwen-Image (q, k [B, N, H, D], weight [D], eps 1e-6), and
Qwen-Image's text input norm ([B, Nt, 3584], no RoPE).

    y = RoPE(x · rsqrt(mean(x²) + eps) · weight)

RoPE is the attention op's convention (`nftcore.ops.attention`): adjacent pairs (y[2i], y[2i+1]) turn by θ_i with
tables cos, sin of shape [N, D/2] or [B, N, D/2]; rotating here, right after the norm, lets the model hand already
rotated q and k to `attention(..., rope=None)`, which then keeps no unrotated copies and rotates nothing (on CUDA
that is five fewer [B, N, H, D] passes per attention call: the k rotate-copy of its forward, the q/k re-rotation and
the dq/dk inverse rotation of its backward; the rotation here is free inside the norm's registers).

Defined once as `torch.library.custom_op`s (forward and backward) with fake implementations; behind each, `dispatch`
picks the backend per call (the op pattern: docs/DESIGN.md §5):

- Triton (`kernels/rms_norm.py`) on CUDA, or on CPU with `NFTCORE_FORCE_TRITON=1` under `TRITON_INTERPRET=1`: one
  pass forward (x read through its strides - q and k are views of the fused QKV projection - y written contiguous),
  one pass backward (the inverse rotation of the incoming gradient, then the RMSNorm backward, in registers; dweight
  from per-program fp32 partial sums, deterministic);
- native C++ (`csrc/rms_norm.cpp`) for CPU tensors when `nftcore._C` is built (the default on CPU): one pass per row
  forward and backward (x read through its strides, the rotation in registers), fp32 math; dweight from per-piece
  fp32 sums added in index order (bit-identical for any thread count). fp64 inputs (any of them) and empty ones go
  to the reference, recorded by `dispatch.record_fallback`;
- the reference otherwise (and for fp64 / empty inputs): fp32 math in a few whole-tensor aten ops, RoPE as one
  complex multiply, a closed-form backward that reuses its temporaries in place.

Numerics: math in fp32 (fp64 for fp64), y rounded once to x's dtype (diffusers rounds after the norm and again after
the rotation in bf16; this is at least as accurate). rstd is fp32 (fp64) of shape x.shape[:-1]. The tables get no
gradient.

Saved for backward: x (a view, no copy), weight, rstd and the tables - never the normalised tensor.

The native CPU kernels (`nftcore._C`, namespace `nftcore_native`) are the `Backend.NATIVE` entries of the `impls`
mappings below (`dispatch.native_impl`); `_impls_for` keeps fp64 and empty x on the reference, and each impl - every
backend's - is called with exactly these arguments. Layouts: x [..., D] in fp32/bf16/fp16, possibly non-contiguous
(q and k are strided views of the fused QKV output, [B, N, H, D] with strides (N·3HD, 3HD, D, 1)) - rank 4 whenever
cos/sin are given; grad_y may be a strided slice of a joint gradient or stride-0 expanded; weight [D] any float
dtype; cos, sin [N, D/2] or [B, N, D/2] in any float dtype (the model passes fp32 row slices of its joint table: row
stride D/2, not contiguous over the batch); outputs contiguous, never aliasing an input; masked-out outputs are empty
[0] tensors:

    rms_norm_forward(Tensor x, Tensor weight, Tensor? cos, Tensor? sin, float eps) -> (Tensor y, Tensor rstd)
        rstd = 1/sqrt(mean_D(x²) + eps) (fp32, x.shape[:-1]); n = x·rstd·weight;
        y[2i] = n[2i]·cos_i − n[2i+1]·sin_i, y[2i+1] = n[2i]·sin_i + n[2i+1]·cos_i (or y = n without tables); x's dtype.
    rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd, Tensor? cos, Tensor? sin,
                      bool[2] output_mask) -> (Tensor dx, Tensor dweight)
        g = grad_y rotated by −θ (g = grad_y without tables); x̂ = x·rstd;
        dx = rstd·(g·weight − x̂·mean_D(g·weight·x̂)) (x's dtype); dweight = Σ_rows g·x̂ (weight's dtype).
"""

from __future__ import annotations

import math

import torch

from . import checks
from .dispatch import Backend, dispatch, native_impl, record_fallback
from .eager import BackwardOp, ForwardOp

OP = "rms_norm"


def _cd(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Autograd reference (test oracle).


def rms_norm_reference(x, weight, eps: float = 1e-6, rope=None):
    """x·rsqrt(mean(x²) + eps)·weight, then RoPE, in fp32 (fp64 for fp64), rounded once to x's dtype."""
    cd = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    xc = x.to(cd)
    y = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps) * weight.to(cd)
    if rope is not None:
        c, s = (_table(t, cd) for t in rope)
        even, odd = y[..., 0::2], y[..., 1::2]
        y = torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Reference backend.


def _table(t: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """[N, D/2] or [B, N, D/2] -> [1|B, N, 1, D/2] in the compute dtype, broadcastable over [B, N, H, D/2]."""
    if t.dim() == 2:
        t = t[None]
    return t[:, :, None, :].to(cd)


def _complex_view(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Pairs of x [B, N, H, D] (fp32/fp64, its dtype kept) turned by θ (−θ when `inverse`): one complex multiply,
    an order of magnitude faster on CPU than the four products and a stack of the written-out form."""
    c, s = _table(cos, x.dtype), _table(sin, x.dtype)
    turn = torch.complex(c, -s if inverse else s)
    return torch.view_as_real(_complex_view(x) * turn).flatten(-2)


def _forward_ref(x, weight, cos, sin, eps):
    cd = _cd(x)
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_zeros(x.shape[:-1], dtype=cd)
    xc = x.to(cd)  # no copy for fp32; q/k stay strided views of the QKV output
    # mean(x²) as square + mean: on CPU 2x faster than `linalg.vector_norm` over strided rows.
    rstd = xc.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    y = torch.mul(xc, rstd).mul_(weight.to(cd))
    if cos is not None:
        y = _rotate(y, cos, sin, inverse=False)
    return y.to(x.dtype, memory_format=torch.contiguous_format), rstd.squeeze(-1)


def _backward_ref(grad, x, weight, rstd, cos, sin, output_mask):
    """Closed form with two full-size buffers besides the incoming gradient (on CPU each fresh multi-MB buffer
    costs page faults, which dominate these element-wise passes): g (rotated back, or upcast), x̂, and one
    product buffer gx̂ = g·x̂ that gives dweight (its column sums) and Σ_D g·w·x̂ (a mat-vec with the weight)."""
    want_dx, want_dw = output_mask
    if x.numel() == 0:
        return (torch.zeros_like(x, memory_format=torch.contiguous_format) if want_dx else x.new_empty((0,)),
                torch.zeros_like(weight) if want_dw else x.new_empty((0,)))
    cd = _cd(x)
    d = x.shape[-1]
    w = weight.to(cd)
    r = rstd.unsqueeze(-1).to(cd)
    own = cos is not None or grad.dtype != cd  # g is a temporary of ours (may be overwritten)
    g = _rotate(grad.to(cd), cos, sin, inverse=True) if cos is not None else grad.to(cd)
    xhat = torch.mul(x, r)
    gxhat = torch.mul(g, xhat)
    dw = gxhat.reshape(-1, d).sum(0).to(weight.dtype) if want_dw else x.new_empty((0,))
    dx = x.new_empty((0,))
    if want_dx:
        dot = torch.matmul(gxhat, w).unsqueeze_(-1)  # Σ_D g·w·x̂ per row
        del gxhat
        gw = g.mul_(w) if own else g * w
        dx = gw.addcmul_(xhat, dot, value=-1.0 / d).mul_(r).to(x.dtype, memory_format=torch.contiguous_format)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------------
# Triton backend (loaded lazily so `TRITON_INTERPRET` can be set first).


def _kernel_covers(x: torch.Tensor) -> bool:
    from nftcore.kernels.rms_norm import KERNEL_DTYPES, MAX_D

    return x.dtype in KERNEL_DTYPES and x.shape[-1] <= MAX_D


def _triton_forward_impl():
    from nftcore.kernels.rms_norm import rms_norm_forward

    def impl(x, weight, cos, sin, eps):
        if not _kernel_covers(x):
            record_fallback(OP)
            return _forward_ref(x, weight, cos, sin, eps)
        return rms_norm_forward(x, weight, cos, sin, eps)

    return impl


def _triton_backward_impl():
    from nftcore.kernels.rms_norm import rms_norm_backward

    def impl(grad, x, weight, rstd, cos, sin, output_mask):
        if not _kernel_covers(x):
            record_fallback(OP + "_backward")
            return _backward_ref(grad, x, weight, rstd, cos, sin, output_mask)
        return rms_norm_backward(grad, x, weight, rstd, cos, sin, output_mask)

    return impl


# ----------------------------------------------------------------------------------------------------------------
# Native CPU backend (csrc/rms_norm.cpp; the module is loaded by the dispatcher before these loaders run).


# One entry per backend, with the signatures in the module docstring.
FORWARD_IMPLS = {Backend.REFERENCE: lambda: _forward_ref, Backend.TRITON: _triton_forward_impl,
                 Backend.NATIVE: native_impl("rms_norm_forward", OP, _forward_ref, 0)}
BACKWARD_IMPLS = {Backend.REFERENCE: lambda: _backward_ref, Backend.TRITON: _triton_backward_impl,
                  Backend.NATIVE: native_impl("rms_norm_backward", OP + "_backward", _backward_ref, 1)}


def _impls_for(impls, x: torch.Tensor):
    """fp64 and empty inputs are the reference's alone (see `nftcore.ops.adaln._impls_for`)."""
    if x.dtype == torch.float64 or x.numel() == 0:
        return {Backend.REFERENCE: impls[Backend.REFERENCE]}
    return impls


# ----------------------------------------------------------------------------------------------------------------
# The custom ops.


@torch.library.custom_op("nftcore::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_forward(x, weight, cos, sin, eps)


def _rms_norm_forward(x, weight, cos, sin, eps):
    return dispatch(OP, x.device, _impls_for(FORWARD_IMPLS, x))(x, weight, cos, sin, eps)


@_rms_norm_op.register_fake
def _(x, weight, cos, sin, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=_cd(x))


@torch.library.custom_op("nftcore::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          cos: torch.Tensor | None, sin: torch.Tensor | None,
                          output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_backward_body(grad, x, weight, rstd, cos, sin, output_mask)


def _rms_norm_backward_body(grad, x, weight, rstd, cos, sin, output_mask):
    impl = dispatch(OP + "_backward", x.device, _impls_for(BACKWARD_IMPLS, x))
    return impl(grad, x, weight, rstd, cos, sin, tuple(output_mask))


@_rms_norm_backward_op.register_fake
def _(grad, x, weight, rstd, cos, sin, output_mask):
    want_dx, want_dw = output_mask
    return (torch.empty_like(x, memory_format=torch.contiguous_format) if want_dx else x.new_empty((0,)),
            torch.empty_like(weight) if want_dw else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, cos, sin, eps = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, rstd, cos, sin)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, _grad_rstd):
    x, weight, rstd, cos, sin = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    if grad is None or not any(mask):
        return None, None, None, None, None
    dx, dw = _RMS_NORM_BACKWARD(grad, x, weight, rstd, cos, sin, mask, tensors=(grad, x, weight, rstd, cos, sin))
    return (dx if mask[0] else None, dw if mask[1] else None,
            None, None,  # rope tables: constants of the positions
            None)  # eps: a Python float


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
_RMS_NORM = ForwardOp("RMSNormFunction", _rms_norm_op, _rms_norm_forward, _setup_context, _backward)
_RMS_NORM_BACKWARD = BackwardOp(_rms_norm_backward_op, _rms_norm_backward_body)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point.


def _check_inputs(x, weight, eps, rope) -> None:
    checks.check_tensor(OP, "x", x)
    checks.check_tensor(OP, "weight", weight)
    checks.check_float(OP, "x", x)
    checks.check_float(OP, "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"{OP}: `x` must have at least one dim (the normalised one), got a scalar")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"{OP}: `weight` must be [D] = [{d}] (x's last dim), got {checks.shape_str(weight)}")
    named = dict(x=x, weight=weight)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{OP}: `eps` must be a finite number >= 0, got {eps!r}")
    if rope is not None:
        if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
            raise ValueError(f"{OP}: `rope` must be a (cos, sin) pair of tensors, got {type(rope).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{OP}: with `rope`, `x` must be [B, N, H, D] (rank 4), got {checks.shape_str(x)}")
        if d % 2:
            raise ValueError(f"{OP}: RoPE rotates pairs, so D must be even; got D={d}")
        batch, n = x.shape[:2]
        allowed = ((n, d // 2), (batch, n, d // 2))
        for name, t in (("rope[0] (cos)", rope[0]), ("rope[1] (sin)", rope[1])):
            checks.check_tensor(OP, name, t)
            checks.check_float(OP, name, t)
            if tuple(t.shape) not in allowed:
                raise ValueError(f"{OP}: `{name}` must be [N, D/2] = [{n}, {d // 2}] or [B, N, D/2] = "
                                 f"[{batch}, {n}, {d // 2}], got {checks.shape_str(t)}")
        if rope[0].shape != rope[1].shape:
            raise ValueError(f"{OP}: rope cos {checks.shape_str(rope[0])} and sin {checks.shape_str(rope[1])} must "
                             "match")
        named |= {"rope[0] (cos)": rope[0], "rope[1] (sin)": rope[1]}
    checks.check_same_device(OP, **named)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RoPE(x · rsqrt(mean(x²) + eps) · weight) over the last dim.

    Args:
        x: [..., D] float16/bfloat16/float32 (float64 for tests), any strides (q/k views of a fused QKV output are
            read in place); [B, N, H, D] when `rope` is given.
        weight: [D], any float dtype.
        eps: added to mean(x²) (FLUX and Qwen-Image: 1e-6).
        rope: optional (cos, sin), each [N, D/2] or [B, N, D/2] (any float dtype; math in fp32): rotate the
            interleaved pairs (y[2i], y[2i+1]) by θ_i after the norm, as `attention(rope=...)` would. Needs even D.

    Returns:
        y, x's shape and dtype, contiguous. Gradients reach x and weight (not the tables).
    """
    eps = float(eps)
    _check_inputs(x, weight, eps, rope)
    cos, sin = (None, None) if rope is None else (rope[0].detach(), rope[1].detach())
    y, _rstd = _RMS_NORM(x, weight, cos, sin, eps, tensors=(x, weight, cos, sin))
    return y
