"""`nftcore.ops.nft_loss` against hand-computed values, autograd of the reference, gradcheck and the on-policy closed
form."""

import numpy as np
import pytest
import torch

from nftcore.ops import NFTLossOutput, last_backend, nft_loss
from nftcore.ops.dispatch import Backend
from nftcore.ops.reference import nft_loss_reference, numpy_nft_loss


def random_inputs(shape=(3, 7, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    batch = shape[0]
    t = torch.rand(batch, generator=g, dtype=torch.float64).to(dtype)
    r = torch.rand(batch, generator=g, dtype=torch.float64).to(dtype)
    return dict(v_theta=mk(), v_old=mk(), x_t=mk(), x0=mk(), t=t, r=r), mk()


def test_hand_computed_two_samples():
    # Sample 0: on-policy, e = [0, 2] -> mean e^2 = 2, mean|e| = 1, L = 2 on both branches; r = 0.75 -> 5 * 2 = 10.
    # Sample 1: t = 1, v_theta = [1, -1], v_old = 0 -> e+ = [-1, 1], e- = [1, -1]; L = 1 on both; r = 0.2 -> 5.
    v_theta = torch.tensor([[[2.0, 2.0]], [[1.0, -1.0]]])
    v_old = torch.tensor([[[2.0, 2.0]], [[0.0, 0.0]]])
    x_t = torch.tensor([[[1.0, 3.0]], [[0.0, 0.0]]])
    x0 = torch.zeros(2, 1, 2)
    t = torch.tensor([0.5, 1.0])
    r = torch.tensor([0.75, 0.2])
    v_ref = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])
    out = nft_loss(v_theta, v_old, x_t, x0, t, r)
    assert isinstance(out, NFTLossOutput)
    torch.testing.assert_close(out.per_sample, torch.tensor([10.0, 5.0]))
    assert out.loss.item() == pytest.approx(7.5)
    assert out.old_deviate.item() == pytest.approx(0.5)  # (0 + 1) / 2
    assert out.x0_norm.item() == pytest.approx(1.5)  # x_t - t v = [0, 2] -> 2 and [-1, 1] -> 1
    masked = nft_loss(v_theta, v_old, x_t, x0, t, r, mask=torch.tensor([True, False]))
    assert masked.loss.item() == pytest.approx(10.0)
    assert masked.old_deviate.item() == pytest.approx(0.0)
    assert masked.x0_norm.item() == pytest.approx(2.0)
    kl = nft_loss(v_theta, v_old, x_t, x0, t, r, v_ref=v_ref, kl_weight=0.1)
    assert kl.kl_loss.item() == pytest.approx((0.1 * 2.0 + 0.1 * 1.0) / 2)  # mean((v - v_ref)^2) = 2 and 1
    assert kl.loss.item() == pytest.approx(7.5 + 0.15)
    positive_only = nft_loss(v_theta, v_old, x_t, x0, t, r, negative_weight=0.0)
    torch.testing.assert_close(positive_only.per_sample, torch.tensor([5 * 0.75 * 2.0, 5 * 0.2 * 1.0]))


OPTIONS = [
    dict(),
    dict(beta=0.1),
    dict(beta=0.6, loss_scale=2.0, negative_weight=0.0),
    dict(mask=torch.tensor([1.0, 0.0, 1.0])),
    dict(mask=torch.tensor([False, True, True]), kl_weight=1e-2, use_ref=True, beta=1.7, negative_weight=0.5),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(sorted(o)) or "defaults")
@pytest.mark.parametrize("shape", [(3, 7, 5), (3, 2, 3, 4)])
def test_matches_numpy_and_reference_autograd(options, shape):
    options = dict(options)
    inputs, v_ref = random_inputs(shape)
    if options.pop("use_ref", False):
        options["v_ref"] = v_ref
    expected = numpy_nft_loss(**{k: v.numpy() for k, v in inputs.items()},
                              **{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in options.items()})
    v_theta = inputs.pop("v_theta").requires_grad_()
    out = nft_loss(v_theta, **inputs, **options)
    ref = nft_loss_reference(v_theta, **inputs, **options)
    for field in NFTLossOutput._fields:
        np.testing.assert_allclose(getattr(out, field).detach().numpy(), expected[field], rtol=1e-12, atol=1e-14)
    # Every differentiable output, through the closed-form backward, against autograd of the reference.
    weights = torch.randn(4, dtype=torch.float64)
    w_ps = torch.randn(shape[0], dtype=torch.float64)

    def combine(o):
        return weights[0] * o.loss + weights[1] * o.policy_loss + weights[2] * o.kl_loss + (w_ps * o.per_sample).sum()

    (grad,) = torch.autograd.grad(combine(out), v_theta)
    (grad_ref,) = torch.autograd.grad(combine(ref), v_theta)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-14)
    assert last_backend("nft_loss") is Backend.REFERENCE


def test_gradcheck_float64():
    """gradcheck differentiates the detached normaliser d too, so it runs where d is constant: mean|e| below the 1e-5
    floor, where the loss is an exact quadratic in v_theta."""
    inputs, _ = random_inputs((3, 4, 5))
    v_theta = inputs["v_theta"]
    t = inputs["t"].view(3, 1, 1)
    inputs["v_old"] = v_theta + 1e-7 * torch.randn_like(v_theta)
    inputs["x0"] = inputs["x_t"] - t * v_theta + 1e-7 * torch.randn_like(v_theta)
    v = inputs.pop("v_theta").requires_grad_()
    for options in (dict(), dict(beta=0.7, negative_weight=0.6, mask=torch.tensor([1.0, 0.0, 1.0]))):
        fn = lambda v_: tuple(nft_loss(v_, **inputs, **options)[:4])  # noqa: E731
        assert torch.autograd.gradcheck(fn, (v,), eps=1e-10, atol=1e-7, rtol=1e-5)
    # The velocity-L2 term has no stop-gradient: gradcheck it at ordinary magnitudes.
    inputs, v_ref = random_inputs((3, 4, 5), seed=1)
    v = inputs.pop("v_theta").requires_grad_()
    fn = lambda v_: tuple(nft_loss(v_, **inputs, loss_scale=0.0, v_ref=v_ref, kl_weight=0.3)[:4])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v,))


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.5])
def test_on_policy_closed_form(beta):
    """With kl_weight = 0 and v_theta = v_old both branches coincide and the gradient of sample i is
    (loss_scale/Σm)·m_i·(1−2r_i)·(2t_i/(n·d_i))·e_i, independent of β."""
    inputs, _ = random_inputs((4, 6, 3), seed=2)
    inputs["v_old"] = inputs["v_theta"].clone()
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    v = inputs.pop("v_theta").requires_grad_()
    out = nft_loss(v, **inputs, beta=beta, loss_scale=5.0, mask=mask)
    out.loss.backward()
    t, r = inputs["t"].view(4, 1, 1), inputs["r"].view(4, 1, 1)
    err = inputs["x_t"] - t * v.detach() - inputs["x0"]
    n = err[0].numel()
    d = err.abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-5)
    expected = (5.0 / mask.sum()) * mask.view(4, 1, 1) * (1 - 2 * r) * (2 * t / (n * d)) * err
    torch.testing.assert_close(v.grad, expected, rtol=1e-12, atol=1e-15)


def test_all_zero_mask_is_zero_loss_with_a_graph():
    inputs, v_ref = random_inputs((3, 4, 5), dtype=torch.float32)
    v = inputs.pop("v_theta").requires_grad_()
    out = nft_loss(v, **inputs, mask=torch.zeros(3, dtype=torch.bool), v_ref=v_ref, kl_weight=1e-4)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.count_nonzero(v.grad) == 0


def test_v_ref_without_weight_is_ignored_and_weight_without_ref_is_an_error():
    inputs, v_ref = random_inputs((2, 3, 4))
    plain = nft_loss(**inputs)
    with_ref = nft_loss(**inputs, v_ref=v_ref)
    torch.testing.assert_close(plain.loss, with_ref.loss)
    with pytest.raises(ValueError, match="kl_weight.*v_ref"):
        nft_loss(**inputs, kl_weight=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    inputs, v_ref = random_inputs((3, 64, 16), dtype=torch.float32, seed=3)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    v_low = low.pop("v_theta").requires_grad_()
    out = nft_loss(v_low, **low, v_ref=v_ref.to(dtype), kl_weight=0.1)
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert v_low.grad.dtype == dtype
    # Same rounded inputs in fp32: only the final cast of the gradient may differ.
    up = {k: v.float() for k, v in low.items()}
    v_up = v_low.detach().float().requires_grad_()
    out_up = nft_loss(v_up, **up, v_ref=v_ref.to(dtype).float(), kl_weight=0.1)
    out_up.loss.backward()
    torch.testing.assert_close(out.loss, out_up.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(v_low.grad, v_up.grad.to(dtype), rtol=0, atol=0)
    # Against the unrounded fp32 inputs: within the inputs' own rounding.
    v32 = inputs["v_theta"].clone().requires_grad_()
    out32 = nft_loss(v32, **{k: v for k, v in inputs.items() if k != "v_theta"}, v_ref=v_ref, kl_weight=0.1)
    torch.testing.assert_close(out.loss, out32.loss, rtol=3e-2, atol=0)


def test_traceable_by_torch_compile_and_opcheck():
    inputs, v_ref = random_inputs((2, 5, 4), dtype=torch.float32)
    args = (inputs["v_theta"], inputs["v_old"], inputs["x_t"], inputs["x0"], inputs["t"], inputs["r"],
            torch.ones(2), v_ref, 1.0, 5.0, 1e-4, 1.0)
    torch.library.opcheck(torch.ops.nftcore.nft_loss.default, args)

    def step(v):
        return nft_loss(v, *[inputs[k] for k in ("v_old", "x_t", "x0", "t", "r")], v_ref=v_ref, kl_weight=1e-4).loss

    v_eager = inputs["v_theta"].clone().requires_grad_()
    v_comp = inputs["v_theta"].clone().requires_grad_()
    step(v_eager).backward()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(v_comp)
    loss.backward()
    torch.testing.assert_close(loss, step(inputs["v_theta"]))
    torch.testing.assert_close(v_comp.grad, v_eager.grad)


def _bad_inputs():
    inputs, v_ref = random_inputs((3, 4, 5), dtype=torch.float32)
    cases = []

    def case(pattern, **changes):
        cases.append((pattern, {**inputs, **changes}))

    case(r"`x0` has shape \[3, 4, 6\] but `v_theta` has shape \[3, 4, 5\]", x0=torch.zeros(3, 4, 6))
    case(r"`v_ref` has shape \[3, 4\]", v_ref=torch.zeros(3, 4), kl_weight=0.1)
    case(r"`t` must have shape \[B\] = \[3\].*got \[3, 1\]", t=torch.full((3, 1), 0.5))
    case(r"`r` must have shape \[B\] = \[3\].*got \[2\]", r=torch.full((2,), 0.5))
    case(r"`mask` must have shape \[B\]", mask=torch.ones(4, dtype=torch.bool))
    case(r"`v_old` must be float16/bfloat16/float32/float64, got torch.int64", v_old=torch.zeros(3, 4, 5).long())
    case(r"`t` must be finite and in \[0, 1\]; `t`\[1\] = 1.5", t=torch.tensor([0.2, 1.5, 0.3]))
    case(r"`r` must be finite and in \[0, 1\]; `r`\[0\] = -0.1", r=torch.tensor([-0.1, 0.5, 0.3]))
    case(r"`t` must be finite and in \[0, 1\]; `t`\[2\] = nan", t=torch.tensor([0.2, 0.5, float("nan")]))
    case(r"`mask` must be bool or 0/1, `mask`\[1\] = 0.5", mask=torch.tensor([1.0, 0.5, 0.0]))
    nan_velocity = inputs["v_old"].clone()
    nan_velocity[1, 2, 3] = float("inf")
    case(r"`v_old` \(shape \[3, 4, 5\]\) has a non-finite value at index \[1, 2, 3\]", v_old=nan_velocity)
    case(r"`beta` .* finite positive", beta=0.0)
    case(r"`kl_weight` must be finite and >= 0", kl_weight=-1.0, v_ref=v_ref)
    case(r"`v_theta` must be \[B, \.\.\.\] with at least 2 dims", **{k: torch.zeros(3) for k in
                                                                       ("v_theta", "v_old", "x_t", "x0")})
    case(r"`x_t` must be a torch.Tensor, got list", x_t=[[0.0]])
    return cases


@pytest.mark.parametrize("pattern,kwargs", _bad_inputs())
def test_bad_input_names_the_argument(pattern, kwargs):
    with pytest.raises(ValueError, match=pattern):
        nft_loss(**kwargs)
