"""nftcore.data: Edit-R1 JSONL validation (errors name file:line), skip mode, centre crop + resize, sample ids,
and the deterministic, rank-independent epoch sampler."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nftcore.data import (
    IMAGE_FORMATS,
    DatasetError,
    EditDataset,
    EditSample,
    ImageDecodeError,
    center_crop_resize,
    epoch_indices,
    sample_key,
    to_pil,
    to_tensor,
)
from nftcore.nft import PromptBan


def _image(path: Path, size=(24, 16), color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _write(root: Path, lines: list, split: str = "train") -> Path:
    """Write metadata lines (dicts are JSON-encoded, str/bytes written as is) and return the metadata path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{split}_metadata.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def _row(image="images/a.png", prompt="make the sky purple", requirement="sky only", **extra) -> dict:
    return {"prompt": prompt, "image": image, "requirement": requirement, **extra}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("a", "b", "c"):
        _image(tmp_path / "images" / f"{name}.png")
    return tmp_path


def test_good_lines_load(root: Path):
    _write(root, [_row(task="recolor", difficulty=2), "", _row("images/b.png", "remove the cat", "")])
    ds = EditDataset(root, resolution=8)
    assert len(ds) == 2 and ds.skipped == []
    sample = ds[0]
    assert isinstance(sample, EditSample)
    assert (sample.prompt, sample.requirement) == ("make the sky purple", "sky only")
    assert sample.metadata == {"task": "recolor", "difficulty": 2}  # extra fields kept, required ones not repeated
    assert sample.image.mode == "RGB" and sample.image.size == (8, 8)
    assert ds.records[1].line == 3  # the blank line is not data but still counts for line numbers
    assert ds[1].requirement == "" and ds[1].metadata == {}
    expected = [sample_key("images/a.png", "make the sky purple"), sample_key("images/b.png", "remove the cat")]
    assert ds.sample_ids == expected
    tensor = to_tensor(sample.image)
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([200, 30, 30]) / 255.0)


def test_center_crop_then_resize_keeps_the_middle(tmp_path: Path):
    # 40 × 20 (W × H): 10 px red bands on the left and right must be cropped away; the centre 20 × 20 square is
    # white above black, which must survive the LANCZOS resize as two clean halves.
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :10] = (255, 0, 0)
    array[:, 30:] = (255, 0, 0)
    array[:10, 10:30] = 255
    _write(tmp_path, [_row("wide.png")])
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = to_tensor(EditDataset(tmp_path, resolution=10)[0].image)
    assert image.shape == (3, 10, 10)
    assert torch.all(image[:, :4] > 0.95) and torch.all(image[:, 6:] < 0.05)  # top white, bottom black, no red
    assert torch.allclose(image[0], image[1], atol=0.02)  # grey levels only: the red bands are gone

    tall = Image.fromarray(np.arange(7 * 5 * 3, dtype=np.uint8).reshape(7, 5, 3))  # odd leftover: 1 px top, 1 bottom
    crop = center_crop_resize(tall, 5)
    assert np.array_equal(np.asarray(crop), np.asarray(tall)[1:6])


def test_exif_orientation_is_applied(tmp_path: Path):
    array = np.zeros((4, 8, 3), dtype=np.uint8)  # 8 wide, 4 high; stored rotated, shown upright via EXIF
    array[:, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(array).save(tmp_path / "rot.png", exif=exif)
    _write(tmp_path, [_row("rot.png")])
    image = to_tensor(EditDataset(tmp_path, resolution=4)[0].image)
    assert torch.all(image[:, :2] > 0.9) and torch.all(image[:, 2:] < 0.1)  # white ends on top after rotation


BAD_LINES = [
    ('{"prompt": "x", "image": ', "invalid JSON"),
    ('["a list"]', "expected a JSON object, got list"),
    ({"image": "images/a.png", "requirement": ""}, "missing field 'prompt'"),
    ({"prompt": "x", "requirement": ""}, "missing field 'image'"),
    ({"prompt": "x", "image": "images/a.png"}, "missing field 'requirement'"),
    (_row(prompt=3), "field 'prompt' must be a string, got int"),
    (_row(requirement=None), "field 'requirement' must be a string, got NoneType"),
    (_row(prompt="   "), "empty prompt"),
    (_row(image=""), "empty image path"),
    (_row(image="/etc/passwd"), "must be relative"),
    (_row(image="../c.png"), "outside the dataset directory"),
    (_row(image="images/../../c.png"), "outside the dataset directory"),
    (_row(image="images\\..\\..\\c.png"), "outside the dataset directory"),
    (_row(image="images/missing.png"), "image not found"),
    (_row(image="./images/c.png"), "duplicate sample: same image and prompt as line 1"),
    (b'{"prompt": "caf\xe9", "image": "images/a.png", "requirement": ""}', "not valid UTF-8"),
]


@pytest.mark.parametrize("line, reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_names_file_and_line(root: Path, line, reason: str):
    path = _write(root, [_row("images/c.png"), _row("images/b.png"), line])
    with pytest.raises(DatasetError) as info:
        EditDataset(root)
    assert str(info.value).startswith(f"{path}:3: ") and reason in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


def test_skip_mode_counts_bad_lines(root: Path, caplog):
    lines = [_row("images/a.png"), "not json", _row(prompt=""), _row("images/b.png"), _row("images/nope.png")]
    _write(root, lines)
    ds = EditDataset(root, on_error="skip")
    assert [r.line for r in ds.records] == [1, 4]
    assert [line for line, _ in ds.skipped] == [2, 3, 5]
    assert "invalid JSON" in ds.skipped[0][1] and "empty prompt" in ds.skipped[1][1]
    assert "skipped 3 bad line(s)" in caplog.text


def test_no_usable_samples_and_missing_metadata(root: Path, tmp_path: Path):
    _write(root, ["{", _row(prompt="")])
    with pytest.raises(DatasetError, match="no usable samples"):
        EditDataset(root, on_error="skip")
    with pytest.raises(DatasetError, match="test_metadata.jsonl: metadata file not found"):
        EditDataset(root, "test")
    with pytest.raises(ValueError, match="on_error"):
        EditDataset(root, on_error="ignore")


def test_corrupt_image_fails_at_load_naming_the_line(root: Path):
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    path = _write(root, [_row(), _row("images/broken.png")])
    ds = EditDataset(root)  # existence is all construction checks
    ds[0]
    with pytest.raises(DatasetError, match="^" + re.escape(f"{path}:2: cannot read image")):
        ds[1]


def test_sample_ids_key_on_image_and_prompt(root: Path, tmp_path: Path):
    _write(root, [_row("images/a.png"), _row("images/b.png"), _row("images/a.png", prompt="remove the cat")])
    ds = EditDataset(root)
    assert len(set(ds.sample_ids)) == 3  # same instruction on two images: two groups
    assert all(len(s) == 16 and int(s, 16) >= 0 for s in ds.sample_ids)
    # Stable: independent of where the dataset lives and of line order.
    other = tmp_path / "moved"
    _image(other / "images" / "a.png")
    _image(other / "images" / "b.png")
    _write(other, [_row("images/b.png"), _row("images/a.png")])
    assert EditDataset(other).sample_ids == ds.sample_ids[1::-1]


def test_epoch_sampler_deterministic_rank_independent_and_banned(root: Path):
    ids = [f"s{i}" for i in range(50)]
    first = epoch_indices(ids, 12, epoch=3, seed=42)
    torch.manual_seed(123)  # global RNG state, as a different rank would have, must not matter ...
    state = torch.get_rng_state()
    assert epoch_indices(ids, 12, epoch=3, seed=42) == first
    assert torch.equal(torch.get_rng_state(), state)  # ... nor be consumed
    assert len(set(first)) == 12 and all(0 <= i < 50 for i in first)
    assert epoch_indices(ids, 12, epoch=4, seed=42) != first
    assert epoch_indices(ids, 12, epoch=3, seed=43) != first

    banned = {ids[i] for i in first} | {"not-in-dataset"}
    after = epoch_indices(ids, 12, epoch=3, seed=42, banned=banned)
    assert not set(after) & set(first)
    ban = PromptBan()
    ban.update(torch.ones(40), torch.arange(40), ids[:40])  # one-sample groups at reward 1: all 40 banned
    assert sorted(epoch_indices(ids, 10, epoch=0, seed=0, banned=ban)) == list(range(40, 50))
    with pytest.raises(ValueError, match=r"needs 11 distinct samples but only 10 of 50 remain \(40 banned\)"):
        epoch_indices(ids, 11, epoch=0, seed=0, banned=ban)

    _write(root, [_row("images/a.png"), _row("images/b.png"), _row("images/c.png")])
    ds = EditDataset(root)
    assert ds.epoch_prompts(3, 0, 7) == epoch_indices(ds.sample_ids, 3, 0, 7)
    assert ds.epoch_prompts(2, 0, 7, banned={ds.sample_ids[0]}) in ([1, 2], [2, 1])


def test_to_pil_round_trip():
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    back = to_tensor(to_pil(image))
    assert back.shape == image.shape and (back - image).abs().max() <= 0.5 / 255 + 1e-6


def test_trainer_data_bad_lines_option(root: Path):
    """The trainer's `data.bad_lines`: 'error' (default) names file and line, 'skip' drops and counts."""
    from nftcore.config import load_config
    from nftcore.trainer.edit_family import _datasets

    _write(root, [_row("images/a.png"), "not json", _row("images/b.png")])
    args = ["--model.family", "flux", "--model.path", "unused", "--data.path", str(root), "--eval.every", "0"]
    with pytest.raises(DatasetError, match="train_metadata.jsonl:2"):
        _datasets(load_config(args))
    train, test = _datasets(load_config([*args, "--data.bad_lines", "skip"]))
    assert len(train.records) == 2 and [line for line, _ in train.skipped] == [2] and test is None


# ---------------------------------------------------------------------------------------------- paths and images


def test_image_paths_must_stay_inside_the_dataset_folder(tmp_path: Path):
    root = tmp_path / "dataset"
    _image(root / "images" / "a.png")
    _image(tmp_path / "secret.png")  # exists, so only the escape can make these lines bad
    lines = [_row(), _row("../secret.png"), _row("images/../../secret.png"), _row("images/./../images/a.png", "x")]
    path = _write(root, lines)
    with pytest.raises(DatasetError, match="^" + re.escape(f"{path}:2: image path '../secret.png'")) as info:
        EditDataset(root)
    assert "outside the dataset directory" in str(info.value)
    ds = EditDataset(root, on_error="skip")
    assert [r.line for r in ds.records] == [1, 4] and [line for line, _ in ds.skipped] == [2, 3]
    assert ds.records[1].image == "images/a.png"  # normalised, and still inside: fine


def test_a_symlink_inside_the_folder_may_point_anywhere(tmp_path: Path):
    """Only the written path is checked: a link the dataset's owner placed inside the folder is their choice."""
    root = tmp_path / "dataset"
    _image(tmp_path / "shared" / "a.png")
    (root / "images").mkdir(parents=True)
    try:
        (root / "images" / "a.png").symlink_to(tmp_path / "shared" / "a.png")
    except OSError:
        pytest.skip("no symlinks here")
    _write(root, [_row()])
    assert EditDataset(root, resolution=4)[0].image.size == (4, 4)


def _encoded(fmt: str, size=(24, 16), noise: bool = False, **save) -> bytes:
    array = np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8) if noise else None
    image = Image.fromarray(array) if noise else Image.new("RGB", size, (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


CORRUPT_IMAGES = {
    "truncated": lambda: _encoded("PNG", (64, 64), noise=True)[:-200],
    "garbage": lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "zero-size": lambda: b"",
    "bad EXIF": lambda: _encoded("PNG", exif=b"Exif\x00\x00garbage!!"),  # PIL raises SyntaxError from the EXIF parser
    "GIF": lambda: _encoded("GIF"),  # a real image, but not a format the dataset reads
    "BMP": lambda: _encoded("BMP"),
    "TIFF": lambda: _encoded("TIFF"),
    "EPS": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
}


@pytest.mark.parametrize("kind", CORRUPT_IMAGES)
def test_any_decode_failure_is_an_image_decode_error_naming_the_line(root: Path, kind: str):
    (root / "images" / "broken.png").write_bytes(CORRUPT_IMAGES[kind]())
    path = _write(root, [_row(), _row("images/broken.png")])
    ds = EditDataset(root)
    for read in (ds.__getitem__, ds.load_image):
        with pytest.raises(ImageDecodeError) as info:
            read(1)
        error = info.value
        assert isinstance(error, DatasetError) and isinstance(error, ValueError)
        assert str(error).startswith(f"{path}:2: cannot read image {root / 'images' / 'broken.png'}: "), str(error)
        assert (error.line, error.index, error.sample_id) == (2, 1, ds.sample_ids[1])
        assert error.image_path == root / "images" / "broken.png"
    if kind in ("GIF", "BMP", "TIFF", "EPS"):
        assert "not a PNG, JPEG or WEBP image" in str(error), str(error)
    stand_in = ds.placeholder(1)  # what a trainer can roll out instead, then drop
    assert (stand_in.sample_id, stand_in.prompt) == (ds.sample_ids[1], ds.records[1].prompt)
    assert stand_in.image.size == (512, 512) and stand_in.image.mode == "RGB"


def test_decompression_bomb_is_an_image_decode_error(root: Path, monkeypatch):
    _write(root, [_row()])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 24 * 16 // 4)  # twice that is still below the 384 pixels
    with pytest.raises(ImageDecodeError, match=":1: cannot read image .*decompression bomb"):
        EditDataset(root)[0]


def test_only_the_allowed_formats_plugins_ever_see_a_file(root: Path, monkeypatch):
    """A file is tried only by the PNG, JPEG and WEBP decoders: e.g. PIL's EPS plugin, which runs Ghostscript on the
    file, must never be reached, whatever the file's name or content."""
    Image.init()
    called = []
    for fmt in list(Image.OPEN):
        if fmt not in IMAGE_FORMATS:
            factory, accept = Image.OPEN[fmt]
            monkeypatch.setitem(Image.OPEN, fmt, (lambda *a, _f=fmt, **k: called.append(_f) or 1 / 0, accept))
    for name, kind in (("a.eps", "EPS"), ("b.png", "EPS"), ("c.gif", "GIF"), ("d.tif", "TIFF")):
        (root / "images" / name).write_bytes(CORRUPT_IMAGES[kind]())
    _write(root, [_row(f"images/{n}") for n in ("a.eps", "b.png", "c.gif", "d.tif")])
    ds = EditDataset(root)
    for index in range(len(ds)):
        with pytest.raises(ImageDecodeError, match="not a PNG, JPEG or WEBP image"):
            ds[index]
    assert called == []


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_allowed_formats_decode(root: Path, fmt: str, suffix: str):
    (root / "images" / f"x.{suffix}").write_bytes(_encoded(fmt))
    _write(root, [_row(f"images/x.{suffix}")])
    image = EditDataset(root, resolution=4, verify_images=True)[0].image
    assert image.size == (4, 4) and image.mode == "RGB"


def _with_broken_images(root: Path) -> Path:
    (root / "images" / "broken.png").write_bytes(b"")
    (root / "images" / "cut.png").write_bytes(_encoded("PNG", (64, 64), noise=True)[:-200])
    return _write(root, [_row(), _row("images/broken.png"), _row("images/b.png"), "not json", _row("images/cut.png"),
                         _row("images/c.png")])


def test_verify_images_raises_naming_the_first_bad_file_and_counting_the_rest(root: Path):
    (root / "images" / "broken.png").write_bytes(b"")
    (root / "images" / "cut.png").write_bytes(_encoded("PNG", (64, 64), noise=True)[:-200])
    path = _write(root, [_row(), _row("images/broken.png"), _row("images/b.png"), _row("images/cut.png")])
    assert len(EditDataset(root)) == 4  # existence is all construction checks without verification
    with pytest.raises(ImageDecodeError) as info:
        EditDataset(root, verify_images=True)
    message = str(info.value)
    assert message.startswith(f"{path}:2: cannot read image {root / 'images' / 'broken.png'}: "), message
    assert info.value.line == 2
    assert "(and 1 more unreadable image(s): line 4)" in message, message


def test_verify_images_under_skip_drops_bad_images_like_bad_lines(root: Path, caplog):
    _with_broken_images(root)
    ds = EditDataset(root, on_error="skip", verify_images=True)
    assert [r.line for r in ds.records] == [1, 3, 6]
    assert ds.sample_ids == [r.sample_id for r in ds.records]  # ids, records and the sampler agree
    assert [line for line, _ in ds.skipped] == [2, 4, 5]
    assert "cannot read image" in dict(ds.skipped)[2] and "invalid JSON" in dict(ds.skipped)[4]
    assert sorted(ds.epoch_prompts(3, epoch=0, seed=0)) == [0, 1, 2]
    assert all(ds[i].image.size == (512, 512) for i in range(len(ds)))
    assert "2 unreadable image(s)" in caplog.text

    # The same as verifying later, by hand, before anything drew from the dataset.
    late = EditDataset(root, on_error="skip")
    assert len(late) == 5
    assert [line for line, _ in late.verify_images()] == [2, 5]
    assert (late.records, late.sample_ids, late.skipped) == (ds.records, ds.sample_ids, ds.skipped)
    assert late.verify_images() == []  # nothing left to drop


def test_verify_images_leaving_nothing_is_an_error(root: Path):
    (root / "images" / "broken.png").write_bytes(b"")
    _write(root, [_row("images/broken.png")])
    with pytest.raises(DatasetError, match="no usable samples"):
        EditDataset(root, on_error="skip", verify_images=True)


def test_trainer_data_verify_images_option(root: Path, monkeypatch):
    """`data.verify_images` decodes both splits when the family is built, before the first epoch."""
    from nftcore.config import load_config
    from nftcore.trainer import edit_family, family

    (root / "images" / "broken.png").write_bytes(b"")
    _write(root, [_row(), _row("images/broken.png")])
    _write(root, [_row("images/b.png")], split="test")
    args = ["--model.family", "flux", "--model.path", "unused", "--data.path", str(root)]

    class Stub:
        def __init__(self, cfg, device):
            self.train_dataset, self.eval_dataset = edit_family._datasets(cfg)

    monkeypatch.setattr(edit_family, "EditFamily", Stub)
    fam = family.build_family(load_config(args), torch.device("cpu"))
    assert len(fam.train_dataset) == 2  # off by default
    with pytest.raises(ImageDecodeError, match="train_metadata.jsonl:2: cannot read image"):
        family.build_family(load_config([*args, "--data.verify_images"]), torch.device("cpu"))
    fam = family.build_family(load_config([*args, "--data.verify_images", "--data.bad_lines=skip"]),
                              torch.device("cpu"))
    assert len(fam.train_dataset) == 1 and [line for line, _ in fam.train_dataset.skipped] == [2]
    assert len(fam.eval_dataset) == 1
