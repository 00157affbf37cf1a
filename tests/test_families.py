"""Families vs diffusers: tiny random Qwen-Image-Edit(-Plus) pipelines built offline, saved, and reloaded as our
family; our conditioning + `MMDiT` + nftcore Euler sampling must reproduce the pipeline's output latents."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nftcore.models import edit_velocity_fn
from nftcore.models.families import QwenImageEditFamily, pack_latents, unpack_latents
from nftcore.sampling import sample
from nftcore.testing.tiny_judge import random_image
from nftcore.testing.tiny_pipelines import build_kontext_pipeline, build_qwen_edit_pipeline
from nftcore.utils.qwen_vl import load_qwen_vl_processor

diffusers = pytest.importorskip("diffusers")

AREA = 64 * 64  # pipelines resize sources to 1024^2 area; the tests patch that to 64^2 to stay fast


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny random Qwen-Image-Edit pipeline in the released layout (processor/ = tokenizer + image processor)."""
    return build_qwen_edit_pipeline(tmp_path_factory.mktemp("qwen-edit"))


def _pipeline(folder, cls_name):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    cls = getattr(diffusers, cls_name)
    processor = load_qwen_vl_processor(folder / "processor")
    processor.tokenizer.padding_side = "right"
    return cls(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
               vae=AutoencoderKLQwenImage.from_pretrained(folder / "vae"),
               text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder"),
               tokenizer=processor.tokenizer, processor=processor,
               transformer=QwenImageTransformer2DModel.from_pretrained(folder / "transformer"))


@pytest.fixture
def small_area(monkeypatch):
    """Make the pipelines (and our family) resize sources to ~64^2 instead of ~1024^2 pixels."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    orig_edit, orig_plus = edit.calculate_dimensions, plus.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: orig_edit(AREA, ratio))
    monkeypatch.setattr(plus, "calculate_dimensions",
                        lambda area, ratio: orig_plus(AREA if area == 1024 * 1024 else area, ratio))
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", AREA)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 48 * 48)
    return dict(vae_area=AREA, condition_area=48 * 48)


def test_pack_unpack_roundtrip_matches_diffusers():
    from diffusers import QwenImageEditPipeline

    z = torch.randn(2, 16, 1, 6, 10)
    ours = pack_latents(z)
    ref = QwenImageEditPipeline._pack_latents(z, 2, 16, 6, 10)
    assert torch.equal(ours, ref)
    assert torch.equal(unpack_latents(ours, (3, 5), frames=True), z)
    assert torch.equal(unpack_latents(ours, (3, 5), frames=True),
                       QwenImageEditPipeline._unpack_latents(ref, 48, 80, 8))


@pytest.mark.parametrize("cls_name, variant", [("QwenImageEditPipeline", "edit"),
                                               ("QwenImageEditPlusPipeline", "plus")])
def test_qwen_edit_reproduces_pipeline(pipeline_folder, small_area, cls_name, variant):
    pipe = _pipeline(pipeline_folder, cls_name)
    family = QwenImageEditFamily.from_pretrained(pipeline_folder, dtype=torch.float32, variant=variant, **small_area)
    source = random_image(np.random.default_rng(3), 80, 64)
    prompt = "make the sky blue"
    steps, seed = 2, 7

    ref = pipe(image=source, prompt=prompt, num_inference_steps=steps, true_cfg_scale=1.0,
               generator=torch.Generator().manual_seed(seed), output_type="latent").images

    cond = family.conditioning([source], [prompt])
    grid = cond.img_shapes[0][1:]
    # the pipeline's own prompt encoding, for a direct check of the conditioning
    vl_image = family._vl_images([source])
    ref_embeds, ref_mask = pipe.encode_prompt(prompt=[prompt], image=vl_image if variant == "plus" else vl_image[0],
                                              device=torch.device("cpu"))
    assert ref_mask is None or bool(ref_mask.all())
    assert cond.prompt_embeds.shape == ref_embeds.shape
    embed_err = (cond.prompt_embeds - ref_embeds).abs().max().item()
    assert embed_err == 0.0 or embed_err < 1e-5, embed_err

    noise = family.initial_noise(1, grid, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = sample(edit_velocity_fn(family.transformer, cond), noise, family.sigmas(steps, grid), solver="euler")
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    print(f"{variant}: embeds max|diff| {embed_err:.2e}, latents max|diff| {err:.2e} (scale {ref.abs().max():.2f})")
    assert err < 1e-4 * max(1.0, ref.abs().max().item()), err
    # not vacuous: the source latents and the text both move the result far more than the tolerance
    for changed in (dict(source_latents=torch.zeros_like(cond.source_latents)),
                    dict(prompt_embeds=cond.prompt_embeds.flip(1))):
        other = dataclasses.replace(cond, **changed)
        with torch.no_grad():
            moved = sample(edit_velocity_fn(family.transformer, other), noise, family.sigmas(steps, grid),
                           solver="euler")
        moved_by = (moved - ref).abs().max().item()
        print(f"  changing {next(iter(changed))} moves the latents by {moved_by:.2e}")
        assert moved_by > 100 * max(err, 1e-6)

    # decode equals the pipeline's VAE decode of the same latents
    images = family.decode(ref, grid)
    h, w = grid[0] * 16, grid[1] * 16
    z = pipe._unpack_latents(ref, h, w, pipe.vae_scale_factor)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 16, 1, 1, 1)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        ref_img = pipe.vae.decode(z / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]
    ref_img = pipe.image_processor.postprocess(ref_img, output_type="pt")
    assert images.shape == (1, 3, h, w)
    assert (images - ref_img).abs().max().item() < 1e-5


def test_batched_conditioning_pads_and_masks(pipeline_folder, small_area):
    family = QwenImageEditFamily.from_pretrained(pipeline_folder, dtype=torch.float32, **small_area)
    rng = np.random.default_rng(5)
    sources = [random_image(rng, 64, 64), random_image(rng, 64, 64)]
    prompts = ["add a hat", "remove the cat from the sofa and keep everything else unchanged"]
    cond = family.conditioning(sources, prompts)
    assert cond.prompt_embeds_mask is not None and cond.prompt_embeds_mask.shape == cond.prompt_embeds.shape[:2]
    assert cond.source_latents.shape == (2, 16, 64)
    for i in range(2):
        single = family.conditioning([sources[i]], [prompts[i]])
        n = single.prompt_embeds.shape[1]
        assert int(cond.prompt_embeds_mask[i].sum()) == n
        assert (cond.prompt_embeds[i, :n] - single.prompt_embeds[0]).abs().max() < 1e-5
        assert torch.allclose(cond.source_latents[i], single.source_latents[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------ FLUX.1-Kontext

@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory):
    return build_kontext_pipeline(tmp_path_factory.mktemp("kontext"))


def test_kontext_reproduces_pipeline(kontext_folder):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from nftcore.models.families.kontext import KontextFamily

    f = kontext_folder
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(f / "scheduler"),
                               vae=AutoencoderKL.from_pretrained(f / "vae"),
                               text_encoder=CLIPTextModel.from_pretrained(f / "text_encoder"),
                               tokenizer=AutoTokenizer.from_pretrained(f / "tokenizer"),
                               text_encoder_2=T5EncoderModel.from_pretrained(f / "text_encoder_2"),
                               tokenizer_2=AutoTokenizer.from_pretrained(f / "tokenizer_2"),
                               transformer=FluxTransformer2DModel.from_pretrained(f / "transformer"))
    family = KontextFamily.from_pretrained(kontext_folder, dtype=torch.float32, max_sequence_length=16,
                                           guidance=3.5, auto_resize=False)
    source = random_image(np.random.default_rng(4), 80, 64)
    prompt, steps, seed, size = "make the sky blue", 2, 11, 64
    ref = pipe(image=source, prompt=prompt, height=size, width=size, max_area=size * size, _auto_resize=False,
               num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=16,
               generator=torch.Generator().manual_seed(seed), output_type="latent").images

    cond = family.conditioning([source], [prompt], height=size, width=size)
    ref_embeds, ref_pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, max_sequence_length=16)
    embed_err = max((cond.prompt_embeds - ref_embeds).abs().max().item(),
                    (cond.pooled_prompt_embeds - ref_pooled).abs().max().item())
    assert cond.prompt_embeds.shape == ref_embeds.shape == (1, 16, 32) and embed_err < 1e-5, embed_err
    grid = family.target_grid(size, size)
    noise = family.initial_noise(1, grid, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours = sample(edit_velocity_fn(family.transformer, cond), noise, family.sigmas(steps, grid), solver="euler")
        unconditioned = sample(edit_velocity_fn(family.transformer, dataclasses.replace(
            cond, source_latents=torch.zeros_like(cond.source_latents))), noise, family.sigmas(steps, grid),
            solver="euler")
    err = (ours - ref).abs().max().item()
    moved = (unconditioned - ref).abs().max().item()
    print(f"kontext: embeds max|diff| {embed_err:.2e}, latents max|diff| {err:.2e} "
          f"(scale {ref.abs().max():.2f}); zero source moves {moved:.2e}")
    assert err < 1e-4 * max(1.0, ref.abs().max().item())
    assert moved > 100 * max(err, 1e-6)

    images = family.decode(ref, grid)
    z = pipe._unpack_latents(ref, size, size, pipe.vae_scale_factor)
    with torch.no_grad():
        ref_img = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor,
                                  return_dict=False)[0]
    assert (images - pipe.image_processor.postprocess(ref_img, output_type="pt")).abs().max().item() < 1e-5
