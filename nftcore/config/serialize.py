"""The config as data: a JSON-ready dict (saved with every checkpoint), a readable TOML dump, and the way back.

Both forms are complete (every field of every section) and carry the recipe the config started from. Loading starts
from that recipe and hands each field to the command line's parser (`overrides`) as `--section.key=value`, so a file
accepts exactly what a flag does and fails with the same messages; floats are written with `repr`, which round-trips,
so `load(dump(cfg)) == cfg`. A hand-written TOML file may instead say only `recipe = "..."` and the fields it changes.
TOML has no null: an unset optional field is written "none", which the parser reads back as None.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from nftcore.config.errors import ConfigError
from nftcore.config.overrides import apply_overrides
from nftcore.config.recipes import DEFAULT_RECIPE, build_recipe
from nftcore.config.sections import SECTIONS, TrainConfig


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """`{"recipe": ..., "run": {...}, ...}` with plain JSON types (tuples become lists, unset optionals None)."""
    data: dict[str, Any] = {"recipe": cfg.recipe}
    for name in SECTIONS:
        section = getattr(cfg, name)
        data[name] = {f.name: _plain(getattr(section, f.name)) for f in fields(section)}
    return data


def _plain(value: Any) -> Any:
    return [_plain(item) for item in value] if isinstance(value, tuple) else value


def config_from_dict(data: Mapping[str, Any], *, origin: str = "config dict", validate: bool = True) -> TrainConfig:
    """A config from `config_to_dict` output or a parsed TOML file: `data["recipe"]` (default: the demo) with the
    fields given. Unknown sections and keys are errors, not ignored. `validate=False` leaves the cross-field checks to
    the caller (the CLI applies its overrides first)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: expected a table of sections, got {type(data).__name__}")
    recipe = data.get("recipe", DEFAULT_RECIPE)
    if not isinstance(recipe, str):
        raise ConfigError(f"{origin}: recipe must be a string naming a recipe, got {recipe!r}")
    cfg, args = build_recipe(recipe), []
    for section, values in data.items():
        if section == "recipe":
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{section}] must be a table of key = value, got {values!r}")
        for key, value in values.items():
            # A flag's text is always a string; a file's value is typed, and a number is no name or path.
            if isinstance(getattr(getattr(cfg, section, None), key, None), str) and not isinstance(value, str):
                raise ConfigError(f"{origin}: {section}.{key} must be a string, got {value!r}")
            args.append(f"--{section}.{key}={_text(value)}")
    cfg = apply_overrides(cfg, args, where=f"{origin}: ")
    return cfg.validate() if validate else cfg


def _text(value: Any) -> str:
    """A TOML/JSON value as the command line writes it."""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(item) for item in value)
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def toml_literal(value: Any) -> str:
    """`value` as a TOML value that `tomllib` reads back to the same Python value (floats via repr, exactly)."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def config_to_toml(cfg: TrainConfig, *, comments: bool = True) -> str:
    """The config as a TOML document that `load_toml` / `--config FILE` reads back to an equal config.

    With `comments`, each key is preceded by its help text, so the dump doubles as annotated documentation.
    """
    lines = [f"recipe = {toml_literal(cfg.recipe)}"]
    for name in SECTIONS:
        section = getattr(cfg, name)
        lines += ["", f"[{name}]"]
        for f in fields(section):
            if comments:
                lines += textwrap.wrap(f.metadata["help"], width=118, initial_indent="# ", subsequent_indent="# ")
            lines.append(f"{f.name} = {toml_literal(getattr(section, f.name))}")
    return "\n".join(lines) + "\n"


def load_toml(path: str | Path, *, validate: bool = True) -> TrainConfig:
    """A config from a TOML file (see `config_from_dict` for what the file may contain and for `validate`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:  # a folder, no permission, an I/O error
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = raw.rfind(b"\n", 0, error.start) + 1
        line, column = raw.count(b"\n", 0, error.start) + 1, error.start - line_start + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (TOML files must be UTF-8): byte 0x{raw[error.start]:02x} "
                          f"at line {line}, column {column} (byte offset {error.start}): {error.reason}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        where = re.search(r"\(at line (\d+), column \d+\)", str(error))  # Python 3.11's tomllib has no lineno yet
        prefix = f"{path}:{where.group(1)}" if where else str(path)
        raise ConfigError(f"{prefix}: not valid TOML: {error}") from None
    return config_from_dict(data, origin=str(path), validate=validate)
