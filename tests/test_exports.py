"""The trainer's exports load where users take them: the diffusers-layout LoRA into a diffusers pipeline with
`pipe.load_lora_weights`, the PEFT layout with `peft`, and a full fine-tune's transformer folder with diffusers'
`from_pretrained`; each must give the output of our model with the same (EMA) weights merged in.

What test_lora.py already pins (segment semantics against PEFT, our loaders, diffusers' `load_lora_adapter` on toy
modules) is not repeated: here the files are the ones a training run writes (`Trainer.save` → `lora_ema/`,
`ema/transformer/`), and the readers are diffusers' and peft's own on real diffusers transformers. The demo policy
is a FLUX-family MMDiT, so its export goes into a FluxKontextPipeline; the Qwen-Image family is not wired into the
trainer yet, so its MMDiT goes through the same export code (`LoRAWeights.export`) directly.
"""

from __future__ import annotations

import types

import pytest
import torch

from nftcore.models.lora import adapter_state, adapters_disabled, merge_adapter, unmerge_adapter
from nftcore.models.lora_io import DIFFUSERS_WEIGHTS, PEFT_WEIGHTS
from nftcore.trainer import Role
from tests.helpers.tiny_transformers import assert_close, flux_inputs, tiny_pair
from tests.helpers.trainer import run_tiny

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")



pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One epoch of the tiny demo run (a larger lr so the EMA LoRA is clearly non-zero), its base transformer saved
    in diffusers' layout, and our outputs with the EMA adapter merged and with adapters off."""
    out = tmp_path_factory.mktemp("demo-run")
    trainer, _ = run_tiny(out, **{"run.epochs": 1, "optim.lr": 1e-2})
    model = trainer.model
    model.save_pretrained(out / "base")  # the frozen base weights: training only moves the adapters
    x = flux_inputs(model.config)
    with torch.no_grad():
        with adapters_disabled(model):
            base = model(**x).sample
        with trainer.ema.swapped(trainer.weights.state(Role.THETA)):
            merge_adapter(model, "default")
            ours = model(**x).sample
            unmerge_adapter(model)
    export = out / "checkpoints" / "epoch-000001" / "lora_ema"
    return types.SimpleNamespace(trainer=trainer, base_dir=out / "base", export=export, x=x, ours=ours, base=base)


def test_demo_export_is_the_ema_adapter_with_nonzero_b(demo_run):
    from safetensors.torch import load_file

    tensors = load_file(demo_run.export / "diffusers" / DIFFUSERS_WEIGHTS)
    shadow = {name: demo_run.trainer.ema.shadow[name] for name in demo_run.trainer.weights.state(Role.THETA)}
    assert set(tensors) == {f"transformer.{k}" for k in shadow}
    for key, value in shadow.items():
        assert torch.equal(tensors[f"transformer.{key}"], value.cpu())
    assert all(tensors[k].abs().max() > 0 for k in tensors if ".lora_B." in k)


def test_diffusers_lora_loads_into_flux_kontext_pipeline(demo_run):
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(demo_run.base_dir).eval()
    pipe = diffusers.FluxKontextPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                         text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.load_lora_weights(demo_run.export / "diffusers")
    with torch.no_grad():
        theirs = pipe.transformer(**demo_run.x).sample
    assert_close(theirs, demo_run.ours, demo_run.base)


def test_peft_lora_loads_with_peft(demo_run):
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(demo_run.base_dir).eval()
    model = peft.PeftModel.from_pretrained(transformer, demo_run.export / "peft")
    assert (demo_run.export / "peft" / PEFT_WEIGHTS).is_file()
    with torch.no_grad():
        theirs = model(**demo_run.x).sample
    assert_close(theirs, demo_run.ours, demo_run.base)


def test_qwen_image_lora_export_loads_into_qwen_edit_pipeline_and_peft(tmp_path):
    from nftcore.config import load_config
    from nftcore.trainer.weights import LoRAWeights
    _, model, x = tiny_pair("qwen_image", tmp_path)  # saves the random diffusers base to tmp_path/base
    cfg = load_config(["--lora.rank=2", "--lora.alpha=4"])
    weights = LoRAWeights(types.SimpleNamespace(transformer=model), cfg, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in adapter_state(model, "default").values():  # a trained-looking adapter: B ≠ 0
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
        weights.export(tmp_path / "lora")
        with adapters_disabled(model):
            base = model(**x).sample
        merge_adapter(model, "default")
        ours = model(**x).sample

    transformer = diffusers.QwenImageTransformer2DModel.from_pretrained(tmp_path / "base").eval()
    pipe = diffusers.QwenImageEditPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                           processor=None, transformer=transformer)
    pipe.load_lora_weights(tmp_path / "lora" / "diffusers")
    with torch.no_grad():
        assert_close(pipe.transformer(**x).sample, ours, base)

    transformer = diffusers.QwenImageTransformer2DModel.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        assert_close(peft.PeftModel.from_pretrained(transformer, tmp_path / "lora" / "peft")(**x).sample, ours, base)


def test_full_finetune_export_loads_with_diffusers_from_pretrained(tmp_path):
    trainer, _ = run_tiny(tmp_path, finetune="full", **{"run.epochs": 1, "optim.lr": 1e-2})
    folder = tmp_path / "checkpoints" / "epoch-000001" / "ema" / "transformer"
    assert not (tmp_path / "checkpoints" / "epoch-000001" / "lora_ema").exists()
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(folder).eval()
    x = flux_inputs(trainer.model.config)
    with torch.no_grad():
        base = trainer.weights.ref(**x).sample
        with trainer.ema.swapped(trainer.weights.state(Role.THETA)):
            ours = trainer.model(**x).sample
        assert_close(theirs(**x).sample, ours, base)
