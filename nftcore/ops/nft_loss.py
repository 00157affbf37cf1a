"""`nft_loss`: the DiffusionNFT objective (ALGORITHM.md §1.2) as one traceable op.

Defined once as `torch.library.custom_op`s (forward and backward) with fake implementations, so `torch.compile` and
FSDP2 see a single opaque node; behind each, `dispatch` picks the backend. The reference backend is the forward of
`reference.nft_loss_reference` plus a closed-form backward that recomputes the branch errors instead of keeping them:

    ∂loss/∂v_θ[i] = (2·t_i·S/n)·c_i·(−r_i·e⁺_i/d⁺_i + w·(1−r_i)·e⁻_i/d⁻_i) + kl_weight·c'_i·2·(v_θ − v_ref)_i/n

with S = loss_scale, w = negative_weight, n the elements per sample, d the detached mean |e| per branch and c_i the
incoming gradient routed to sample i (β cancels between the 1/β scale and ∂v±/∂v_θ = ±β).
"""

from __future__ import annotations

import torch

from . import checks
from .dispatch import Backend, dispatch
from .reference import MIN_X0_ERROR, NFTLossOutput, compute_dtype, nft_loss_reference

OP = "nft_loss"


def _reference_forward(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight):
    out = nft_loss_reference(
        v_theta, v_old, x_t, x0, t, r, beta=beta, loss_scale=loss_scale, mask=mask, v_ref=v_ref,
        kl_weight=kl_weight, negative_weight=negative_weight,
    )
    return tuple(out)


def _reference_backward(
    grad_loss, grad_policy, grad_kl, grad_per_sample,
    v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight,
):
    cd = compute_dtype(v_theta, v_old, x_t, x0, v_ref)
    batch = v_theta.shape[0]
    dims = tuple(range(1, v_theta.dim()))
    view = (batch,) + (1,) * (v_theta.dim() - 1)
    n = v_theta[0].numel()

    v, v_o, xt, x0c = v_theta.to(cd), v_old.to(cd), x_t.to(cd), x0.to(cd)
    tt, rr, m = t.to(cd), r.to(cd), mask.to(cd)
    denom = m.sum().clamp_min(1.0)
    # d(masked_mean)/d(per-sample value) = m_i/denom; per_sample feeds both terms directly.
    route_policy = (grad_loss.to(cd) + grad_policy.to(cd)) * m / denom + grad_per_sample.to(cd)
    route_kl = (grad_loss.to(cd) + grad_kl.to(cd)) * m / denom + grad_per_sample.to(cd)

    def normalised_error(v_branch: torch.Tensor) -> torch.Tensor:
        err = (xt - tt.view(view) * v_branch) - x0c
        return err / err.abs().mean(dims, keepdim=True).clamp_min(MIN_X0_ERROR)

    pos = normalised_error(beta * v + (1.0 - beta) * v_o)
    neg = normalised_error((1.0 + beta) * v_o - beta * v)
    coef = (2.0 * loss_scale / n) * tt * route_policy  # [B]
    grad = coef.view(view) * (negative_weight * (1.0 - rr).view(view) * neg - rr.view(view) * pos)
    if v_ref is not None and kl_weight != 0.0:
        grad = grad + ((2.0 * kl_weight / n) * route_kl).view(view) * (v - v_ref.to(cd))
    return grad.to(v_theta.dtype)


_FORWARD_IMPLS = {Backend.REFERENCE: lambda: _reference_forward}
_BACKWARD_IMPLS = {Backend.REFERENCE: lambda: _reference_backward}


@torch.library.custom_op("nftcore::nft_loss", mutates_args=())
def _nft_loss_op(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    mask: torch.Tensor,
    v_ref: torch.Tensor | None,
    beta: float,
    loss_scale: float,
    kl_weight: float,
    negative_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = dispatch(OP, v_theta.device, _FORWARD_IMPLS)
    return impl(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight)


@_nft_loss_op.register_fake
def _(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight):
    cd = compute_dtype(v_theta, v_old, x_t, x0, v_ref)
    scalar = lambda: v_theta.new_empty((), dtype=cd)  # noqa: E731
    return scalar(), scalar(), scalar(), v_theta.new_empty((v_theta.shape[0],), dtype=cd), scalar(), scalar()


@torch.library.custom_op("nftcore::nft_loss_backward", mutates_args=())
def _nft_loss_backward_op(
    grad_loss: torch.Tensor,
    grad_policy: torch.Tensor,
    grad_kl: torch.Tensor,
    grad_per_sample: torch.Tensor,
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    mask: torch.Tensor,
    v_ref: torch.Tensor | None,
    beta: float,
    loss_scale: float,
    kl_weight: float,
    negative_weight: float,
) -> torch.Tensor:
    impl = dispatch(OP + "_backward", v_theta.device, _BACKWARD_IMPLS)
    return impl(
        grad_loss, grad_policy, grad_kl, grad_per_sample,
        v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight,
    )


@_nft_loss_backward_op.register_fake
def _(grad_loss, grad_policy, grad_kl, grad_per_sample, v_theta, *rest):
    return torch.empty_like(v_theta)


def _setup_context(ctx, inputs, output):
    v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight = inputs
    ctx.has_v_ref = v_ref is not None
    saved = (v_theta, v_old, x_t, x0, t, r, mask) + ((v_ref,) if ctx.has_v_ref else ())
    ctx.save_for_backward(*saved)
    ctx.hyper = (beta, loss_scale, kl_weight, negative_weight)


def _backward(ctx, grad_loss, grad_policy, grad_kl, grad_per_sample, _grad_old_deviate, _grad_x0_norm):
    saved = ctx.saved_tensors
    v_theta, v_old, x_t, x0, t, r, mask = saved[:7]
    v_ref = saved[7] if ctx.has_v_ref else None
    zero = v_theta.new_zeros(())
    grad_v_theta = None
    if ctx.needs_input_grad[0]:
        grad_v_theta = _nft_loss_backward_op(
            zero if grad_loss is None else grad_loss,
            zero if grad_policy is None else grad_policy,
            zero if grad_kl is None else grad_kl,
            v_theta.new_zeros((v_theta.shape[0],)) if grad_per_sample is None else grad_per_sample,
            v_theta, v_old, x_t, x0, t, r, mask, v_ref, *ctx.hyper,
        )
    # Only v_theta is trained: v_old, x_t, x0, t, r, mask, v_ref and the four hyper-parameters get no gradient.
    return (grad_v_theta,) + (None,) * 11


_nft_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, kl_weight) -> None:
    named = dict(v_theta=v_theta, v_old=v_old, x_t=x_t, x0=x0, t=t, r=r)
    if mask is not None:
        named["mask"] = mask
    if v_ref is not None:
        named["v_ref"] = v_ref
    for name, x in named.items():
        checks.check_tensor(OP, name, x)
    if v_theta.dim() < 2:
        raise ValueError(f"{OP}: `v_theta` must be [B, ...] with at least 2 dims, got {checks.shape_str(v_theta)}")
    big = dict(v_old=v_old, x_t=x_t, x0=x0) | ({"v_ref": v_ref} if v_ref is not None else {})
    checks.check_same_shape(OP, "v_theta", v_theta, **big)
    for name in ("v_theta", *big, "t", "r"):
        checks.check_float(OP, name, named[name])
    batch = v_theta.shape[0]
    for name in ("t", "r") + (("mask",) if mask is not None else ()):
        checks.check_per_sample(OP, name, named[name], batch, "v_theta")
    if mask is not None and mask.dtype != torch.bool:
        checks.check_float(OP, "mask", mask)
    checks.check_same_device(OP, **named)
    if not (beta > 0 and beta == beta and beta != float("inf")):
        raise ValueError(f"{OP}: `beta` (NFT mixing strength) must be a finite positive number, got {beta!r}")
    if not (kl_weight >= 0 and kl_weight != float("inf")):
        raise ValueError(f"{OP}: `kl_weight` must be finite and >= 0, got {kl_weight!r}")
    if kl_weight != 0.0 and v_ref is None:
        raise ValueError(f"{OP}: `kl_weight`={kl_weight} needs `v_ref` (the reference velocity); pass it or set 0")


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    loss_scale: float = 5.0,
    mask: torch.Tensor | None = None,
    v_ref: torch.Tensor | None = None,
    kl_weight: float = 0.0,
    negative_weight: float = 1.0,
) -> NFTLossOutput:
    """DiffusionNFT loss with x0-space adaptive weighting (ALGORITHM.md §1.2). Only `v_theta` receives a gradient.

    Args:
        v_theta: [B, ...] policy velocity (bf16/fp16/fp32/fp64); the same shape for v_old, x_t, x0 and v_ref.
        v_old: rollout-policy velocity (treated as constant).
        x_t: noised sample (1 − t)·x0 + t·ε.
        x0: the rollout's clean sample.
        t: [B] σ in [0, 1], 1 = pure noise (the convention of `velocity_fn(x, sigma)`).
        r: [B] optimality probability in [0, 1] (see `nftcore.nft.rewards_to_optimality`).
        beta: NFT mixing strength β > 0 (v⁺ = β·v_θ + (1−β)·v_old, v⁻ = (1+β)·v_old − β·v_θ).
        loss_scale: multiplies the policy loss (÷β); the trainer passes its A_max (`adv_clip_max`) here.
        mask: [B] bool or 0/1 float; masked-out samples contribute nothing. An all-zero mask gives a zero loss
            that still carries a graph, so distributed backward passes stay in step.
        v_ref: reference (base-model) velocity for the velocity-space L2 regulariser.
        kl_weight: weight of that regulariser (needs `v_ref` when non-zero).
        negative_weight: weight of the negative branch; 0 is the positive-only ablation.

    All arithmetic accumulates in fp32 (fp64 for fp64 inputs); the outputs are in that dtype.
    """
    _check_inputs(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, kl_weight)
    cd = compute_dtype(v_theta, v_old, x_t, x0, v_ref)
    mask_f = torch.ones_like(t, dtype=cd) if mask is None else mask.to(cd)
    if v_ref is not None and kl_weight == 0.0:
        v_ref = None  # nothing to compute, nothing to keep for backward
    outputs = _nft_loss_op(
        v_theta, v_old.detach(), x_t.detach(), x0.detach(), t.detach(), r.detach(), mask_f,
        None if v_ref is None else v_ref.detach(), float(beta), float(loss_scale), float(kl_weight),
        float(negative_weight),
    )
    out = NFTLossOutput(*outputs[:4], outputs[4].detach(), outputs[5].detach())
    if not torch.compiler.is_compiling():
        _check_values(out, v_theta, v_old, x_t, x0, t, r, mask, v_ref)
    return out


def _check_values(out, v_theta, v_old, x_t, x0, t, r, mask, v_ref) -> None:
    """One host sync per call: the per-sample inputs' ranges and the result's finiteness together; the expensive
    search for the culprit runs only when something is wrong."""
    ok = torch.isfinite(out.per_sample).all() & torch.isfinite(out.x0_norm) & torch.isfinite(out.old_deviate)
    ok = ok & ((t >= 0) & (t <= 1)).all() & ((r >= 0) & (r <= 1)).all()
    if mask is not None and mask.dtype != torch.bool:
        ok = ok & ((mask == 0) | (mask == 1)).all()
    if bool(ok):
        return
    checks.check_in_unit_interval(OP, "t", t)
    checks.check_in_unit_interval(OP, "r", r)
    if mask is not None:
        checks.check_binary(OP, "mask", mask)
    checks.raise_first_non_finite(OP, v_theta=v_theta, v_old=v_old, x_t=x_t, x0=x0, v_ref=v_ref)
    raise ValueError(f"{OP}: the loss is not finite although every input is (overflow in {v_theta.dtype}?)")
