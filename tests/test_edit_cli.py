"""`python -m nftcore.edit` and its parts: true CFG, presets, the benchmark readers, LoRA loading and merging, the
t interval, and whole runs on tiny random FLUX.1-Kontext / Qwen-Image-Edit pipelines (64 px, 2 steps) with a tiny
random judge: single image, prompt lists with bad items, resume, settings guard, batch-size invariance."""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nftcore.data.benchmarks import SourceImageError, load_source_image, read_prompt_list
from nftcore.edit import main
from nftcore.inference import Editor, LoRAMismatchError, apply_lora_file, preset_for, resolve
from nftcore.inference.report import paired_difference, student_t_quantile
from nftcore.models.lora_io import read_adapter_file
from nftcore.sampling import combine_cfg, sample, true_cfg
from nftcore.testing.tiny_judge import random_image
from tests.helpers.edit_runs import TINY, write_split
from tests.helpers.judges import tiny_judge_folder

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")



def save_lora(folder: Path, out: Path, *, layout: str = "peft", seed: int = 1) -> Path:
    """A rank-2 LoRA with random A and B for the pipeline's transformer, in nftcore's export layout."""
    from nftcore.models.lora import adapter_state, apply_lora
    from nftcore.models.lora_io import save_diffusers_lora, save_peft_adapter
    from nftcore.models.mmdit import MMDiT

    model = MMDiT.from_pretrained(folder, subfolder="transformer", dtype=torch.float32)
    apply_lora(model, rank=2, alpha=4.0, adapter_names=("default",), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, value in adapter_state(model, "default").items():
            if "lora_B" in key:
                value.copy_(torch.randn(value.shape, generator=g) * 0.5)
    save = save_peft_adapter if layout == "peft" else save_diffusers_lora
    save(model, "default", out)
    return out


@pytest.fixture(scope="module")
def qwen_lora(qwen_folder, tmp_path_factory):
    return save_lora(qwen_folder, tmp_path_factory.mktemp("lora") / "qwen")


def fake_png(path: Path, width: int, height: int) -> None:
    """A PNG header claiming width x height (never decoded: the size check reads the header only)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ true CFG


def test_true_cfg_matches_direct_computation_and_scale_one_is_identity():
    g = torch.Generator().manual_seed(0)
    w_c, w_u = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)

    def cond(x, sigma):
        return x @ w_c * sigma

    def uncond(x, sigma):
        return x @ w_u + sigma

    x = torch.randn(2, 5, 8, generator=g)
    v_c, v_u = cond(x, 0.7), uncond(x, 0.7)
    combined = v_u + 4.0 * (v_c - v_u)
    expected = combined * (v_c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(true_cfg(cond, uncond, 4.0)(x, 0.7), expected, rtol=0, atol=0)
    torch.testing.assert_close(combine_cfg(v_c, v_u, 4.0, rescale=False), combined, rtol=0, atol=0)
    # per token: every token keeps the conditional branch's norm
    torch.testing.assert_close(expected.norm(dim=-1), v_c.norm(dim=-1))

    assert true_cfg(cond, uncond, 1.0) is cond and true_cfg(cond, None, 1.0) is cond
    sigmas = [1.0, 0.6, 0.2, 0.0]
    assert torch.equal(sample(true_cfg(cond, uncond, 1.0), x, sigmas, solver="euler"),
                       sample(cond, x, sigmas, solver="euler"))
    with pytest.raises(ValueError, match="negative"):
        true_cfg(cond, None, 2.0)


# ------------------------------------------------------------------------------------------------ presets, stats


def test_presets(kontext_folder, qwen_folder, tmp_path):
    assert preset_for(kontext_folder) == "kontext" and preset_for(qwen_folder) == "qwen-image-edit"
    plus = tmp_path / "plus"
    plus.mkdir()
    (plus / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    assert preset_for(plus) == "qwen-image-edit-2509"
    k, q = resolve("kontext"), resolve("qwen-image-edit-2509")
    assert (k.num_steps, k.guidance, k.true_cfg_scale, k.max_area) == (28, 3.5, 1.0, 1024 * 1024)
    assert (q.num_steps, q.guidance, q.true_cfg_scale, q.negative_prompt) == (28, None, 4.0, " ")
    assert resolve("qwen-image-edit", true_cfg_scale=1.0, num_steps=None).true_cfg_scale == 1.0
    with pytest.raises(ValueError, match="unknown preset 'sdxl'.*kontext"):
        resolve("sdxl")
    with pytest.raises(ValueError, match="negative prompt"):
        resolve("kontext", true_cfg_scale=3.0)


def test_t_interval():
    for q, df, value in [(0.975, 1, 12.7062), (0.975, 10, 2.2281), (0.975, 30, 2.0423), (0.025, 5, -2.5706)]:
        assert student_t_quantile(q, df) == pytest.approx(value, abs=1e-4)
    stats = paired_difference([0.6, 0.7, 0.8, 0.9], [0.5, 0.5, 0.6, 0.6])
    diffs = np.array([0.1, 0.2, 0.2, 0.3])
    half = 3.1824 * diffs.std(ddof=1) / 2
    assert stats["diff_mean"] == pytest.approx(0.2) and stats["trained_mean"] == pytest.approx(0.75)
    assert (stats["ci_low"], stats["ci_high"]) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-4)
    assert math.isnan(paired_difference([1.0], [0.0])["ci_low"])


# ------------------------------------------------------------------------------------------------ readers


def test_benchmark_readers(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    random_image(np.random.default_rng(0), 32, 24).save(images / "a.png")
    gedit = tmp_path / "gedit.jsonl"
    gedit.write_text("\n".join([
        json.dumps({"key": "k1", "task_type": "color_alter", "instruction": "make it red",
                    "instruction_language": "en", "input_image": "a.png", "Intersection_exist": True}),
        "{not json",
        json.dumps({"key": "k2", "task_type": "color_alter", "instruction_language": "cn", "input_image": "a.png"}),
        json.dumps({"key": "k1", "task_type": "x", "instruction": "again", "input_image": "a.png"}),
    ]) + "\n")
    got = read_prompt_list(gedit, images)
    assert got.format == "gedit" and [i.key for i in got.items] == ["k1"]
    item = got.items[0]
    assert item.output == "fullset/color_alter/en/k1.png" and item.image_path == images / "a.png"
    assert item.metadata["task_type"] == "color_alter"
    assert [(b.key, b.where.rsplit(":", 1)[1]) for b in got.bad] == [("line-2", "2"), ("line-3", "3"), ("k1", "4")]
    assert "invalid JSON" in got.bad[0].error and "instruction" in got.bad[1].error and "duplicate" in got.bad[2].error

    imgedit = tmp_path / "basic_edit.json"
    imgedit.write_text(json.dumps({"1082": {"id": "a.png", "prompt": "add a hat", "edit_type": "add"},
                                   "7": {"id": "a.png", "edit_type": "add"}}))
    got = read_prompt_list(imgedit, images)
    assert got.format == "imgedit" and got.items[0].output == "1082.png" and got.items[0].metadata["edit_type"] == "add"
    assert [b.key for b in got.bad] == ["7"]

    split = write_split(tmp_path / "r1", n=2)
    with open(split, "a") as f:
        f.write(json.dumps({"prompt": "x", "image": "images/missing.png", "requirement": "r"}) + "\n")
    got = read_prompt_list(split)
    assert got.format == "edit-r1" and len(got.items) == 2 and got.items[0].requirement == "req 0"
    assert "image not found" in got.bad[0].error and got.bad[0].where.endswith(":3")
    with pytest.raises(ValueError, match="unknown prompt-list format"):
        read_prompt_list(split, fmt="magicbrush")


def test_source_image_checks(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    fake_png(tmp_path / "huge.png", 20000, 20000)
    fake_png(tmp_path / "big.png", 10000, 8000)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(SourceImageError, match=r"big\.png: image is 10000x8000 \(80 MP\), more than the 67 MP"):
        load_source_image(tmp_path / "big.png")
    with pytest.raises(SourceImageError, match=r"dot\.png: image is 1x1"):
        load_source_image(tmp_path / "dot.png")
    with pytest.raises(SourceImageError, match=r"huge\.png: image too large.*400000000 pixels"):
        load_source_image(tmp_path / "huge.png")
    with pytest.raises(SourceImageError, match=r"junk\.png: not a"):
        load_source_image(tmp_path / "junk.png")
    with pytest.raises(SourceImageError, match="image not found"):
        load_source_image(tmp_path / "nope.png")


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_merge_matches_unmerged_adapter_and_mismatch_names_key(kontext_folder, qwen_folder, qwen_lora,
                                                                    tmp_path):
    from nftcore.models import edit_velocity_fn
    from nftcore.models.lora import adapters_disabled
    from nftcore.models.mmdit import MMDiT

    lora = save_lora(kontext_folder, tmp_path / "kontext")
    preset = resolve("kontext", max_area=4096, num_steps=2, auto_resize=False)
    merged = Editor(kontext_folder, preset, lora=lora)
    live = Editor(kontext_folder, preset, lora=lora, keep_base=True)
    assert merged.lora == {"rank": 2, "alpha": 4.0, "modules": live.lora["modules"]}
    source = random_image(np.random.default_rng(1), 64, 64)
    cond = live.model.conditioning([source], ["make the sky blue"], height=64, width=64)
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    v_merged = edit_velocity_fn(merged.transformer, cond)(x, 0.5)
    torch.testing.assert_close(v_merged, edit_velocity_fn(live.transformer, cond)(x, 0.5), rtol=1e-5, atol=1e-5)
    with adapters_disabled(live.transformer):
        v_base = edit_velocity_fn(live.transformer, cond)(x, 0.5)
    assert (v_merged - v_base).abs().max() > 1e-3  # the LoRA does something

    qwen = MMDiT.from_pretrained(qwen_folder, subfolder="transformer", dtype=torch.float32)
    diffusers_layout = save_lora(qwen_folder, tmp_path / "diffusers", layout="diffusers")
    assert apply_lora_file(qwen, diffusers_layout / "pytorch_lora_weights.safetensors")["rank"] == 2

    qwen = MMDiT.from_pretrained(qwen_folder, subfolder="transformer", dtype=torch.float32)
    with pytest.raises(LoRAMismatchError, match=r"key 'single_transformer_blocks\.0\.attn\.to_k\.lora_A\.weight' "
                                                "names no adaptable module"):
        apply_lora_file(qwen, lora)
    tensors, _ = read_adapter_file(qwen_lora)
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[3]
    width = tensors[key].shape[1]
    tensors[key] = tensors[key][:, :-1]
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"base_model.model." + k: v.contiguous() for k, v in tensors.items()}, bad / "adapter_model.safetensors")
    shutil.copy(qwen_lora / "adapter_config.json", bad)
    with pytest.raises(LoRAMismatchError, match=rf"key {re.escape(key)} has shape \(2, {width - 1}\), the model "
                                                rf"needs \(2, {width}\)"):
        apply_lora_file(qwen, bad)
    assert not any("lora" in name for name, _ in qwen.named_modules())  # checked before the model is touched


# ------------------------------------------------------------------------------------------------ the command


def test_single_image_kontext(kontext_folder, tmp_path, capsys):
    source = tmp_path / "in.png"
    random_image(np.random.default_rng(2), 80, 48).save(source)
    out = tmp_path / "edits" / "out.png"
    args = ["--model", str(kontext_folder), "--image", str(source), "--prompt", "make the sky blue",
            "--out", str(out), "--no-auto-resize", *TINY]
    assert main(args) == 0
    edited = Image.open(out)
    assert edited.size == (80, 48)  # 4096 px in the source's 5:3 aspect, multiples of 16
    assert f"wrote {out}" in capsys.readouterr().out
    first = out.read_bytes()
    assert main(args) == 0 and out.read_bytes() == first  # deterministic
    assert main([*args, "--seed", "1"]) == 0 and out.read_bytes() != first


def test_bad_command_lines(qwen_folder, kontext_folder, tmp_path, capsys):
    source = tmp_path / "in.png"
    random_image(np.random.default_rng(2), 64, 64).save(source)
    base = ["--model", str(qwen_folder), "--image", str(source), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    assert main([*base, "--preset", "sdxl"]) == 2
    assert "unknown preset 'sdxl'" in capsys.readouterr().err
    assert main([*base, "--preset", "kontext", *TINY]) == 2
    assert "preset 'kontext' is for 'flux'" in capsys.readouterr().err
    kontext = ["--model", str(kontext_folder), *base[2:]]
    assert main([*kontext, "--lora", str(save_lora(qwen_folder, tmp_path / "q")), "--no-auto-resize", *TINY]) == 2
    err = capsys.readouterr().err
    assert "names no adaptable module" in err and ".lora_A.weight" in err
    assert main(["--model", str(qwen_folder), "--jsonl", "x.jsonl", "--image", str(source), "--out", "o"]) == 2


def test_prompt_list_run_with_failures_scores_compare_and_resume(qwen_folder, qwen_lora, tmp_path, capsys):
    split = write_split(tmp_path / "data", n=3)
    Image.new("RGB", (1, 1)).save(tmp_path / "data" / "images" / "dot.png")
    (tmp_path / "data" / "images" / "junk.png").write_bytes(b"garbage")
    with open(split, "a") as f:
        f.write(json.dumps({"prompt": "tiny", "image": "images/dot.png", "requirement": "r"}) + "\n")
        f.write(json.dumps({"prompt": "junk", "image": "images/junk.png", "requirement": "r"}) + "\n")
        f.write("{broken\n")
    out = tmp_path / "out"
    args = ["--model", str(qwen_folder), "--lora", str(qwen_lora), "--jsonl", str(split), "--out", str(out),
            "--batch-size", "2", "--score", str(tiny_judge_folder()), "--compare-base", *TINY]
    assert main(args) == 1  # three bad items
    printed = capsys.readouterr().out
    rows = manifest(out)
    assert len(rows) == 6 and not list(out.glob("manifest.rank*.jsonl"))
    ok = [r for r in rows if r["status"] == "ok"]
    failed = {r["where"].rsplit(":", 1)[1]: r["error"] for r in rows if r["status"] == "error"}
    assert len(ok) == 3 and set(failed) == {"4", "5", "6"}
    assert "dot.png: image is 1x1" in failed["4"] and "junk.png: not a" in failed["5"]
    assert "invalid JSON" in failed["6"] and failed["6"].startswith(str(split))
    for r in ok:
        assert 0 <= r["score"] <= 1 and 0 <= r["base_score"] <= 1 and r["score"] != r["base_score"]
        assert (out / r["output"]).is_file() and (out / r["base_output"]).is_file()
        assert r["settings"]["preset"]["true_cfg_scale"] == 4.0 and r["settings"]["lora"] == str(qwen_lora.resolve())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compare"]["n"] == 3 and summary["failed"] == 3
    assert summary["compare"]["trained_mean"] == pytest.approx(np.mean([r["score"] for r in ok]))
    assert "95% CI" in printed and "all" in printed
    assert Image.open(out / "compare_grid.png").size[1] == 3 * 256 + 4 * 4

    # resume: nothing is redone, the manifest still lists everything
    stamps = {r["key"]: (out / r["output"]).stat().st_mtime_ns for r in ok}
    assert main(args) == 1
    assert "3 ok (3 done by an earlier run), 3 failed" in capsys.readouterr().out
    assert {r["key"]: (out / r["output"]).stat().st_mtime_ns for r in ok} == stamps
    assert [r["key"] for r in manifest(out)] == [r["key"] for r in rows]
    assert json.loads((out / "summary.json").read_text())["skipped"] == 3

    # other settings into the same folder: refused, nothing written
    assert main([*args, "--seed", "5"]) == 2
    assert "seed differ" in capsys.readouterr().err


def test_batch_size_does_not_change_the_edits(kontext_folder, tmp_path):
    """Noise is per item, so batch size changes an edit by float rounding only (at most one 8-bit level)."""
    split = write_split(tmp_path / "data", n=3)
    outs = {}
    for batch in (1, 3):
        outs[batch] = tmp_path / f"b{batch}"
        args = ["--model", str(kontext_folder), "--jsonl", str(split), "--out", str(outs[batch]),
                "--batch-size", str(batch), "--no-auto-resize", *TINY]
        assert main(args) == 0
    for row in manifest(outs[1]):
        a = np.asarray(Image.open(outs[1] / row["output"]), dtype=int)
        b = np.asarray(Image.open(outs[3] / row["output"]), dtype=int)
        assert np.abs(a - b).max() <= 1
