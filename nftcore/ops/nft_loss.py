"""`nft_loss`: the DiffusionNFT objective as one traceable op. The math is docs/ALGORITHM.md §1.2, the op pattern
docs/DESIGN.md §5.

Defined once as `torch.library.custom_op`s (forward and backward) with fake implementations, so `torch.compile` and
FSDP2 see a single opaque node; behind each, `dispatch` picks the backend. The reference backend is the forward of
`reference.nft_loss_reference` plus a closed-form backward that recomputes the branch errors instead of keeping them:

    ∂loss/∂v_θ[i] = (2·t_i·S/n)·c_i·(−r_i·e⁺_i/d⁺_i + w·(1−r_i)·e⁻_i/d⁻_i) + kl_weight·c'_i·2·(v_θ − v_ref)_i/n

with S = loss_scale, w = negative_weight, n the elements per sample, d the detached mean |e| per branch and c_i the
incoming gradient routed to sample i (β cancels between the 1/β scale and ∂v±/∂v_θ = ±β).

The Triton backend (`kernels/nft_loss.py`, fp16/bf16/fp32; fp64 always takes the reference) computes the outputs AND
∂loss/∂v_θ (c_i = m_i/max(Σm, 1)) in the forward, in two launches, because `loss` is terminal: the usual backward,
`out.loss.backward()`, then only scales that cached gradient by grad_loss (one elementwise multiply, not another pass
over the inputs). How the backward knows it is in that case without a device sync: the autograd node does not
materialise gradients, so an output nobody differentiated arrives as None. When policy_loss, kl_loss or per_sample
does get a gradient (anything but None), the general closed-form backward above runs instead, exact for every mix
(Triton: the same two kernels again with per-sample routes c_i, c'_i; create_graph=True also takes this path).

The native CPU backend (`csrc/nft_loss.cpp`, `torch.ops.nftcore_native.nft_loss_forward` / `_backward`, fp32/bf16/fp16)
mirrors the Triton kernels formula for formula: the same two passes, the same outputs and cached gradient, fp32
arithmetic (its per-sample totals and the [B]-sized scalars in fp64), summation in fixed pieces so the result does
not depend on the thread count. fp64 and empty inputs go to the reference (recorded: `last_backend` says reference).

The forward writes the cached gradient only when v_θ requires grad under grad mode (`want_grad`). Both backends honour
`want_grad` (the reference evaluates the closed form with grad_loss = 1), so the op's output shapes never depend on the
backend. Memory: the cached gradient is one extra [B, ...] tensor in v_θ's dtype held until backward. The inputs are
kept too (references, not copies): only the general backward needs them, but no one can know at forward time
whether it will run, and dropping them would need a second cached [B, ...] field (the KL part separately) for the
policy/KL split. The gradient is rounded to v_θ's dtype once in the forward and once more after the grad_loss
scaling: within one ulp of a single rounding for bf16/fp16 when grad_loss ≠ 1, exact when grad_loss = 1.
"""

from __future__ import annotations

import torch

from . import checks
from .dispatch import Backend, dispatch, record_fallback
from .reference import MIN_X0_ERROR, NFTLossOutput, compute_dtype, nft_loss_reference

OP = "nft_loss"


def _reference_forward(
    v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight, want_grad,
):
    with torch.no_grad():  # the op's autograd formula is the closed form, never autograd through the reference
        out = nft_loss_reference(
            v_theta, v_old, x_t, x0, t, r, beta=beta, loss_scale=loss_scale, mask=mask, v_ref=v_ref,
            kl_weight=kl_weight, negative_weight=negative_weight,
        )
    if want_grad:
        one, zero = out.loss.new_ones(()), out.loss.new_zeros(())
        grad = _reference_backward(one, zero, zero, zero.expand(v_theta.shape[0]), v_theta, v_old, x_t, x0, t, r,
                                   mask, v_ref, beta, loss_scale, kl_weight, negative_weight)
    else:
        grad = v_theta.new_empty((0,))
    return tuple(out) + (grad,)


def _routes(grad_loss, grad_policy, grad_kl, grad_per_sample, mask, cd):
    """[B] gradients reaching sample i's policy and KL terms: d(masked_mean)/d(per-sample value) = m_i/max(Σm, 1),
    and per_sample feeds both terms directly."""
    m = mask.to(cd)
    denom = m.sum().clamp_min(1.0)
    route_policy = (grad_loss.to(cd) + grad_policy.to(cd)) * m / denom + grad_per_sample.to(cd)
    route_kl = (grad_loss.to(cd) + grad_kl.to(cd)) * m / denom + grad_per_sample.to(cd)
    return route_policy, route_kl


def _reference_backward(
    grad_loss, grad_policy, grad_kl, grad_per_sample,
    v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight,
):
    cd = compute_dtype(v_theta, v_old, x_t, x0, v_ref)
    batch = v_theta.shape[0]
    dims = tuple(range(1, v_theta.dim()))
    view = (batch,) + (1,) * (v_theta.dim() - 1)
    n = max(v_theta.shape[1:].numel(), 1)  # the max: an empty batch or sample has an empty gradient anyway

    v, v_o, xt, x0c = v_theta.to(cd), v_old.to(cd), x_t.to(cd), x0.to(cd)
    tt, rr = t.to(cd), r.to(cd)
    route_policy, route_kl = _routes(grad_loss, grad_policy, grad_kl, grad_per_sample, mask, cd)

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


# ----------------------------------------------------------------------------------------------------------------
# Triton backend (loaded lazily so `TRITON_INTERPRET` can be set first).


def _triton_forward_impl():
    from nftcore.kernels.nft_loss import nft_loss_forward

    def impl(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight, want_grad):
        return nft_loss_forward(
            v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta=beta, loss_scale=loss_scale, kl_weight=kl_weight,
            negative_weight=negative_weight, want_grad=want_grad, min_x0_error=MIN_X0_ERROR,
        )

    return impl


def _triton_backward_impl():
    from nftcore.kernels.nft_loss import nft_loss_backward

    def impl(grad_loss, grad_policy, grad_kl, grad_per_sample,
             v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight):
        route_policy, route_kl = _routes(grad_loss, grad_policy, grad_kl, grad_per_sample, mask, torch.float32)
        return nft_loss_backward(
            route_policy, route_kl, v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta=beta, loss_scale=loss_scale,
            kl_weight=kl_weight, negative_weight=negative_weight, min_x0_error=MIN_X0_ERROR,
        )

    return impl


# ----------------------------------------------------------------------------------------------------------------
# Native CPU backend (csrc/nft_loss.cpp; the module is loaded by the dispatcher before these loaders run).


def _reference_only(*tensors) -> bool:
    """Inputs no kernel takes: fp64 (gradcheck, oracles) - the kernels accumulate in fp32, which would silently lower
    an fp64 caller's precision - and empty ones (nothing to launch; the reference gives the empty means' NaNs)."""
    return compute_dtype(*tensors) == torch.float64 or tensors[0].numel() == 0


def _native_forward_impl():
    from nftcore._native import op

    kernel = op("nft_loss_forward")

    def impl(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight, want_grad):
        if _reference_only(v_theta, v_old, x_t, x0, v_ref):
            record_fallback(OP)
            return _reference_forward(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight,
                                      negative_weight, want_grad)
        return tuple(kernel(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight,
                            want_grad, MIN_X0_ERROR))

    return impl


def _native_backward_impl():
    from nftcore._native import op

    kernel = op("nft_loss_backward")

    def impl(grad_loss, grad_policy, grad_kl, grad_per_sample,
             v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight):
        if _reference_only(v_theta, v_old, x_t, x0, v_ref):
            record_fallback(OP + "_backward")
            return _reference_backward(grad_loss, grad_policy, grad_kl, grad_per_sample, v_theta, v_old, x_t, x0, t,
                                       r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight)
        route_policy, route_kl = _routes(grad_loss, grad_policy, grad_kl, grad_per_sample, mask, torch.float32)
        return kernel(route_policy, route_kl, v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight,
                      negative_weight, MIN_X0_ERROR)

    return impl


_FORWARD_IMPLS = {Backend.REFERENCE: lambda: _reference_forward, Backend.TRITON: _triton_forward_impl,
                  Backend.NATIVE: _native_forward_impl}
_BACKWARD_IMPLS = {Backend.REFERENCE: lambda: _reference_backward, Backend.TRITON: _triton_backward_impl,
                   Backend.NATIVE: _native_backward_impl}


def _impls_for(impls, *tensors):
    """The backends that handle these inputs: never Triton for the reference-only inputs (`_reference_only`); the
    native backend takes them and hands them to the reference itself, recording the fallback."""
    if _reference_only(*tensors):
        return {backend: impl for backend, impl in impls.items() if backend is not Backend.TRITON}
    return impls


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
    want_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The six NFTLossOutput fields, then ∂loss/∂v_θ (v_θ's shape and dtype) if `want_grad`, else an empty [0]."""
    impl = dispatch(OP, v_theta.device, _impls_for(_FORWARD_IMPLS, v_theta, v_old, x_t, x0, v_ref))
    return impl(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight, want_grad)


@_nft_loss_op.register_fake
def _(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight, want_grad=False):
    cd = compute_dtype(v_theta, v_old, x_t, x0, v_ref)
    scalar = lambda: v_theta.new_empty((), dtype=cd)  # noqa: E731
    grad = torch.empty_like(v_theta) if want_grad else v_theta.new_empty((0,))
    return scalar(), scalar(), scalar(), v_theta.new_empty((v_theta.shape[0],), dtype=cd), scalar(), scalar(), grad


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
    impl = dispatch(OP + "_backward", v_theta.device, _impls_for(_BACKWARD_IMPLS, v_theta, v_old, x_t, x0, v_ref))
    return impl(
        grad_loss, grad_policy, grad_kl, grad_per_sample,
        v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight,
    )


@_nft_loss_backward_op.register_fake
def _(grad_loss, grad_policy, grad_kl, grad_per_sample, v_theta, *rest):
    return torch.empty_like(v_theta)


def _setup_context(ctx, inputs, output):
    v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, loss_scale, kl_weight, negative_weight, want_grad = inputs
    cached_grad = output[6]
    ctx.has_v_ref = v_ref is not None
    ctx.has_cached_grad = bool(want_grad)
    saved = (v_theta, v_old, x_t, x0, t, r, mask, cached_grad) + ((v_ref,) if ctx.has_v_ref else ())
    ctx.save_for_backward(*saved)
    ctx.hyper = (beta, loss_scale, kl_weight, negative_weight)
    ctx.mark_non_differentiable(cached_grad)
    # Outputs nobody differentiated arrive as None instead of zeros: that is how `_backward` tells the plain
    # `loss.backward()` (cached gradient) from the general case without looking at the gradients' values.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_policy, grad_kl, grad_per_sample, _grad_old_deviate, _grad_x0_norm, _grad_cache):
    saved = ctx.saved_tensors
    v_theta, v_old, x_t, x0, t, r, mask, cached_grad = saved[:8]
    v_ref = saved[8] if ctx.has_v_ref else None
    grad_v_theta = None
    if not ctx.needs_input_grad[0] or all(g is None for g in (grad_loss, grad_policy, grad_kl, grad_per_sample)):
        pass
    elif (ctx.has_cached_grad and grad_policy is None and grad_kl is None and grad_per_sample is None
          and not torch.is_grad_enabled()):
        # Out of place: a retained graph may run this backward again. Not under create_graph (grad mode on): the
        # cached gradient is a constant, so a double backward through it would be silently wrong, while the
        # general path's op raises there (it has no autograd formula).
        grad_v_theta = torch.mul(cached_grad, grad_loss)
    else:
        zero = v_theta.new_zeros((), dtype=torch.float32)
        grad_v_theta = _nft_loss_backward_op(
            zero if grad_loss is None else grad_loss,
            zero if grad_policy is None else grad_policy,
            zero if grad_kl is None else grad_kl,
            zero.expand(v_theta.shape[0]) if grad_per_sample is None else grad_per_sample,
            v_theta, v_old, x_t, x0, t, r, mask, v_ref, *ctx.hyper,
        )
    # Only v_theta is trained: v_old, x_t, x0, t, r, mask, v_ref, the four hyper-parameters and want_grad get no
    # gradient.
    return (grad_v_theta,) + (None,) * 12


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
    check_values: bool = True,
) -> NFTLossOutput:
    """DiffusionNFT loss with x0-space adaptive weighting. Only `v_theta` receives a gradient.

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
        check_values: check t, r and mask ranges and the result's finiteness (one host sync per call; a bad value is
            a ValueError, a non-finite one a `NonFiniteError`). A caller that checks the summed loss and gradient
            itself (the trainer, once per optimizer step) passes False and gets NaN through instead of a wait.

    All arithmetic accumulates in fp32 (fp64 for fp64 inputs); the outputs are in that dtype. On CUDA (fp16/bf16/fp32)
    the Triton backend computes everything, and ∂loss/∂v_θ when v_theta requires grad, in two launches; backpropagating
    `loss` alone then costs one multiply (see the module docstring for the memory this holds).
    """
    _check_inputs(v_theta, v_old, x_t, x0, t, r, mask, v_ref, beta, kl_weight)
    cd = compute_dtype(v_theta, v_old, x_t, x0, v_ref)
    mask_f = torch.ones_like(t, dtype=cd) if mask is None else mask.to(cd)
    if v_ref is not None and kl_weight == 0.0:
        v_ref = None  # nothing to compute, nothing to keep for backward
    outputs = _nft_loss_op(
        v_theta, v_old.detach(), x_t.detach(), x0.detach(), t.detach(), r.detach(), mask_f,
        None if v_ref is None else v_ref.detach(), float(beta), float(loss_scale), float(kl_weight),
        float(negative_weight), torch.is_grad_enabled() and v_theta.requires_grad,
    )
    out = NFTLossOutput(*outputs[:4], outputs[4].detach(), outputs[5].detach())
    if check_values and not torch.compiler.is_compiling():
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
    raise checks.NonFiniteError(f"{OP}: the loss is not finite although every input is (overflow in "
                                f"{v_theta.dtype}?)")
