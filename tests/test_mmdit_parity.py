"""`nftcore.models.MMDiT` against diffusers 0.42 on tiny random models: outputs and input gradients in fp32.

Each diffusers model gets every parameter randomised (diffusers zero-inits the AdaLN and output layers, which would
hide most of the network), is saved with `save_pretrained` and loaded with `MMDiT.from_pretrained`, so these tests
also cover the key mapping and the QKV fusion. Cases: batch 2, non-square grids, editing with source tokens,
guidance on/off, padded text (Qwen-Image), a second head count, the editing wrappers, checkpointing.
Tolerance: max |ours - diffusers| / max |diffusers| <= 1e-5 per sample (fp32; both sides are fp32 end to end).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nftcore.models import (EditVelocity, FluxEditConditioning, MMDiT, QwenEditConditioning, edit_velocity_fn,
                            flux_image_ids)

diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore", module="diffusers")

RTOL = 1e-5
B = 2
TGT, SRC = (3, 5), (4, 2)  # non-square token grids of the target and the source image
N_TXT = 7


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def rel_err_per_sample(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst per-sample relative error, so a wrong sample (e.g. the padded one) cannot hide behind a larger one."""
    return max(rel_err(o, r) for o, r in zip(ours, ref))


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
    return model


def flux_config(heads=2, guidance=True):
    return dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=heads,
                joint_attention_dim=32, pooled_projection_dim=32, in_channels=16, guidance_embeds=guidance,
                axes_dims_rope=(4, 6, 6))


def qwen_config(heads=2):
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=heads, joint_attention_dim=64, axes_dims_rope=(4, 6, 6))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(family, variant) -> (diffusers model, nftcore model) with the same random weights, cached per module."""
    cache = {}

    def get(family: str, **variant):
        key = (family, tuple(sorted(variant.items())))
        if key not in cache:
            if family == "flux":
                ref = diffusers.FluxTransformer2DModel(**flux_config(**variant))
            else:
                ref = diffusers.QwenImageTransformer2DModel(**qwen_config(**variant))
            randomize(ref, seed=len(cache))
            folder = tmp_path_factory.mktemp(family)
            ref.save_pretrained(folder)
            cache[key] = ref, MMDiT.from_pretrained(folder, dtype=torch.float32)
        return cache[key]

    return get


def compare(ref_model, model, x, e, kwargs, label):
    """Forward both on leaf copies of (x, e), backprop one random cotangent, compare output and input gradients."""
    outs = []
    for m in (ref_model, model):
        xi, ei = x.clone().requires_grad_(True), e.clone().requires_grad_(True)
        out = m(hidden_states=xi, encoder_hidden_states=ei, **kwargs).sample
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
        outs.append((out.detach(), xi.grad, ei.grad))
    (o1, gx1, ge1), (o2, gx2, ge2) = outs
    errs = dict(out=rel_err_per_sample(o2, o1), d_hidden=rel_err_per_sample(gx2, gx1),
                d_text=rel_err_per_sample(ge2, ge1))
    print(label, {k: f"{v:.1e}" for k, v in errs.items()})
    assert o2.shape == o1.shape
    assert all(v <= RTOL for v in errs.values()), (label, errs)
    return errs


# ------------------------------------------------------------------------------------------------------------ FLUX

def flux_inputs(in_channels=16, joint=32, pooled=32, edit=True, guidance=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [flux_image_ids(*TGT, index=0)] + ([flux_image_ids(*SRC, index=1)] if edit else [])
    img_ids = torch.cat(ids)
    x = torch.randn(B, img_ids.shape[0], in_channels, generator=g)
    e = torch.randn(B, N_TXT, joint, generator=g)
    kwargs = dict(pooled_projections=torch.randn(B, pooled, generator=g), timestep=torch.tensor([0.3, 0.9]),
                  img_ids=img_ids, txt_ids=torch.randn(N_TXT, 3, generator=g),  # non-zero text ids exercise RoPE
                  guidance=torch.tensor([3.5, 2.5]) if guidance else None)
    return x, e, kwargs


@pytest.mark.parametrize("guidance", [True, False], ids=["guidance", "no_guidance"])
@pytest.mark.parametrize("edit", [True, False], ids=["edit", "t2i"])
def test_flux_matches_diffusers(pair, guidance, edit):
    ref, model = pair("flux", guidance=guidance)
    x, e, kwargs = flux_inputs(edit=edit, guidance=guidance)
    compare(ref, model, x, e, kwargs, f"flux guidance={guidance} edit={edit}")


def test_flux_other_head_count(pair):
    ref, model = pair("flux", heads=3)
    x, e, kwargs = flux_inputs()
    compare(ref, model, x, e, kwargs, "flux heads=3")


def test_flux_edit_velocity_is_target_slice(pair):
    """The wrapper appends the source tokens, passes sigma and guidance, and returns the target tokens only."""
    ref, model = pair("flux")
    x, e, kwargs = flux_inputs()
    n_tgt = TGT[0] * TGT[1]
    sigma = 0.55
    cond = FluxEditConditioning.from_grids(e, kwargs["pooled_projections"], TGT, x[:, n_tgt:], SRC, guidance=3.5)
    with torch.no_grad():
        full = ref(hidden_states=x, encoder_hidden_states=e, pooled_projections=kwargs["pooled_projections"],
                   timestep=torch.full((B,), sigma), img_ids=cond.img_ids, txt_ids=cond.txt_ids,
                   guidance=torch.full((B,), 3.5)).sample
        v = edit_velocity_fn(model, cond)(x[:, :n_tgt], sigma)
        v_tensor_sigma = EditVelocity(model, cond)(x[:, :n_tgt], torch.tensor(sigma))
    assert v.shape == (B, n_tgt, 16)
    assert rel_err(v, full[:, :n_tgt]) <= RTOL
    assert torch.equal(v, v_tensor_sigma)


# ------------------------------------------------------------------------------------------------------ Qwen-Image

def qwen_inputs(edit=True, padded=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [(1, *TGT)] + ([(1, *SRC)] if edit else [])
    n_img = sum(f * h * w for f, h, w in images)
    x = torch.randn(B, n_img, 64, generator=g)
    e = torch.randn(B, N_TXT, 64, generator=g)
    mask = None
    if padded:
        mask = torch.ones(B, N_TXT, dtype=torch.long)
        mask[0, 5:] = 0  # sample 0 has 5 real tokens, sample 1 has all 7
    kwargs = dict(encoder_hidden_states_mask=mask, timestep=torch.tensor([0.3, 0.9]), img_shapes=[images] * B)
    return x, e, kwargs


@pytest.mark.parametrize("padded", [True, False], ids=["padded_text", "full_text"])
@pytest.mark.parametrize("edit", [True, False], ids=["edit", "t2i"])
def test_qwen_matches_diffusers(pair, padded, edit):
    ref, model = pair("qwen_image")
    x, e, kwargs = qwen_inputs(edit=edit, padded=padded)
    compare(ref, model, x, e, kwargs, f"qwen padded={padded} edit={edit}")


def test_qwen_other_head_count(pair):
    ref, model = pair("qwen_image", heads=3)
    x, e, kwargs = qwen_inputs()
    compare(ref, model, x, e, kwargs, "qwen heads=3")


def test_qwen_padding_is_invisible(pair):
    """Padded text tokens are masked out of attention: appending garbage padding leaves the image output unchanged
    (diffusers behaves the same; this pins the semantics, not just the parity)."""
    _, model = pair("qwen_image")
    x, e, kwargs = qwen_inputs(padded=False)
    garbage = torch.randn(B, 4, 64) * 10
    mask = torch.cat([torch.ones(B, N_TXT), torch.zeros(B, 4)], dim=1)
    padded = dict(kwargs, encoder_hidden_states_mask=mask)
    with torch.no_grad():
        plain = model(x, e, **kwargs).sample
        with_pad = model(x, torch.cat([e, garbage], dim=1), **padded).sample
    # RoPE of the text depends only on positions before the padding, so the result is identical up to rounding
    assert rel_err(with_pad, plain) <= RTOL


def test_qwen_edit_velocity_is_target_slice(pair):
    ref, model = pair("qwen_image")
    x, e, kwargs = qwen_inputs()
    n_tgt = TGT[0] * TGT[1]
    cond = QwenEditConditioning(e, kwargs["encoder_hidden_states_mask"], [(1, *TGT), (1, *SRC)], x[:, n_tgt:])
    with torch.no_grad():
        full = ref(hidden_states=x, encoder_hidden_states=e, **dict(kwargs, timestep=torch.full((B,), 0.4))).sample
        v = edit_velocity_fn(model, cond)(x[:, :n_tgt], 0.4)
    assert rel_err(v, full[:, :n_tgt]) <= RTOL


# -------------------------------------------------------------------------------------------------- model options

def test_activation_checkpointing_changes_nothing(pair):
    _, model = pair("flux")
    x, e, kwargs = flux_inputs()
    results = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        xi = x.clone().requires_grad_(True)
        out = model(xi, e, **kwargs).sample
        out.square().sum().backward()
        results.append((out.detach(), xi.grad))
    model.set_activation_checkpointing(False)
    assert torch.equal(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1], atol=0, rtol=1e-6)


def test_return_tuple_and_scalar_sigma(pair):
    _, model = pair("qwen_image")
    x, e, kwargs = qwen_inputs(padded=False)
    with torch.no_grad():
        a = model(x, e, **dict(kwargs, timestep=torch.tensor([0.5, 0.5])), return_dict=False)
        b = model(x, e, **dict(kwargs, timestep=0.5))
    assert isinstance(a, tuple) and len(a) == 1 and torch.equal(a[0], b.sample)


def test_wrong_family_arguments_raise(pair):
    _, flux = pair("flux")
    _, qwen = pair("qwen_image")
    x, e, kwargs = flux_inputs()
    with pytest.raises(ValueError, match="Qwen-Image arguments"):
        flux(x, e, **kwargs, img_shapes=[[(1, 3, 5)]] * B)
    xq, eq, kq = qwen_inputs()
    with pytest.raises(ValueError, match="no guidance"):
        qwen(xq, eq, **kq, guidance=torch.ones(B))
    with pytest.raises(ValueError, match="image tokens"):
        qwen(xq, eq, **dict(kq, img_shapes=[[(1, *TGT)]] * B))
    with pytest.raises(NotImplementedError, match="controlnet_block_samples"):
        qwen(xq, eq, **kq, controlnet_block_samples=[xq])


# ------------------------------------------------------------------------------------- memory-saving layers (fp64)

def test_layers_gradcheck():
    """The custom RMSNorm backward and the rebuilt-in-backward activations give exact gradients (fp64 gradcheck)."""
    from nftcore.models.blocks import MLP
    from nftcore.models.layers import modulated_layer_norm, rms_norm

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (rand(2, 3, 2, 8), rand(8)))
    assert torch.autograd.gradcheck(lambda x, a, b: modulated_layer_norm(x, a, b, 1e-6), (rand(2, 5, 8), rand(2, 8),
                                                                                      rand(2, 8)))
    mlp = MLP(8, 16).double()
    assert torch.autograd.gradcheck(mlp, (rand(2, 3, 8),))
    assert torch.autograd.gradgradcheck(mlp, (rand(2, 3, 8),))  # rebuilt tensors carry history under create_graph


def test_rebuilt_activation_is_not_kept():
    """`recompute_in_backward` must drop its target: autograd keeps the hooks with each saved variable, so a hook that
    referenced the tensor would keep it alive and save nothing (a regression this test pins)."""
    import weakref

    from nftcore.models.layers import recompute_in_backward

    a = torch.randn(4, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 8)
    act = torch.tanh(a)
    alive = weakref.ref(act)
    with recompute_in_backward(act, lambda: torch.tanh(a)):
        out = lin(act)
    del act
    assert alive() is None
    out.square().sum().backward()
    expected = torch.autograd.grad(lin(torch.tanh(a)).square().sum(), a)[0]
    torch.testing.assert_close(a.grad, expected, rtol=0, atol=0)
