"""The config as a JSON-ready dict (trackers, the resume check) and as TOML (`--print-config`, a checkpoint's
config.toml), and back. Loading builds the named recipe and replaces the fields given, so a file may hold only
`recipe = "..."` and what it changes. TOML has no null: "none" unsets an optional field."""

import json
import re
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, get_args

import tomli_w

from nftcore.config.errors import ConfigError
from nftcore.config.recipes import DEFAULT_RECIPE, build_recipe
from nftcore.config.sections import SECTIONS, TrainConfig, check_name


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """`{"recipe": ..., "run": {...}, ...}` with plain JSON types (tuples become lists, unset optionals None)."""
    return json.loads(json.dumps(asdict(cfg)))


def config_from_dict(data: Mapping[str, Any], *, origin: str = "config dict", validate: bool = True) -> TrainConfig:
    """A config from `config_to_dict` output or a parsed TOML file; unknown sections and keys are errors.
    `validate=False` checks only the types (the CLI validates once its overrides are applied)."""
    try:
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a table of sections, got {type(data).__name__}")
        data = dict(data)
        cfg = build_recipe(data.pop("recipe", DEFAULT_RECIPE))
        for name, values in data.items():
            check_name(name)
            if not isinstance(values, Mapping):
                raise ConfigError(f"[{name}] must be a table of key = value, got {values!r}")
            types = {f.name: f.type for f in fields(SECTIONS[name])}
            for key in values:
                check_name(name, key)
            setattr(cfg, name, replace(getattr(cfg, name), **{k: _from_toml(v, types[k]) for k, v in values.items()}))
        if problems := cfg.type_problems():
            raise ConfigError("; ".join(problems))
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None
    return cfg.validate() if validate else cfg


def _from_toml(value: Any, tp: Any) -> Any:
    """A TOML/JSON value as the field `tp` holds it: arrays as tuples, ints widened to floats (anything else is left
    for the type check to name)."""
    args = get_args(tp)
    if isinstance(value, list):
        return tuple(float(item) if type(item) is int and float in args else item for item in value)
    if value == "none" and type(None) in args:
        return None
    return float(value) if type(value) is int and float in (tp, *args) else value


def toml_literal(value: Any) -> str:
    """One value as TOML (tomli_w escapes strings), None as "none", and arrays on one line (tomli_w would break
    them over lines; the resume check quotes values in a one-line message)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(toml_literal, value)) + "]"
    return tomli_w.dumps({"v": "none" if value is None else value})[len("v = "):-1]


def config_to_toml(cfg: TrainConfig, *, comments: bool = True) -> str:
    """The config as TOML that `load_toml` reads back to an equal config; `comments` puts each key's help above it."""
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
    """A config from a TOML file (see `config_from_dict`); ConfigError naming the file, and the line where it can."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:  # a folder, no permission, an I/O error
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        line, column = raw.count(b"\n", 0, error.start) + 1, error.start - raw.rfind(b"\n", 0, error.start)
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (TOML files must be UTF-8): byte 0x{raw[error.start]:02x} "
                          f"at line {line}, column {column} (byte offset {error.start}): {error.reason}") from None
    except tomllib.TOMLDecodeError as error:
        where = re.search(r"\(at line (\d+), column \d+\)", str(error))  # Python 3.11's tomllib has no lineno yet
        raise ConfigError(f"{path}{':' + where.group(1) if where else ''}: not valid TOML: {error}") from None
    return config_from_dict(data, origin=str(path), validate=validate)
