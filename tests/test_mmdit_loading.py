"""`MMDiT.from_pretrained` / `save_pretrained`: diffusers-format round trips (single file and sharded), diffusers
reading what nftcore wrote, clear errors for bad checkpoints, and loading that materialises each weight once.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nftcore.models import MMDiT, MMDiTConfig
from nftcore.models.checkpoint_io import INDEX_NAME, WEIGHTS_NAME, key_map

diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore", module="diffusers")

FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, in_channels=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
QWEN = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=64, axes_dims_rope=(4, 6, 6))

# transformer/config.json of the two real checkpoints Edit-R1 trains (as published on the Hub)
KONTEXT_CONFIG = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.35.0.dev0",
                  "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True,
                  "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
                  "num_single_layers": 38, "out_channels": None, "patch_size": 1, "pooled_projection_dim": 768}
QWEN_EDIT_CONFIG = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.36.0.dev0",
                    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False,
                    "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60,
                    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 768}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux_ref")
    randomize(diffusers.FluxTransformer2DModel(**FLUX)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen_ref")
    randomize(diffusers.QwenImageTransformer2DModel(**QWEN)).save_pretrained(folder)
    return folder


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def flux_forward(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    kwargs = dict(hidden_states=torch.randn(2, 12, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.2, 0.8]),
                  img_ids=ids.reshape(12, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]))
    with torch.no_grad():
        return model(**kwargs).sample


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("family", ["flux", "qwen"])
def test_save_writes_the_diffusers_tensors_back(family, flux_dir, qwen_dir, tmp_path):
    """Load -> save gives back exactly diffusers' key set and tensors (QKV un-fused), and reloads identically."""
    src = flux_dir if family == "flux" else qwen_dir
    model = MMDiT.from_pretrained(src)
    model.save_pretrained(tmp_path)
    original, written = load_file(src / WEIGHTS_NAME), load_file(tmp_path / WEIGHTS_NAME)
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    params_equal(MMDiT.from_pretrained(tmp_path), model)
    assert MMDiTConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text())) == model.config


def test_sharded_save_loads_in_nftcore_and_diffusers(flux_dir, tmp_path):
    model = MMDiT.from_pretrained(flux_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(shards) > 2 and not (tmp_path / WEIGHTS_NAME).exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    params_equal(MMDiT.from_pretrained(tmp_path), model)
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path)
    torch.testing.assert_close(flux_forward(theirs), flux_forward(model), rtol=1e-5, atol=1e-5)
    # saving again unsharded removes the old shards and index
    model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).exists() and not (tmp_path / INDEX_NAME).exists()
    assert not list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))


def test_diffusers_loads_what_nftcore_saved(flux_dir, tmp_path):
    reference = diffusers.FluxTransformer2DModel.from_pretrained(flux_dir)
    MMDiT.from_pretrained(flux_dir).save_pretrained(tmp_path)
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path)
    assert torch.equal(flux_forward(reloaded), flux_forward(reference))


def test_dtype_and_real_configs(flux_dir):
    model = MMDiT.from_pretrained(flux_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    kontext, qwen = MMDiTConfig.from_diffusers(KONTEXT_CONFIG), MMDiTConfig.from_diffusers(QWEN_EDIT_CONFIG)
    assert (kontext.hidden_size, kontext.out_channels, kontext.num_single_layers) == (3072, 64, 38)
    assert (qwen.hidden_size, qwen.out_features, qwen.num_layers) == (3072, 64, 60)
    with torch.device("meta"):
        assert sum(p.numel() for p in MMDiT(kontext).parameters()) == pytest.approx(11.9e9, rel=0.01)
        assert sum(p.numel() for p in MMDiT(qwen).parameters()) == pytest.approx(20.4e9, rel=0.01)


# ----------------------------------------------------------------------------------------------- bad checkpoints

def rewrite(folder: Path, edit) -> None:
    """Apply `edit(dict of tensors)` to the single weights file of `folder`."""
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


def test_missing_shard_is_named(flux_dir, tmp_path):
    folder = tmp_path / "sharded"
    MMDiT.from_pretrained(flux_dir).save_pretrained(folder, max_shard_size="20KB")
    lost = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[1]
    lost.unlink()
    with pytest.raises(ValueError, match=rf"missing shard file\(s\) {lost.name}.*they hold \d+ key\(s\)"):
        MMDiT.from_pretrained(folder)


def test_wrong_key_lists_missing_and_unexpected(flux_dir, tmp_path):
    folder = copy_folder(flux_dir, tmp_path / "renamed")
    rewrite(folder, lambda t: t.__setitem__("transformer_blocks.0.attn.to_qq.weight",
                                            t.pop("transformer_blocks.0.attn.to_q.weight")))
    with pytest.raises(ValueError) as err:
        MMDiT.from_pretrained(folder)
    msg = str(err.value)
    assert "missing 1 key(s): transformer_blocks.0.attn.to_q.weight" in msg
    assert "unexpected 1 key(s): transformer_blocks.0.attn.to_qq.weight" in msg


def test_many_missing_keys_are_summarised(flux_dir, tmp_path):
    folder = copy_folder(flux_dir, tmp_path / "truncated")
    rewrite(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("single_transformer_blocks")])
    with pytest.raises(ValueError, match=r"missing 14 key\(s\): single_transformer_blocks.0.attn.norm_k.weight, .*"
                                         r"\.\.\. and 6 more"):
        MMDiT.from_pretrained(folder)


def test_wrong_shape_is_named(flux_dir, tmp_path):
    folder = copy_folder(flux_dir, tmp_path / "reshaped")
    rewrite(folder, lambda t: t.__setitem__("proj_out.weight", torch.zeros(8, 32)))
    with pytest.raises(ValueError, match=r"shape mismatch in 1 tensor\(s\): proj_out.weight \[8, 32\] != expected "
                                         r"\[16, 32\]"):
        MMDiT.from_pretrained(folder)


@pytest.mark.parametrize("change, message", [
    ({"zero_cond_t": True}, r"unsupported setting\(s\) zero_cond_t=True"),
    ({"use_layer3d_rope": True, "use_additional_t_cond": True},
     r"use_additional_t_cond=True, use_layer3d_rope=True|use_layer3d_rope=True, use_additional_t_cond=True"),
    ({"some_new_flag": 1}, r"unknown key\(s\) some_new_flag"),
    ({"_class_name": "SD3Transformer2DModel"}, r"unsupported `_class_name` 'SD3Transformer2DModel'"),
], ids=["zero_cond_t", "two_flags", "unknown_key", "class_name"])
def test_unsupported_config_is_rejected_by_name(qwen_dir, tmp_path, change, message):
    folder = copy_folder(qwen_dir, tmp_path / "cfg")
    config = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        MMDiT.from_pretrained(folder)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        MMDiT.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------- memory

def test_loading_materialises_each_weight_once(flux_dir, monkeypatch):
    """The model is built on the meta device (no initialiser touches real memory), every checkpoint tensor is read
    once, and the peak of live CPU tensor bytes stays below parameters + the largest checkpoint tensor (the part
    being copied into a fused parameter): no second copy of the model, no full state dict, ever exists.

    safetensors maps each file with `UntypedStorage.from_file` (a private, lazily paged mmap of the file); the
    profiler reports that mapping as an allocation of exactly the file's size, and it is excluded here because it is
    page cache, not a copy."""
    from torch.profiler import ProfilerActivity, profile

    from nftcore.models import checkpoint_io

    init_devices, reads = [], []
    original_init, original_open = torch.nn.init.kaiming_uniform_, checkpoint_io.safe_open

    def spy_init(tensor, *args, **kwargs):
        init_devices.append(tensor.device.type)
        return original_init(tensor, *args, **kwargs)

    class SpyOpen:
        def __init__(self, *args, **kwargs):
            self.handle = original_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy_init)
    monkeypatch.setattr(checkpoint_io, "safe_open", SpyOpen)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = MMDiT.from_pretrained(flux_dir)
    file_sizes = {p.stat().st_size for p in flux_dir.glob("*.safetensors")}
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and abs(e.nbytes()) not in file_sizes), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with original_open(flux_dir / WEIGHTS_NAME, "pt") as f:
        keys = list(f.keys())
        largest = max(math.prod(f.get_slice(k).get_shape()) for k in keys) * 4  # fp32 bytes
    assert init_devices and set(init_devices) == {"meta"}
    assert sorted(reads) == sorted(keys)  # every tensor read exactly once
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert param_bytes <= peak <= param_bytes + largest + 16 * 1024, (peak, param_bytes, largest)


def test_key_map_covers_every_parameter():
    for raw in (KONTEXT_CONFIG, QWEN_EDIT_CONFIG):
        cfg = MMDiTConfig.from_diffusers(raw)
        with torch.device("meta"):
            names = {n for n, _ in MMDiT(cfg).named_parameters()}
        assert set(key_map(cfg)) == names
