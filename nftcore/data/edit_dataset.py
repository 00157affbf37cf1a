"""The Edit-R1 editing dataset: JSONL metadata + images, validated eagerly, decoded lazily.

The layout is `dataset_dir/{images/…, train_metadata.jsonl, test_metadata.jsonl}`; each JSONL line is one task::

    {"prompt": "<instruction>", "image": "<path relative to dataset_dir>", "requirement": "<scoring requirement>"}

`requirement` is the task-specific text the MLLM judge reads beside the instruction (§3.2); any further fields are
kept, untouched, in `EditSample.metadata`. Source images are centre-cropped to a square, then LANCZOS-resized to
`resolution` (§6, the reference's `PromptImageDataset`), after applying the EXIF orientation so that "left" in an
instruction means the left of the picture a person sees.

What differs from the reference, and why:

- **Bad data is never trained on silently.** Every line is validated when the dataset is built (JSON, field types,
  a non-empty prompt, the image file exists: cheap, no decoding), so a typo fails at start-up, not hours into a run.
  A bad line is a `DatasetError` reading `path:line: message`; with `on_error="skip"` it is skipped and recorded in
  `dataset.skipped` instead. An image path must stay inside the dataset directory once normalised (`../` that
  leaves it is a bad line, like an absolute path); only the path as written is checked, so a symlink placed inside
  the directory may point anywhere (the dataset owner's choice, e.g. images/ linked to a shared store).
- **Images are decoded lazily, and only as PNG, JPEG or WEBP** (`IMAGE_FORMATS`): no other PIL plugin ever sees a
  file, whatever its name or content (PIL's EPS plugin would run Ghostscript on it). Any failure to decode one
  (truncated, garbage, empty, another format, a decompression bomb, broken EXIF) is an `ImageDecodeError` (a
  `DatasetError`) reading `path:line: cannot read image …` and carrying the line, row index and sample id, so a
  caller can drop the sample instead of stopping; never a raw PIL exception. `verify_images=True` (or
  `dataset.verify_images()` before anything draws from it) decodes every image up front: under "skip" the bad ones
  are dropped like bad lines, so rows, sample ids and the sampler stay consistent.
- **Groups are keyed by sample, not by instruction text** (§4.2 keying caveat, §11.3). `sample_key(image, prompt)`
  gives each row a stable id, so two images that share an instruction are two groups and a ban removes one sample,
  not every image with that wording. Two lines with the same image and prompt would be one group under two rows, so
  such a duplicate is a bad line.
- **The epoch sampler is a pure function** of (sample ids, seed, epoch, bans): every rank computes the same list of
  groups with no communication, and a resumed run redraws exactly the epochs it would have drawn (§5.2).
  `derive_seed` gives every other random draw its own seed (§8, docs/DESIGN.md §3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Container, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("prompt", "image", "requirement")
ON_ERROR = ("raise", "skip")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""The PIL formats a source image may have; no other decoder is tried. JPEG covers the multi-picture JPEGs (MPO) that
cameras write, which PIL's JPEG decoder opens itself. Pillow must be built with WEBP support for WEBP files."""
MAX_LISTED = 10  # unreadable images listed by line in one verify_images error


class DatasetError(ValueError):
    """A dataset problem, its message prefixed with `path:line:` of the metadata line at fault (or `path:`)."""


class ImageDecodeError(DatasetError):
    """A row's image could not be decoded: `path:line: cannot read image FILE: reason`.

    `line` is the metadata line, `index` the row in `dataset.records` when raised by `load_image` / `__getitem__`,
    `sample_id` the row's id and `image_path` the file, so a trainer can drop and count the sample.
    """

    def __init__(self, message: str, *, line: int | None = None, index: int | None = None,
                 sample_id: str | None = None, image_path: Path | None = None):
        super().__init__(message)
        self.line, self.index, self.sample_id, self.image_path = line, index, sample_id, image_path


@dataclass(frozen=True)
class EditRecord:
    """One validated metadata line, without its image (what the sampler and logs need; decoding is lazy)."""

    line: int  # 1-based line number in the metadata file
    sample_id: str
    prompt: str
    requirement: str
    image: str  # the path as written in the metadata, normalised (posix, no "./")
    image_path: Path
    metadata: dict[str, Any] = field(default_factory=dict)  # every field beyond prompt/image/requirement


@dataclass(frozen=True)
class EditSample:
    """One dataset item: the instruction, the judge's requirement and the preprocessed source image."""

    sample_id: str
    prompt: str
    requirement: str
    image: Image.Image  # RGB, resolution × resolution
    metadata: dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# Keys and seeds


def sample_key(image: str, prompt: str) -> str:
    """The stable id of a (source image, instruction) pair: 16 hex digits of sha256(f"{image}::{prompt}").

    `image` is the metadata's relative path (normalised), so the id does not change when the dataset directory moves
    or the lines are reordered, and it is short enough for logs and checkpointed ban lists. 64 bits make an
    accidental collision negligible, and the dataset rejects one anyway, as a duplicate.
    """
    return hashlib.sha256(f"{image}::{prompt}".encode()).hexdigest()[:16]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values (e.g. (seed, epoch)); unlike `hash`, the same in every process."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum}, got {value!r}")
    return value


def epoch_indices(
    sample_ids: Sequence[str], num_groups: int, epoch: int, seed: int, banned: Container[str] = frozenset()
) -> list[int]:
    """Indices of the `num_groups` distinct, non-banned samples that form epoch `epoch`'s groups.

    The draw is a `torch.randperm` over the non-banned samples from a CPU generator seeded with
    `derive_seed(seed, epoch)`: deterministic, independent of rank and world size (each rank computes the same list;
    the trainer repeats each group K times and splits the rollouts over ranks), and independent of earlier epochs,
    so resuming at epoch e needs only e. `banned` is anything supporting `in` (a set, a `PromptBan`); ids in it that
    are not in `sample_ids` are ignored. Raises ValueError when fewer than `num_groups` samples remain.
    """
    _check_int("num_groups", num_groups, 1)
    _check_int("epoch", epoch, 0)
    _check_int("seed", seed, 0)
    allowed = [i for i, sample_id in enumerate(sample_ids) if sample_id not in banned]
    if len(allowed) < num_groups:
        raise ValueError(
            f"epoch {epoch} needs {num_groups} distinct samples but only {len(allowed)} of {len(sample_ids)} remain "
            f"({len(sample_ids) - len(allowed)} banned); lower num_groups or add data"
        )
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    order = torch.randperm(len(allowed), generator=generator)[:num_groups]
    return [allowed[j] for j in order.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# Image helpers


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square (odd leftovers go right/bottom), LANCZOS-resized to resolution × resolution."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 [3, H, W] in [0, 1] (RGB)."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3], a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


@cache
def _allowed_formats() -> tuple[str, ...]:
    """`IMAGE_FORMATS` that this Pillow can open (`Image.open` fails on a format it has no plugin for)."""
    Image.init()
    return tuple(fmt for fmt in IMAGE_FORMATS if fmt in Image.OPEN)


def _format_names() -> str:
    names = _allowed_formats()
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


class _BadImage(Exception):
    """Internal: why one image cannot be decoded (becomes an ImageDecodeError or a `skipped` entry)."""


def _decode_image(path: str | Path) -> Image.Image:
    """Open `path` as one of `IMAGE_FORMATS` only, fully decoded, EXIF orientation applied, as RGB.

    Raises `_BadImage` with the reason for any failure: PIL raises OSError, ValueError, SyntaxError (broken EXIF),
    DecompressionBombError and more, depending on the plugin and the damage, so anything but an interrupt counts.
    A truncated file fails unless `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` was switched on process-wide.
    """
    try:
        with Image.open(path, formats=_allowed_formats()) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except Image.UnidentifiedImageError:
        raise _BadImage(f"not a {_format_names()} image, or a corrupt one") from None
    except (Image.DecompressionBombError, OSError) as exc:
        raise _BadImage(str(exc) or type(exc).__name__) from exc
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise _BadImage(f"{type(exc).__name__}: {exc}") from exc


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """float [3, H, W] in [0, 1] -> RGB PIL image, clamped and rounded to uint8 (what a judge or a file sees)."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(tensor.shape)}")
    array = tensor.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


# ----------------------------------------------------------------------------------------------------------------
# The dataset


class _BadLine(Exception):
    """Internal: why one metadata line is unusable (becomes a DatasetError or a `skipped` entry)."""


def _parse(raw: bytes, root: Path) -> tuple[dict[str, Any], str, Path] | None:
    """One metadata line -> (its fields, the normalised image path, the image file), or None for a blank line.

    Raises _BadLine with the reason."""
    try:
        text = raw.decode("utf-8-sig")  # tolerate a BOM on line 1
    except UnicodeDecodeError as exc:
        raise _BadLine(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadLine(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(row, dict):
        raise _BadLine(f"expected a JSON object, got {type(row).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in row:
            raise _BadLine(f"missing field {name!r}")
        if not isinstance(row[name], str):
            raise _BadLine(f"field {name!r} must be a string, got {type(row[name]).__name__}")
    if not row["prompt"].strip():
        raise _BadLine("empty prompt")
    image = row["image"].strip().replace("\\", "/")
    if not image:
        raise _BadLine("empty image path")
    if posixpath.isabs(image) or Path(image).is_absolute():
        raise _BadLine(f"image path {image!r} must be relative to the dataset directory")
    image = posixpath.normpath(image)
    if image == ".." or image.startswith("../"):
        raise _BadLine(f"image path {row['image']!r} points outside the dataset directory (it must stay inside)")
    path = root / image
    if not path.is_file():
        raise _BadLine(f"image not found: {path}")
    return row, image, path


class EditDataset:
    """The `split` metadata of an Edit-R1 dataset directory: validated eagerly, images decoded on access.

    Args:
        root: the dataset directory, holding `{split}_metadata.jsonl` and the images it names.
        split: "train" or "test" (any name `{split}_metadata.jsonl` exists for).
        resolution: side of the square images returned (512 in Edit-R1).
        on_error: "raise" (default) makes the first bad line a `DatasetError`; "skip" drops bad lines, records
            `(line, reason)` in `self.skipped` and logs one warning. A dataset with no usable line is an error
            either way.
        verify_images: decode every image now (`verify_images()`), before the rows are handed out.

    `dataset[i]` is an `EditSample`; `dataset.records[i]` the same row without decoding its image.
    """

    def __init__(self, root: str | Path, split: str = "train", *, resolution: int = 512, on_error: str = "raise",
                 verify_images: bool = False):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.root = Path(root)
        self.split = split
        self.on_error = on_error
        self.resolution = _check_int("resolution", resolution, 1)
        self.metadata_path = self.root / f"{split}_metadata.jsonl"
        self.skipped: list[tuple[int, str]] = []
        if not self.metadata_path.is_file():
            raise DatasetError(f"{self.metadata_path}: metadata file not found")

        records: list[EditRecord] = []
        first_line: dict[str, int] = {}  # sample_id -> line that introduced it
        with open(self.metadata_path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                try:
                    parsed = _parse(raw, self.root)
                    if parsed is None:
                        continue
                    row, image, image_path = parsed
                    sample_id = sample_key(image, row["prompt"])
                    if sample_id in first_line:
                        raise _BadLine(f"duplicate sample: same image and prompt as line {first_line[sample_id]}")
                except _BadLine as exc:
                    if on_error == "raise":
                        raise DatasetError(f"{self.metadata_path}:{line}: {exc}") from None
                    self.skipped.append((line, str(exc)))
                    continue
                first_line[sample_id] = line
                extra = {k: v for k, v in row.items() if k not in REQUIRED_FIELDS}
                records.append(
                    EditRecord(
                        line=line,
                        sample_id=sample_id,
                        prompt=row["prompt"],
                        requirement=row["requirement"],
                        image=image,
                        image_path=image_path,
                        metadata=extra,
                    )
                )
        if self.skipped:
            logger.warning(
                "%s: skipped %d bad line(s), first: line %d: %s",
                self.metadata_path, len(self.skipped), *self.skipped[0],
            )
        self._set_records(records)
        if verify_images:
            self.verify_images()

    def _set_records(self, records: list[EditRecord]) -> None:
        """The rows, and the sample ids the sampler draws from, always together."""
        if not records:
            raise DatasetError(f"{self.metadata_path}: no usable samples ({len(self.skipped)} bad line(s) skipped)")
        self.records: tuple[EditRecord, ...] = tuple(records)
        self.sample_ids: list[str] = [r.sample_id for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EditSample:
        record = self.records[index]
        image = self.load_image(index)
        # A copy of the metadata: a trainer annotating its samples must not edit the dataset.
        return EditSample(record.sample_id, record.prompt, record.requirement, image, dict(record.metadata))

    def load_image(self, index: int) -> Image.Image:
        """Decode row `index`'s image: EXIF orientation, RGB, centre crop, resize. Any failure is an
        `ImageDecodeError` naming the metadata line (see the module docstring)."""
        record = self.records[index]
        try:
            return center_crop_resize(_decode_image(record.image_path), self.resolution)
        except _BadImage as exc:
            raise self._image_error(index, str(exc)) from exc.__cause__

    def placeholder(self, index: int) -> EditSample:
        """Row `index` with a mid-grey image in place of its own: a stand-in that keeps a rollout batch whole after
        `ImageDecodeError`, for a sample whose result is then thrown away (its group dropped for the epoch)."""
        record = self.records[index]
        image = Image.new("RGB", (self.resolution, self.resolution), (128, 128, 128))
        return EditSample(record.sample_id, record.prompt, record.requirement, image, dict(record.metadata))

    def _image_error(self, index: int, reason: str, suffix: str = "") -> ImageDecodeError:
        record = self.records[index]
        return ImageDecodeError(f"{self.metadata_path}:{record.line}: cannot read image {record.image_path}: "
                                f"{reason}{suffix}", line=record.line, index=index, sample_id=record.sample_id,
                                image_path=record.image_path)

    def verify_images(self, workers: int | None = None) -> list[tuple[int, str]]:
        """Decode every row's image now, in `workers` threads (default: up to 8), and deal with the unreadable ones
        as `on_error` says: "raise" raises `ImageDecodeError` for the first (by line) and lists the lines of up to
        `MAX_LISTED` more; "skip" drops them, adds `(line, reason)` to `self.skipped`, logs one warning and returns
        the entries added. Call it before anything draws from the dataset: it renumbers the rows (as a bad line
        found at construction would have)."""
        workers = workers or min(8, os.cpu_count() or 1)

        def problem(record: EditRecord) -> str | None:
            try:
                _decode_image(record.image_path)
            except _BadImage as exc:
                return str(exc)
            return None

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify-images") as pool:
            problems = list(pool.map(problem, self.records))
        bad = [(index, reason) for index, reason in enumerate(problems) if reason is not None]
        if not bad:
            return []
        if self.on_error == "raise":
            suffix = ""
            if len(bad) > 1:
                lines = [str(self.records[index].line) for index, _ in bad[1:1 + MAX_LISTED]]
                more = ", …" if len(bad) - 1 > MAX_LISTED else ""
                suffix = (f" (and {len(bad) - 1} more unreadable image(s): line{'s' * (len(bad) > 2)} "
                          f"{', '.join(lines)}{more})")
            raise self._image_error(bad[0][0], bad[0][1], suffix)
        dropped = [(self.records[index].line, f"cannot read image {self.records[index].image_path}: {reason}")
                   for index, reason in bad]
        self.skipped = sorted(self.skipped + dropped)
        logger.warning("%s: skipped %d unreadable image(s), first: line %d: %s", self.metadata_path, len(dropped),
                       *dropped[0])
        self._set_records([record for record, reason in zip(self.records, problems) if reason is None])
        return dropped

    def epoch_prompts(self, num_groups: int, epoch: int, seed: int, banned: Container[str] = frozenset()) -> list[int]:
        """This epoch's group indices (see `epoch_indices`); `banned` holds sample ids."""
        return epoch_indices(self.sample_ids, num_groups, epoch, seed, banned)

    def __repr__(self) -> str:
        return (
            f"EditDataset({str(self.root)!r}, split={self.split!r}, samples={len(self)}, "
            f"resolution={self.resolution}, skipped={len(self.skipped)})"
        )
