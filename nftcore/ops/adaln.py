"""`adaln`, `gated_residual`, `gated_adaln`: the element-wise glue of an MMDiT block as traceable ops.

What the blocks of FLUX.1(-Kontext) and Qwen-Image(-Edit) compute around their GEMMs (x [B, N, C]; per-sample
modulation vectors scale, shift, gate [B, C] broadcast over the N tokens; LayerNorm without affine, eps 1e-6 in both
families):

    adaln(x, scale, shift)                  = LayerNorm(x) · (1 + scale) + shift            (AdaLN-Zero modulation)
    gated_residual(x, gate, y)              = x + gate · y                                  (gated residual)
    gated_adaln(x, gate, y, scale, shift)   = (h, adaln(h, scale, shift)) with h = x + gate · y

`gated_adaln` is the double-stream block's "attention output gate, then the MLP's norm"; `gated_residual` closes
every block. Each op is a pair of `torch.library.custom_op`s (forward, backward) with fake implementations, so
`torch.compile` and FSDP2 see one opaque node each; behind each, `dispatch` picks the backend per call (the op
pattern: docs/DESIGN.md §5):

- Triton (`kernels/adaln.py`) on CUDA, or on CPU with `NFTCORE_FORCE_TRITON=1` under `TRITON_INTERPRET=1`: one pass
  forward (x, y read once; h, out written once) and one pass backward per op (fp32 math, inputs upcast at the load);
  the [B, C] gradients are per-program fp32 partial sums reduced by one `sum` (deterministic, no atomics).
- native C++ (`csrc/block_ops.cpp`) for CPU tensors when `nftcore._C` is built (the default on CPU): one pass per row
  forward and backward, the same formulas as the Triton kernels, fp32 math, rows spread over ATen's threads; the
  [B, C] gradients are per-piece fp32 sums added in index order (bit-identical for any thread count). fp64 inputs
  (any of them) and empty ones go to the reference, recorded by `dispatch.record_fallback`.
- the reference otherwise (and for fp64 and empty inputs): aten's fused LayerNorm kernels. Forward: one sample, or
  fp16/bf16 - `native_layer_norm(x[b], weight=1 + scale[b], bias=shift[b])` per sample (the modulation as its fp32
  affine, one pass, one rounding); fp32/fp64 batches - one batched LayerNorm and the modulation in place (one
  buffer). Backward: `native_layer_norm_backward` per sample gives dx, dscale and dshift of a sample in one pass
  (B ≤ `PER_SAMPLE_MAX_BATCH`; the MMDiT's micro-batches are 1-4: aten's LayerNorm has no per-sample affine).
  Larger batches take a batched composite. On CPU the cost of these passes is mostly page faults of fresh
  multi-MB buffers, so the formulations are chosen for the fewest full-size temporaries.

Numerics shared by every backend: all math in fp32 (fp64 for fp64 inputs), each output rounded once to x's dtype;
`h` is rounded to x's dtype before it is normalised (the tensor the next layer sees is the one that was normalised).
scale/shift/gate may have any float dtype; their gradients come back in their own dtypes.

Saved for backward (the "statistics only" rule): `adaln` keeps x, scale and the per-row mean and rstd ([B, N] fp32)
- never the normalised tensor; `gated_adaln` keeps x, gate, y, scale, mean, rstd and recomputes h = x + gate·y in its
backward (x is the block input, kept anyway; h itself is then free once the next layer has consumed it);
`gated_residual` keeps y only when gate needs a gradient and gate only when y does (frozen-modulation LoRA training
keeps neither big tensor).

The native CPU kernels (`nftcore._C`, namespace `nftcore_native`) are the `Backend.NATIVE` entry of each `impls`
mapping below (`dispatch.native_impl`); `_impls_for` keeps fp64 and empty x on the
reference. Each impl - every backend's - is called with exactly the arguments below. Inputs arrive as the model
makes them, possibly non-contiguous (x a token slice of the joint stream, scale/shift/gate chunk views of one [B, 6C]
output with batch stride 6C, stride-0 expanded gradients from `.sum().backward()`): the kernel reads the strides or
copies.
x, y, out, h, dx, dy: [B, N, C] in x's dtype (fp32/bf16/fp16); scale, shift, gate, dscale, dshift, dgate: [B, C], any
float dtype (gradients in their input's dtype); mean, rstd: [B, N] contiguous fp32; outputs are contiguous and never
alias an input or each other; an output whose mask entry is False is returned as an empty tensor of shape [0]:

    adaln_forward(Tensor x, Tensor scale, Tensor shift, float eps) -> (Tensor out, Tensor mean, Tensor rstd)
        out = (x − mean)·rstd·(1 + scale) + shift, in x's dtype; rstd = 1/sqrt(var + eps), biased variance.
    adaln_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor mean, Tensor rstd, bool[3] output_mask)
            -> (Tensor dx, Tensor dscale, Tensor dshift)
        x̂ = (x − mean)·rstd, g = grad_out, w = 1 + scale;
        dx = rstd·(g·w − mean_C(g·w) − x̂·mean_C(g·w·x̂))  (x's dtype),
        dscale = Σ_N g·x̂, dshift = Σ_N g  (scale's / shift's dtype).
    gated_adaln_forward(Tensor x, Tensor gate, Tensor y, Tensor scale, Tensor shift, float eps)
            -> (Tensor h, Tensor out, Tensor mean, Tensor rstd)
        h = round_to_x_dtype(x + gate·y); out, mean, rstd = adaln_forward(h, scale, shift, eps).
    gated_adaln_backward(Tensor? grad_h, Tensor? grad_out, Tensor x, Tensor gate, Tensor y, Tensor scale,
                         Tensor mean, Tensor rstd, bool[5] output_mask)
            -> (Tensor dx, Tensor dgate, Tensor dy, Tensor dscale, Tensor dshift)
        recompute h as in the forward; dh = grad_h + (adaln backward of grad_out at h);
        dx = dh, dy = gate·dh, dgate = Σ_N dh·y, dscale, dshift as in adaln_backward.
    gated_residual_forward(Tensor x, Tensor gate, Tensor y) -> Tensor out          (out = x + gate·y)
    gated_residual_backward(Tensor grad, Tensor? gate, Tensor? y, bool[2] output_mask) -> (Tensor dgate, Tensor dy)
        dgate = Σ_N grad·y (needs y), dy = gate·grad (needs gate); dx = grad is passed through by the autograd glue.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import checks
from .dispatch import Backend, dispatch, native_impl, record_fallback
from .eager import BackwardOp, ForwardOp
from .reference import compute_dtype

ADALN, GATED_RESIDUAL, GATED_ADALN = "adaln", "gated_residual", "gated_adaln"
# Up to this batch the reference loops over samples with aten's fused LayerNorm (per-sample affine); above it, one
# batched composite. Module-level so tests can exercise both paths.
PER_SAMPLE_MAX_BATCH = 8


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n = x.shape[:2]
    return x.new_zeros((batch, n), dtype=_stat_dtype(x)), x.new_zeros((batch, n), dtype=_stat_dtype(x))


def _none() -> torch.Tensor:
    return torch.empty(0)


# ----------------------------------------------------------------------------------------------------------------
# Autograd references: the test oracles (pure PyTorch, autograd differentiates them).


def adaln_reference(x, scale, shift, eps: float = 1e-6):
    """LayerNorm(x)·(1 + scale) + shift in fp32 (fp64 for fp64), rounded once to x's dtype."""
    cd = compute_dtype(x, scale, shift)
    normed = F.layer_norm(x.to(cd), x.shape[-1:], eps=eps)
    return (normed * (1 + scale.to(cd)[:, None]) + shift.to(cd)[:, None]).to(x.dtype)


def gated_residual_reference(x, gate, y):
    cd = compute_dtype(x, gate, y)
    return (x.to(cd) + gate.to(cd)[:, None] * y.to(cd)).to(x.dtype)


def gated_adaln_reference(x, gate, y, scale, shift, eps: float = 1e-6):
    h = gated_residual_reference(x, gate, y)
    return h, adaln_reference(h, scale, shift, eps)


# ----------------------------------------------------------------------------------------------------------------
# Reference backend: the fallback (closed-form backward, aten's fused LayerNorm kernels).


def _per_sample(x: torch.Tensor) -> bool:
    """Loop over samples with aten's fused LayerNorm: CPU (mixed bf16/fp16-with-fp32-affine is a CPU feature) or an
    input already in its compute dtype, and a small batch."""
    return x.shape[0] <= PER_SAMPLE_MAX_BATCH and (x.device.type == "cpu" or x.dtype == _stat_dtype(x))


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


def _adaln_forward_ref(x, scale, shift, eps):
    batch, n, c = x.shape
    if x.numel() == 0:
        return (torch.empty_like(x, memory_format=torch.contiguous_format),) + _empty_stats(x)
    cd = _stat_dtype(x)
    w, b = scale.to(cd) + 1.0, shift.to(cd)
    if batch > 1 and x.dtype == cd:
        # One full-size buffer: aten's LayerNorm with a unit affine (its affine kernel is the fast one on CPU, ~1.8x
        # the no-affine one) and the per-sample modulation in place. Per-sample calls would need a stack: a second
        # buffer, which raised the no-grad peak of the MMDiT.
        out, mean, rstd = torch.native_layer_norm(x, (c,), w.new_ones(c), w.new_zeros(c), eps)
        out = torch.addcmul(b[:, None], out, w[:, None], out=out)
        return out, mean.view(batch, n), rstd.view(batch, n)
    if _per_sample(x):  # one sample, or fp16/bf16 (the fused mixed-dtype affine rounds once)
        parts = [torch.native_layer_norm(x[i], (c,), w[i], b[i], eps) for i in range(batch)]
        return (_stack([p[0] for p in parts]), _stack([p[1] for p in parts]).view(batch, n),
                _stack([p[2] for p in parts]).view(batch, n))
    out, mean, rstd = torch.native_layer_norm(x.to(cd), (c,), None, None, eps)
    out = torch.addcmul(b[:, None], out, w[:, None], out=out)  # in place: one buffer for the normalised tensor
    return out.to(x.dtype), mean.view(batch, n), rstd.view(batch, n)


def _adaln_backward_ref(grad_out, x, scale, mean, rstd, output_mask):
    """(dx, dscale, dshift), each an empty [0] where `output_mask` is False."""
    batch, n, c = x.shape
    want_dx, want_ds, want_db = output_mask
    if x.numel() == 0:
        return (torch.zeros_like(x) if want_dx else _none(), torch.zeros_like(scale) if want_ds else _none(),
                torch.zeros_like(scale) if want_db else _none())
    cd = _stat_dtype(x)
    w = scale.to(cd) + 1.0
    if _per_sample(x):
        mask = [bool(want_dx), bool(want_ds), bool(want_db)]
        parts = [torch.ops.aten.native_layer_norm_backward(grad_out[i], x[i], (c,), mean[i, :, None],
                                                           rstd[i, :, None], w[i], w[i], mask) for i in range(batch)]
        dx = _stack([p[0] for p in parts]) if want_dx else _none()
        dscale = _stack([p[1] for p in parts]).to(scale.dtype) if want_ds else _none()
        dshift = _stack([p[2] for p in parts]).to(scale.dtype) if want_db else _none()
        return dx, dscale, dshift
    g = grad_out.to(cd)
    xhat = (x.to(cd) - mean[..., None]) * rstd[..., None]
    dshift = g.sum(1).to(scale.dtype) if want_db else _none()
    dscale = (g * xhat).sum(1).to(scale.dtype) if want_ds else _none()
    dx = _none()
    if want_dx:
        gw = g * w[:, None]
        dx = gw - gw.mean(-1, keepdim=True)
        dx = dx.sub_(xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(rstd[..., None]).to(x.dtype)
    return dx, dscale, dshift


def _residual_ref(x, gate, y):
    out = torch.addcmul(x, gate[:, None], y)  # fp32 opmath on CPU for bf16/fp16: one rounding
    return out.to(x.dtype)


def _gated_residual_forward_ref(x, gate, y):
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return _residual_ref(x, gate, y)


def _gate_grads(grad, gate, y, want_dgate, want_dy, gate_dtype):
    """dgate = Σ_N grad·y (fp32 accumulation), dy = gate·grad."""
    dgate = torch.sum(grad * y, dim=1, dtype=_stat_dtype(grad)).to(gate_dtype) if want_dgate else _none()
    dy = torch.mul(grad, gate[:, None]).to(grad.dtype) if want_dy else _none()
    return dgate, dy


def _gated_residual_backward_ref(grad, gate, y, output_mask):
    want_dgate, want_dy = output_mask
    batch, _, c = grad.shape
    gate_dtype = gate.dtype if gate is not None else y.dtype
    if grad.numel() == 0:
        return (grad.new_zeros((batch, c), dtype=gate_dtype) if want_dgate else _none(),
                torch.zeros_like(grad) if want_dy else _none())
    return _gate_grads(grad, gate, y, want_dgate, want_dy, gate_dtype)


def _gated_adaln_forward_ref(x, gate, y, scale, shift, eps):
    h = _gated_residual_forward_ref(x, gate, y)
    out, mean, rstd = _adaln_forward_ref(h, scale, shift, eps)
    return h, out, mean, rstd


def _gated_adaln_backward_ref(grad_h, grad_out, x, gate, y, scale, mean, rstd, output_mask):
    want_dx, want_dgate, want_dy, want_ds, want_db = output_mask
    need_dh = want_dx or want_dgate or want_dy
    dh, dscale, dshift = None, _none(), _none()
    if grad_out is not None:
        h = _gated_residual_forward_ref(x, gate, y)  # recomputed, rounded exactly as in the forward
        dh, dscale, dshift = _adaln_backward_ref(grad_out, h, scale, mean, rstd, (need_dh, want_ds, want_db))
        if not need_dh:
            dh = None
    else:
        dscale = torch.zeros_like(scale) if want_ds else _none()
        dshift = torch.zeros_like(scale) if want_db else _none()
    if need_dh:
        if dh is None:  # a fresh contiguous buffer: an op's output must never be (or alias) one of its inputs
            dh = torch.zeros_like(x, memory_format=torch.contiguous_format) if grad_h is None else (
                grad_h.to(x.dtype, memory_format=torch.contiguous_format, copy=True))
        elif grad_h is not None:
            dh = dh.add_(grad_h)
    dgate, dy = (_none(), _none()) if not need_dh else _gate_grads(dh, gate, y, want_dgate, want_dy, gate.dtype)
    return dh if want_dx else _none(), dgate, dy, dscale, dshift


# ----------------------------------------------------------------------------------------------------------------
# Triton backend (loaded lazily so `TRITON_INTERPRET` can be set first).


def _kernel_covers(x: torch.Tensor) -> bool:
    from nftcore.kernels.adaln import KERNEL_DTYPES, MAX_C

    return x.dtype in KERNEL_DTYPES and x.shape[-1] <= MAX_C


def _triton_adaln_forward():
    from nftcore.kernels.adaln import adaln_forward

    def impl(x, scale, shift, eps):
        if not _kernel_covers(x):
            record_fallback(ADALN)
            return _adaln_forward_ref(x, scale, shift, eps)
        _, out, mean, rstd = adaln_forward(x, scale, shift, eps)
        return out, mean, rstd

    return impl


def _triton_adaln_backward():
    from nftcore.kernels.adaln import adaln_backward

    def impl(grad_out, x, scale, mean, rstd, output_mask):
        if not _kernel_covers(x):
            record_fallback(ADALN + "_backward")
            return _adaln_backward_ref(grad_out, x, scale, mean, rstd, output_mask)
        want_dx, want_ds, want_db = output_mask
        dx, _, _, dscale, dshift = adaln_backward(grad_out, None, x, scale, mean, rstd,
                                                  output_mask=(want_dx, False, False, want_ds, want_db))
        return dx, dscale, dshift

    return impl


def _triton_gated_adaln_forward():
    from nftcore.kernels.adaln import adaln_forward

    def impl(x, gate, y, scale, shift, eps):
        if not _kernel_covers(x):
            record_fallback(GATED_ADALN)
            return _gated_adaln_forward_ref(x, gate, y, scale, shift, eps)
        return adaln_forward(x, scale, shift, eps, gate=gate, y=y)

    return impl


def _triton_gated_adaln_backward():
    from nftcore.kernels.adaln import adaln_backward

    def impl(grad_h, grad_out, x, gate, y, scale, mean, rstd, output_mask):
        if not _kernel_covers(x):
            record_fallback(GATED_ADALN + "_backward")
            return _gated_adaln_backward_ref(grad_h, grad_out, x, gate, y, scale, mean, rstd, output_mask)
        return adaln_backward(grad_out, grad_h, x, scale, mean, rstd, gate=gate, y=y, output_mask=output_mask)

    return impl


def _triton_gated_residual_forward():
    from nftcore.kernels.adaln import gated_residual_forward

    def impl(x, gate, y):
        if not _kernel_covers(x):
            record_fallback(GATED_RESIDUAL)
            return _gated_residual_forward_ref(x, gate, y)
        return gated_residual_forward(x, gate, y)

    return impl


def _triton_gated_residual_backward():
    from nftcore.kernels.adaln import gated_residual_backward

    def impl(grad, gate, y, output_mask):
        if not _kernel_covers(grad):
            record_fallback(GATED_RESIDUAL + "_backward")
            return _gated_residual_backward_ref(grad, gate, y, output_mask)
        return gated_residual_backward(grad, gate, y, output_mask)

    return impl


# ----------------------------------------------------------------------------------------------------------------
# Native CPU backend (csrc/block_ops.cpp; the module is loaded by the dispatcher before these loaders run).

# One entry per backend (see the module docstring for the signatures).
ADALN_FORWARD_IMPLS = {Backend.REFERENCE: lambda: _adaln_forward_ref, Backend.TRITON: _triton_adaln_forward,
                       Backend.NATIVE: native_impl("adaln_forward", ADALN, _adaln_forward_ref, 0)}
ADALN_BACKWARD_IMPLS = {Backend.REFERENCE: lambda: _adaln_backward_ref, Backend.TRITON: _triton_adaln_backward,
                        Backend.NATIVE: native_impl("adaln_backward", ADALN + "_backward", _adaln_backward_ref, 1)}
GATED_ADALN_FORWARD_IMPLS = {
    Backend.REFERENCE: lambda: _gated_adaln_forward_ref, Backend.TRITON: _triton_gated_adaln_forward,
    Backend.NATIVE: native_impl("gated_adaln_forward", GATED_ADALN, _gated_adaln_forward_ref, 0)}
GATED_ADALN_BACKWARD_IMPLS = {
    Backend.REFERENCE: lambda: _gated_adaln_backward_ref, Backend.TRITON: _triton_gated_adaln_backward,
    Backend.NATIVE: native_impl("gated_adaln_backward", GATED_ADALN + "_backward", _gated_adaln_backward_ref, 2)}
GATED_RESIDUAL_FORWARD_IMPLS = {
    Backend.REFERENCE: lambda: _gated_residual_forward_ref, Backend.TRITON: _triton_gated_residual_forward,
    Backend.NATIVE: native_impl("gated_residual_forward", GATED_RESIDUAL, _gated_residual_forward_ref, 0)}
GATED_RESIDUAL_BACKWARD_IMPLS = {
    Backend.REFERENCE: lambda: _gated_residual_backward_ref, Backend.TRITON: _triton_gated_residual_backward,
    Backend.NATIVE: native_impl("gated_residual_backward", GATED_RESIDUAL + "_backward",
                                 _gated_residual_backward_ref, 0)}


def _impls_for(impls, x: torch.Tensor):
    """fp64 (gradcheck, oracles) and empty inputs are the reference's alone: the kernels accumulate in fp32, which
    would silently lower an fp64 caller's precision, and an empty tensor has no grid."""
    if x.dtype == torch.float64 or x.numel() == 0:
        return {Backend.REFERENCE: impls[Backend.REFERENCE]}
    return impls


# ----------------------------------------------------------------------------------------------------------------
# The custom ops.


def _fake_stats(x):
    return x.new_empty(x.shape[:2], dtype=_stat_dtype(x)), x.new_empty(x.shape[:2], dtype=_stat_dtype(x))


def _fake_like(x, want: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format) if want else x.new_empty((0,))


@torch.library.custom_op("nftcore::adaln", mutates_args=())
def _adaln_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _adaln_forward(x, scale, shift, eps)


def _adaln_forward(x, scale, shift, eps):
    return dispatch(ADALN, x.device, _impls_for(ADALN_FORWARD_IMPLS, x))(x, scale, shift, eps)


@_adaln_op.register_fake
def _(x, scale, shift, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),) + _fake_stats(x)


@torch.library.custom_op("nftcore::adaln_backward", mutates_args=())
def _adaln_backward_op(grad_out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                       rstd: torch.Tensor, output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _adaln_backward_body(grad_out, x, scale, mean, rstd, output_mask)


def _adaln_backward_body(grad_out, x, scale, mean, rstd, output_mask):
    impl = dispatch(ADALN + "_backward", x.device, _impls_for(ADALN_BACKWARD_IMPLS, x))
    return impl(grad_out, x, scale, mean, rstd, tuple(output_mask))


@_adaln_backward_op.register_fake
def _(grad_out, x, scale, mean, rstd, output_mask):
    want_dx, want_ds, want_db = output_mask
    return _fake_like(x, want_dx), _fake_like(scale, want_ds), _fake_like(scale, want_db)


def _adaln_setup(ctx, inputs, output):
    x, scale, shift, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _adaln_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if grad_out is None or not any(mask):
        return None, None, None, None
    dx, dscale, dshift = _ADALN_BACKWARD(grad_out, x, scale, mean, rstd, mask, tensors=(grad_out, x, scale, mean, rstd))
    return (dx if mask[0] else None, dscale if mask[1] else None, dshift if mask[2] else None,
            None)  # eps: a Python float


_adaln_op.register_autograd(_adaln_backward, setup_context=_adaln_setup)
_ADALN = ForwardOp("AdaLNFunction", _adaln_op, _adaln_forward, _adaln_setup, _adaln_backward)
_ADALN_BACKWARD = BackwardOp(_adaln_backward_op, _adaln_backward_body)


@torch.library.custom_op("nftcore::gated_adaln", mutates_args=())
def _gated_adaln_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_adaln_forward(x, gate, y, scale, shift, eps)


def _gated_adaln_forward(x, gate, y, scale, shift, eps):
    return dispatch(GATED_ADALN, x.device, _impls_for(GATED_ADALN_FORWARD_IMPLS, x))(x, gate, y, scale, shift, eps)


@_gated_adaln_op.register_fake
def _(x, gate, y, scale, shift, eps):
    like = torch.empty_like(x, memory_format=torch.contiguous_format)
    return (like, torch.empty_like(like)) + _fake_stats(x)


@torch.library.custom_op("nftcore::gated_adaln_backward", mutates_args=())
def _gated_adaln_backward_op(
    grad_h: torch.Tensor | None, grad_out: torch.Tensor | None, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
    scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gated_adaln_backward_body(grad_h, grad_out, x, gate, y, scale, mean, rstd, output_mask)


def _gated_adaln_backward_body(grad_h, grad_out, x, gate, y, scale, mean, rstd, output_mask):
    impl = dispatch(GATED_ADALN + "_backward", x.device, _impls_for(GATED_ADALN_BACKWARD_IMPLS, x))
    return impl(grad_h, grad_out, x, gate, y, scale, mean, rstd, tuple(output_mask))


@_gated_adaln_backward_op.register_fake
def _(grad_h, grad_out, x, gate, y, scale, mean, rstd, output_mask):
    want_dx, want_dgate, want_dy, want_ds, want_db = output_mask
    return (_fake_like(x, want_dx), _fake_like(gate, want_dgate), _fake_like(y, want_dy), _fake_like(scale, want_ds),
            _fake_like(scale, want_db))


def _gated_adaln_setup(ctx, inputs, output):
    x, gate, y, scale, shift, eps = inputs
    _, _, mean, rstd = output
    ctx.save_for_backward(x, gate, y, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _gated_adaln_backward(ctx, grad_h, grad_out, _grad_mean, _grad_rstd):
    x, gate, y, scale, mean, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:5])  # x, gate, y, scale, shift
    if (grad_h is None and grad_out is None) or not any(mask):
        return (None,) * 6
    grads = _GATED_ADALN_BACKWARD(grad_h, grad_out, x, gate, y, scale, mean, rstd, mask,
                                  tensors=(grad_h, grad_out, x, gate, y, scale, mean, rstd))
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None,)  # eps: a Python float


_gated_adaln_op.register_autograd(_gated_adaln_backward, setup_context=_gated_adaln_setup)
_GATED_ADALN = ForwardOp("GatedAdaLNFunction", _gated_adaln_op, _gated_adaln_forward, _gated_adaln_setup,
                         _gated_adaln_backward)
_GATED_ADALN_BACKWARD = BackwardOp(_gated_adaln_backward_op, _gated_adaln_backward_body)


@torch.library.custom_op("nftcore::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _gated_residual_forward(x, gate, y)


def _gated_residual_forward(x, gate, y):
    return dispatch(GATED_RESIDUAL, x.device, _impls_for(GATED_RESIDUAL_FORWARD_IMPLS, x))(x, gate, y)


@_gated_residual_op.register_fake
def _(x, gate, y):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nftcore::gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(grad: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor | None,
                                output_mask: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
    return _gated_residual_backward_body(grad, gate, y, output_mask)


def _gated_residual_backward_body(grad, gate, y, output_mask):
    impl = dispatch(GATED_RESIDUAL + "_backward", grad.device, _impls_for(GATED_RESIDUAL_BACKWARD_IMPLS, grad))
    return impl(grad, gate, y, tuple(output_mask))


@_gated_residual_backward_op.register_fake
def _(grad, gate, y, output_mask):
    want_dgate, want_dy = output_mask
    batch, _, c = grad.shape
    dtype = gate.dtype if gate is not None else grad.dtype
    return (grad.new_empty((batch, c), dtype=dtype) if want_dgate else grad.new_empty((0,)),
            _fake_like(grad, want_dy))


def _gated_residual_setup(ctx, inputs, output):
    x, gate, y = inputs
    _, want_dgate, want_dy = ctx.needs_input_grad[:3]
    # Only what a wanted gradient needs: dgate = Σ grad·y needs y, dy = gate·grad needs gate.
    ctx.save_for_backward(gate if want_dy else None, y if want_dgate else None)
    ctx.gate_dtype = gate.dtype
    ctx.set_materialize_grads(False)


def _gated_residual_backward(ctx, grad):
    gate, y = ctx.saved_tensors
    want_dx, want_dgate, want_dy = ctx.needs_input_grad[:3]
    if grad is None:
        return None, None, None
    dgate = dy = None
    if want_dgate or want_dy:
        dgate, dy = _GATED_RESIDUAL_BACKWARD(grad, gate, y, [want_dgate, want_dy], tensors=(grad, gate, y))
    return (grad if want_dx else None, dgate if want_dgate else None, dy if want_dy else None)


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)
_GATED_RESIDUAL = ForwardOp("GatedResidualFunction", _gated_residual_op, _gated_residual_forward,
                            _gated_residual_setup, _gated_residual_backward)
_GATED_RESIDUAL_BACKWARD = BackwardOp(_gated_residual_backward_op, _gated_residual_backward_body)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points.


def _check_stream(op: str, x) -> None:
    checks.check_tensor(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"{op}: `x` must be [B, N, C] (rank 3), got {checks.shape_str(x)}")
    checks.check_float(op, "x", x)


def _check_vectors(op: str, x, **vectors) -> None:
    batch, _, c = x.shape
    for name, v in vectors.items():
        checks.check_tensor(op, name, v)
        checks.check_float(op, name, v)
        if v.shape != (batch, c):
            raise ValueError(f"{op}: `{name}` must be [B, C] = [{batch}, {c}] (one vector per sample of `x`), "
                             f"got {checks.shape_str(v)}")


def _check_y(op: str, x, y) -> None:
    checks.check_tensor(op, "y", y)
    checks.check_same_shape(op, "x", x, y=y)
    if y.dtype != x.dtype:
        raise ValueError(f"{op}: `y` must have x's dtype {x.dtype}, got {y.dtype}")


def _check_eps(op: str, eps) -> float:
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: `eps` must be a finite number >= 0, got {eps!r}")
    return eps


def adaln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x)·(1 + scale) + shift: AdaLN modulation, LayerNorm without affine over the last dim.

    Args:
        x: [B, N, C] float16/bfloat16/float32 (float64 for tests); any batch/token strides.
        scale, shift: [B, C], any float dtype, broadcast over the N tokens.
        eps: LayerNorm epsilon (FLUX and Qwen-Image: 1e-6).

    Returns:
        [B, N, C] in x's dtype, contiguous. Math in fp32; saves only per-row mean/rstd (plus x and scale).
    """
    _check_stream(ADALN, x)
    _check_vectors(ADALN, x, scale=scale, shift=shift)
    checks.check_same_device(ADALN, x=x, scale=scale, shift=shift)
    out, _mean, _rstd = _ADALN(x, scale, shift, _check_eps(ADALN, eps), tensors=(x, scale, shift))
    return out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate·y with gate [B, C] broadcast over the tokens: the gated residual that closes an MMDiT block.

    Args:
        x, y: [B, N, C], one float dtype; gate: [B, C], any float dtype.

    Returns:
        [B, N, C] in x's dtype, contiguous (math in fp32, one rounding).
    """
    _check_stream(GATED_RESIDUAL, x)
    _check_y(GATED_RESIDUAL, x, y)
    _check_vectors(GATED_RESIDUAL, x, gate=gate)
    checks.check_same_device(GATED_RESIDUAL, x=x, gate=gate, y=y)
    return _GATED_RESIDUAL(x, gate, y, tensors=(x, gate, y))


def gated_adaln(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + gate·y and adaln(h, scale, shift, eps) in one op (the double block's attention gate, then its MLP
    norm). Returns (h, out), both [B, N, C] in x's dtype; h is rounded to x's dtype before it is normalised.

    Memory: saves x, y, gate, scale and the per-row statistics; h is recomputed in backward, so the caller need not
    keep it once its consumers are done."""
    _check_stream(GATED_ADALN, x)
    _check_y(GATED_ADALN, x, y)
    _check_vectors(GATED_ADALN, x, gate=gate, scale=scale, shift=shift)
    checks.check_same_device(GATED_ADALN, x=x, gate=gate, y=y, scale=scale, shift=shift)
    h, out, _mean, _rstd = _GATED_ADALN(x, gate, y, scale, shift, _check_eps(GATED_ADALN, eps),
                                        tensors=(x, gate, y, scale, shift))
    return h, out
