"""Pure-PyTorch references of the fused ops: the test oracles and the CPU fallbacks.

Written for clarity, in the notation of the DiffusionNFT paper, with autograd doing the differentiation. The fallback
backends in the op modules reuse these forwards and add closed-form backwards, which the tests check against autograd
here. At the end, the naive oracles (`naive_score_logits`, `naive_attention`, `numpy_nft_loss`): the one home of the
obvious computations the tests check the ops against in float64 and the benchmarks time as a baseline.

Their place in the op pattern: docs/DESIGN.md §5 (point 4).
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


# ----------------------------------------------------------------------------------------------------------------
# Naive oracles: the obvious computation, no memory or speed tricks; tests compare the ops (and their references)
# with these in float64, and benchmarks use them as the baseline a caller would write without the op.


def naive_score_logits(hidden, weight, token_ids, mode="subset", dtype=torch.float64):
    """The obvious PyTorch: [M, V] logits in `dtype`, log_softmax, gather. Test oracle and benchmark baseline only."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64, device=hidden.device)
    z = hidden.to(dtype) @ weight.to(dtype).T  # [M, V]
    if mode == "full":
        return torch.log_softmax(z, dim=-1)[:, ids]
    return torch.log_softmax(z[:, ids], dim=-1)


def naive_attention(q, k, v, mask=None, rope=None, scale=None):
    """softmax(RoPE(q)·RoPE(k)ᵀ·scale)·v in the inputs' own dtype, every op plain PyTorch, [B, N, H, D] layout.
    Fully masked rows give zeros (the op's documented choice)."""
    from .attention import rotate_pairs  # deferred: the op module is not needed by the loss references

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if rope is not None:
        q, k = rotate_pairs(q, *rope), rotate_pairs(k, *rope)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, H, N_q, N_k]
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = torch.where(mask.any(-1)[:, None, None, None], p, torch.zeros_like(p))  # NaN rows → 0
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def numpy_nft_loss(v_theta, v_old, x_t, x0, t, r, *, beta=1.0, loss_scale=5.0, mask=None, v_ref=None,
                   kl_weight=0.0, negative_weight=1.0):
    """An independent float64 loop over samples, written straight from the formulas (numpy, no autograd): the oracle
    of `nft_loss_reference` itself."""
    import numpy as np

    v_theta, v_old, x_t, x0 = (np.asarray(a, dtype=np.float64) for a in (v_theta, v_old, x_t, x0))
    batch = v_theta.shape[0]
    mask = np.ones(batch) if mask is None else np.asarray(mask, dtype=np.float64)
    per_sample, policy, kl = [], [], []
    for i in range(batch):
        branch = {}
        for name, v in (("pos", beta * v_theta[i] + (1 - beta) * v_old[i]),
                        ("neg", (1 + beta) * v_old[i] - beta * v_theta[i])):
            err = x_t[i] - t[i] * v - x0[i]
            branch[name] = np.mean(err ** 2) / max(np.mean(np.abs(err)), 1e-5)
        p = loss_scale / beta * (r[i] * branch["pos"] + negative_weight * (1 - r[i]) * branch["neg"])
        k = kl_weight * np.mean((v_theta[i] - v_ref[i]) ** 2) if v_ref is not None else 0.0
        policy.append(p)
        kl.append(k)
        per_sample.append(p + k)
    denom = max(mask.sum(), 1.0)
    return dict(
        loss=float(np.dot(mask, per_sample) / denom),
        policy_loss=float(np.dot(mask, policy) / denom),
        kl_loss=float(np.dot(mask, kl) / denom),
        per_sample=np.array(per_sample),
        old_deviate=float(sum(mask[i] * np.mean((v_theta[i] - v_old[i]) ** 2) for i in range(batch)) / denom),
        x0_norm=float(sum(mask[i] * np.mean((x_t[i] - t[i] * v_theta[i]) ** 2) for i in range(batch)) / denom),
    )
