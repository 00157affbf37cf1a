"""Prompt lists to edit: an Edit-R1 split, GEdit-Bench and ImgEdit, read into one `EditItem` list.

Formats (`read_prompt_list(path, images=..., fmt="auto")` picks one from the file):

- **Edit-R1** (`*.jsonl`): `{"prompt", "image", "requirement", ...}` per line, validated line by line exactly as
  `EditDataset` does (same reader); the key is the dataset's sample id, the output `<key>.png`.
- **GEdit-Bench** (`*.jsonl`, the Hugging Face parquet exported with its images saved as files): `{"key",
  "task_type", "instruction", "instruction_language", "input_image": "<path>", ...}` per line (`image_path` or
  `input_image_raw` are accepted for the path too); the output is `fullset/<task_type>/<language>/<key>.png`,
  the layout GEdit-Bench's evaluation reads.
- **ImgEdit** (`*.json`, e.g. `basic_edit.json`): `{"<id>": {"id": "<image path>", "prompt", "edit_type"}, ...}`
  (an `image` field, when present, is the path instead); the output is `<id>.png`.

Image paths are relative to `images` (default: the file's folder). A line that cannot be used becomes a `BadItem`
(its key, `file:line` and the reason) instead of stopping the read: a benchmark run records it and goes on.
`load_source_image` decodes a source as the dataset does (PNG/JPEG/WEBP only, EXIF orientation, RGB), after checking
its size from the header, so a tiny or gigantic image is a clear error before anything is decoded.

See docs/INFERENCE.md, "Prompt-list formats".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from nftcore.data.edit_dataset import _allowed_formats, _BadLine, _format_names, _parse, sample_key

__all__ = ["FORMATS", "MIN_SIDE", "MAX_PIXELS", "BadItem", "EditItem", "PromptList", "SourceImageError",
           "detect_format", "load_source_image", "read_prompt_list"]

FORMATS = ("edit-r1", "gedit", "imgedit")
MIN_SIDE = 16  # pixels: below one 16-pixel latent patch there is nothing to edit
MAX_PIXELS = 64 * 1024 * 1024  # 64 MP: the pipelines resize to ~1 MP, so this only guards against bombs
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class SourceImageError(ValueError):
    """A source image that cannot be edited (missing, unreadable, too small or too large)."""


@dataclass(frozen=True)
class EditItem:
    """One edit to make: `output` is the path of the result relative to the output folder."""

    key: str
    prompt: str
    image_path: Path
    output: str
    requirement: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "file:line" (or "file:<id>") for messages


@dataclass(frozen=True)
class BadItem:
    """An entry of the prompt list that could not be read."""

    key: str
    where: str
    error: str


@dataclass
class PromptList:
    format: str
    items: list[EditItem]
    bad: list[BadItem]


def _safe(part: Any) -> str:
    """A path component that stays one component (no separators, no '..')."""
    text = _SAFE.sub("_", str(part)).strip(".") or "_"
    return text


def detect_format(path: Path) -> str:
    """'imgedit' for a .json file; for JSONL, 'gedit' if the first object has GEdit's fields, else 'edit-r1'."""
    if path.suffix.lower() == ".json":
        return "imgedit"
    with open(path, "rb") as f:
        for raw in f:
            try:
                row = json.loads(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                return "gedit" if "instruction" in row and "key" in row else "edit-r1"
    return "edit-r1"


def _read_edit_r1(path: Path, root: Path) -> tuple[list[EditItem], list[BadItem]]:
    items, bad = [], []
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            where = f"{path}:{line}"
            try:
                parsed = _parse(raw, root)
            except _BadLine as exc:
                bad.append(BadItem(f"line-{line}", where, str(exc)))
                continue
            if parsed is not None:
                row, image, image_path = parsed
                key = sample_key(image, row["prompt"])
                extra = {k: v for k, v in row.items() if k not in ("prompt", "image", "requirement")}
                items.append(EditItem(key, row["prompt"], image_path, f"{key}.png", row["requirement"], extra, where))
    return items, bad


def _gedit_item(row: Any, root: Path, where: str) -> EditItem:
    if not isinstance(row, dict):
        raise _BadLine(f"expected a JSON object, got {type(row).__name__}")
    for name in ("key", "instruction"):
        if not isinstance(row.get(name), (str, int)) or not str(row[name]).strip():
            raise _BadLine(f"missing or empty field {name!r}")
    image = next((row[k] for k in ("input_image", "image_path", "input_image_raw") if isinstance(row.get(k), str)),
                 None)
    if not image:
        raise _BadLine("missing field 'input_image' (the source image's path)")
    key = str(row["key"])
    task, language = _safe(row.get("task_type", "all")), _safe(row.get("instruction_language", "en"))
    extra = {k: v for k, v in row.items() if k not in ("key", "instruction", "input_image", "image_path",
                                                       "input_image_raw")}
    return EditItem(key, str(row["instruction"]), root / image, f"fullset/{task}/{language}/{_safe(key)}.png",
                    None, extra, where)


def _read_gedit(path: Path, root: Path) -> tuple[list[EditItem], list[BadItem]]:
    items, bad = [], []
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            where = f"{path}:{line}"
            try:
                text = raw.decode("utf-8-sig")
                if not text.strip():
                    continue
                items.append(_gedit_item(json.loads(text), root, where))
            except UnicodeDecodeError:
                bad.append(BadItem(f"line-{line}", where, "not valid UTF-8"))
            except json.JSONDecodeError as exc:
                bad.append(BadItem(f"line-{line}", where, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            except _BadLine as exc:
                bad.append(BadItem(f"line-{line}", where, str(exc)))
    return items, bad


def _read_imgedit(path: Path, root: Path) -> tuple[list[EditItem], list[BadItem]]:
    try:
        table = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object of id -> {{id, prompt, edit_type}}, "
                         f"got {type(table).__name__}")
    items, bad = [], []
    for key, row in table.items():
        where = f"{path}:{key}"
        image = row.get("image", row.get("id")) if isinstance(row, dict) else None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            bad.append(BadItem(str(key), where, "missing or empty field 'prompt'"))
        elif not isinstance(image, str) or not image.strip():
            bad.append(BadItem(str(key), where, "missing field 'id' (the source image's path)"))
        else:
            extra = {k: v for k, v in row.items() if k not in ("prompt", "image")}
            items.append(EditItem(str(key), prompt, root / image, f"{_safe(key)}.png", None, extra, where))
    return items, bad


_READERS = {"edit-r1": _read_edit_r1, "gedit": _read_gedit, "imgedit": _read_imgedit}


def read_prompt_list(path: str | Path, images: str | Path | None = None, fmt: str = "auto") -> PromptList:
    """Every item of a prompt list, in file order; unusable entries in `.bad`. Two entries with one key (or one
    output file) make the second a bad entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt list not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in _READERS:
        raise ValueError(f"unknown prompt-list format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    root = Path(images) if images is not None else path.parent
    items, bad = _READERS[fmt](path, root)
    seen: dict[str, str] = {}
    unique = []
    for item in items:
        for name in (item.key, item.output):
            if name in seen:
                bad.append(BadItem(item.key, item.where, f"duplicate: {name!r} already used at {seen[name]}"))
                break
        else:
            seen[item.key] = seen[item.output] = item.where
            unique.append(item)
    if not unique and not bad:
        raise ValueError(f"{path}: no items")
    return PromptList(fmt, unique, bad)


def load_source_image(path: str | Path, *, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The source as RGB with its EXIF orientation applied; `SourceImageError` names the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise SourceImageError(f"image not found: {path}")
    try:
        with Image.open(path, formats=_allowed_formats()) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise SourceImageError(f"{path}: image is {width}x{height} ({width * height / 1e6:.0f} MP), more "
                                       f"than the {max_pixels / 1e6:.0f} MP limit")
            if min(width, height) < min_side:
                raise SourceImageError(f"{path}: image is {width}x{height}; both sides must be at least {min_side} "
                                       "pixels")
            return ImageOps.exif_transpose(image).convert("RGB")
    except SourceImageError:
        raise
    except Image.UnidentifiedImageError:
        raise SourceImageError(f"{path}: not a {_format_names()} image, or a corrupt one") from None
    except Image.DecompressionBombError as exc:  # PIL refuses before our check for the very largest headers
        raise SourceImageError(f"{path}: image too large to decode safely ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for damaged files; all mean "unreadable"
        raise SourceImageError(f"{path}: cannot read image: {type(exc).__name__}: {exc}") from None
