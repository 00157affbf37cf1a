"""Pure-PyTorch references of the fused ops: the test oracles and the CPU fallbacks.

Written for clarity, in the notation of the DiffusionNFT paper, with autograd doing the differentiation. The fallback
backends in the op modules reuse these forwards and add closed-form backwards, which the tests check against autograd
here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# d_b = max(mean|e_b|, MIN_X0_ERROR): keeps the self-normalised weight finite when a branch already hits x0 exactly.
MIN_X0_ERROR = 1e-5


class NFTLossOutput(NamedTuple):
    """What `nft_loss` returns. `loss = policy_loss + kl_loss = masked_mean(per_sample)`.

    loss          scalar, the total to backpropagate
    policy_loss   scalar, (loss_scale/β)·masked_mean(r·L⁺ + negative_weight·(1−r)·L⁻)
    kl_loss       scalar, kl_weight·masked_mean(mean((v_θ − v_ref)²)) (0 without v_ref)
    per_sample    [B], each sample's policy + KL term before the masked mean (masked samples included)
    old_deviate   scalar diagnostic, masked mean over samples of mean((v_θ − v_old)²); no gradient
    x0_norm       scalar diagnostic, masked mean of mean((x_t − t·v_θ)²), the policy's clean-sample energy (brightness
                  drift shows here); no gradient
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl_loss: torch.Tensor
    per_sample: torch.Tensor
    old_deviate: torch.Tensor
    x0_norm: torch.Tensor


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 accumulation for every input precision; fp64 stays fp64 (gradcheck, oracles)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def nft_loss_reference(
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
    """DiffusionNFT loss with autograd; same contract as `nftcore.ops.nft_loss`, no input checks.

    Shapes: v_theta, v_old, x_t, x0 (and v_ref) [B, ...]; t, r, mask [B]. t is σ (1 = noise).
    """
    cd = compute_dtype(v_theta, v_old, x_t, x0, v_ref)
    batch = v_theta.shape[0]
    dims = tuple(range(1, v_theta.dim()))
    per_sample_view = (batch,) + (1,) * (v_theta.dim() - 1)

    v = v_theta.to(cd)
    v_o = v_old.detach().to(cd)
    xt, x0c = x_t.to(cd), x0.to(cd)
    tt = t.to(cd).view(per_sample_view)
    rr = r.to(cd)
    m = torch.ones(batch, dtype=cd, device=v.device) if mask is None else mask.to(cd)

    def branch_loss(v_branch: torch.Tensor) -> torch.Tensor:
        err = (xt - tt * v_branch) - x0c  # x̂0 of the branch minus the rollout's clean sample
        scale = err.abs().mean(dims).clamp_min(MIN_X0_ERROR).detach()
        return err.square().mean(dims) / scale

    loss_pos = branch_loss(beta * v + (1.0 - beta) * v_o)
    loss_neg = branch_loss((1.0 + beta) * v_o - beta * v)
    policy_per_sample = (loss_scale / beta) * (rr * loss_pos + negative_weight * (1.0 - rr) * loss_neg)
    if v_ref is not None and kl_weight != 0.0:
        kl_per_sample = kl_weight * (v - v_ref.detach().to(cd)).square().mean(dims)
    else:
        kl_per_sample = torch.zeros_like(policy_per_sample)

    denom = m.sum().clamp_min(1.0)  # all-zero mask: zero loss that still carries a graph

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return (x * m).sum() / denom

    policy_loss = masked_mean(policy_per_sample)
    kl_loss = masked_mean(kl_per_sample)
    with torch.no_grad():
        old_deviate = masked_mean((v - v_o).square().mean(dims))
        x0_norm = masked_mean((xt - tt * v).square().mean(dims))
    return NFTLossOutput(
        loss=policy_loss + kl_loss,
        policy_loss=policy_loss,
        kl_loss=kl_loss,
        per_sample=policy_per_sample + kl_per_sample,
        old_deviate=old_deviate,
        x0_norm=x0_norm,
    )
