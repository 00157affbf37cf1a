"""The config as data: a JSON-ready dict (saved with every checkpoint), a readable TOML dump, and the way back.

Both forms are complete — every field of every section is written — and carry the recipe the config started from.
Loading starts from that recipe and overrides each written field, so `load(dump(cfg)) == cfg` exactly (floats are
written with `repr`, which round-trips). A hand-written TOML file may instead say only `recipe = "..."` plus the
few fields it changes.
"""

from __future__ import annotations

import re
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from nftcore.config.errors import ConfigError, did_you_mean, listing
from nftcore.config.recipes import DEFAULT_RECIPE, build_recipe
from nftcore.config.sections import SECTIONS, TrainConfig, field_help, field_types, section_types
from nftcore.config.values import convert, toml_literal


def resolve_field(section: str, key: str, origin: str) -> Any:
    """The type of `section.key`; ConfigError naming `origin` (where it was written) and the valid names if unknown."""
    types_ = section_types()
    if section not in types_:
        raise ConfigError(f"unknown config section {section!r} in {origin}{did_you_mean(section, types_)}; "
                          f"sections: {listing(types_)}")
    keys = field_types(types_[section])
    if key not in keys:
        raise ConfigError(f"unknown key {key!r} in section [{section}] ({origin}){did_you_mean(key, keys)}; "
                          f"keys of [{section}]: {listing(keys)}")
    return keys[key]


def set_option(cfg: TrainConfig, section: str, key: str, value: Any, origin: str) -> None:
    """`cfg.section.key = value`, converted to the field's type (text is parsed); ConfigError if unknown or bad."""
    tp = resolve_field(section, key, origin)
    try:
        converted = convert(value, tp, f"{section}.{key}")
    except ConfigError as error:
        raise ConfigError(f"{error} (in {origin})") from None
    setattr(getattr(cfg, section), key, converted)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """`{"recipe": ..., "run": {...}, ...}` with plain JSON types (tuples become lists, unset optionals None)."""
    def plain(value: Any) -> Any:
        return [plain(item) for item in value] if isinstance(value, tuple) else value

    data: dict[str, Any] = {"recipe": cfg.recipe}
    for name in SECTIONS:
        section = getattr(cfg, name)
        data[name] = {f.name: plain(getattr(section, f.name)) for f in fields(section)}
    return data


def config_from_dict(data: Mapping[str, Any], *, origin: str = "config dict", validate: bool = True) -> TrainConfig:
    """A config from `config_to_dict` output or a parsed TOML file: start from `data["recipe"]` (default: the demo),
    then override the fields given. Unknown sections and keys are errors, not ignored. `validate=False` leaves the
    cross-field checks to the caller (the CLI applies its overrides first)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: expected a table of sections, got {type(data).__name__}")
    recipe = data.get("recipe", DEFAULT_RECIPE)
    if not isinstance(recipe, str):
        raise ConfigError(f"{origin}: recipe must be a string naming a recipe, got {recipe!r}")
    cfg = build_recipe(recipe)
    for section, values in data.items():
        if section == "recipe":
            continue
        if section not in section_types():
            allowed = ["recipe", *section_types()]
            raise ConfigError(f"unknown config section {section!r} in {origin}{did_you_mean(section, allowed)}; "
                              f"top-level keys: {listing(allowed)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{origin}: [{section}] must be a table of key = value, got {values!r}")
        for key, value in values.items():
            set_option(cfg, section, key, value, origin)
    return cfg.validate() if validate else cfg


def config_to_toml(cfg: TrainConfig, *, comments: bool = True) -> str:
    """The config as a TOML document that `load_toml` / `--config FILE` reads back to an equal config.

    With `comments`, each key is preceded by its help text, so the dump doubles as annotated documentation.
    """
    lines = [f"recipe = {toml_literal(cfg.recipe)}"]
    for name in SECTIONS:
        section = getattr(cfg, name)
        lines += ["", f"[{name}]"]
        for key in field_types(type(section)):
            if comments:
                lines += textwrap.wrap(field_help(type(section), key), width=118, initial_indent="# ",
                                       subsequent_indent="# ")
            lines.append(f"{key} = {toml_literal(getattr(section, key))}")
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
        line, column = _line_column(raw, error.start)
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (TOML files must be UTF-8): byte 0x{raw[error.start]:02x} "
                          f"at line {line}, column {column} (byte offset {error.start}): {error.reason}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        where = _TOML_POSITION.search(str(error))
        prefix = f"{path}:{where.group(1)}" if where else str(path)
        raise ConfigError(f"{prefix}: not valid TOML: {error}") from None
    return config_from_dict(data, origin=str(path), validate=validate)


_TOML_POSITION = re.compile(r"\(at line (\d+), column \d+\)")
"""Where tomllib's messages say the error is ("... (at line 4, column 7)"); 3.11 has no lineno attribute yet."""


def _line_column(raw: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in bytes) of byte `offset` of `raw`."""
    line_start = raw.rfind(b"\n", 0, offset) + 1
    return raw.count(b"\n", 0, offset) + 1, offset - line_start + 1
