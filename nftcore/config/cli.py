"""The command line: a base config (`--config RECIPE|FILE.toml`), then `--section.key=value` overrides parsed by tyro
(later ones win), then `validate` once, so an override may pass through a state that is invalid on its own.

    python -m nftcore.train --config qwen_image_edit_r1 --run.out runs/q1 --optim.betas=0.9,0.99 --resume latest
"""

import contextlib
import io
import math
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

import tyro
from tyro import _errors as tyro_errors  # the documented (if underscored) hook for parse failures; tyro is pinned
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from nftcore.config.errors import ConfigError, did_you_mean
from nftcore.config.recipes import DEFAULT_RECIPE, RECIPES, build_recipe
from nftcore.config.sections import SECTIONS, TrainConfig, check_name, type_problem
from nftcore.config.serialize import config_to_toml, load_toml

PROG = "python -m nftcore.train"
DESCRIPTION = f"""\
Start from a recipe or a TOML file and override any option below (defaults shown: that base config's values).
  --config RECIPE|FILE.toml  a recipe: {', '.join(RECIPES)} (default {DEFAULT_RECIPE}),
                             or a TOML file, such as a run's config.toml
  --resume latest|PATH       the same as --checkpoint.resume
  --print-config             print the effective config as TOML and exit
  Values: bools true/false (a bare flag is true), tuples comma-separated (0.9,0.999), none unsets an optional one."""
_VALUES = {"--config": "RECIPE|FILE.toml", "--resume": "latest|PATH"}
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_REGISTRY = ConstructorRegistry()


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The validated `TrainConfig` for `argv` (default `sys.argv[1:]`); ConfigError on any mistake. Like argparse,
    `-h/--help` and `--print-config` print to stdout and raise SystemExit(0)."""
    source, overrides, flags = _split(sys.argv[1:] if argv is None else argv)
    cfg = _base(source)
    if flags & {"-h", "--help"}:  # the base config's values; the overrides are not parsed
        sys.stdout.write(format_help(cfg))
        raise SystemExit(0)
    cfg = (_tyro(cfg, overrides) if overrides else cfg).validate()
    if "--print-config" in flags:
        sys.stdout.write(config_to_toml(cfg))
        raise SystemExit(0)
    return cfg


def format_help(cfg: TrainConfig) -> str:
    """tyro's help: the usage, then every option by section with its type, its value in `cfg` and its help text."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        _tyro(cfg, ["--help"], description=DESCRIPTION)
    return "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())  # tyro pads lines to its width


def _split(argv: Sequence[str]) -> tuple[str | None, list[str], set[str]]:
    """argv as (the --config value, the overrides for tyro, the flags -h/--help and --print-config)."""
    source, overrides, flags, args = None, [], set(), iter(argv)
    for token in args:
        name, has_value, value = token.partition("=")
        if token in ("-h", "--help", "--print-config"):
            flags.add(token)
        elif name not in _VALUES:
            overrides.append(token)
        elif (value := value if has_value else next(args, "--")).startswith("--"):
            raise ConfigError(f"{name} needs a value ({_VALUES[name]})")
        elif name == "--resume":
            overrides.append(f"--checkpoint.resume={value}")
        elif source is not None:
            raise ConfigError(f"--config given twice ({source!r} and {value!r}); give one recipe or file")
        else:
            source = value
    return source, overrides, flags


def _base(source: str | None) -> TrainConfig:
    """The config before the overrides: a recipe by name, or a TOML file (types checked, not yet validated)."""
    source = DEFAULT_RECIPE if source is None else source
    if source in RECIPES:
        return build_recipe(source)
    if source.endswith(".toml") or Path(source).is_file():
        return load_toml(source, validate=False)
    raise ConfigError(f"--config {source!r} is neither a recipe nor a file{did_you_mean(source, RECIPES)}; "
                      f"recipes: {', '.join(RECIPES)}; or pass a .toml file")


def _tyro(default: TrainConfig, args: Sequence[str], **kwargs: Any) -> TrainConfig:
    """tyro on TrainConfig, starting from `default`, with this module's value forms and errors."""
    with tyro_errors.on_parse_error(_raise_config_error):
        return tyro.cli(TrainConfig, args=list(args), default=default, prog=PROG, use_underscores=True,
                        registry=_REGISTRY, config=(tyro.conf.FlagConversionOff,), **kwargs)


@_REGISTRY.primitive_rule
def _value_forms(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """bool (true/false/1/0/yes/no/on/off; a bare flag is true), finite floats, `X | None` (`none` unsets it) and
    fixed tuples (comma-separated, brackets optional), each one token; int, str and Literal are tyro's own."""
    tp = info.type
    if tp not in (bool, float) and info.type_origin is not tuple and type(None) not in get_args(tp):
        return None
    return PrimitiveConstructorSpec(
        nargs=(0, 1) if tp is bool else 1, metavar=_metavar(tp), instance_from_str=lambda args: _parse(tp, *args),
        is_instance=lambda value: type_problem(value, tp) is None, str_from_instance=lambda value: [_text(value)])


def _parse(tp: Any, text: str = "true") -> Any:  # no text: a bare bool flag
    args, word = [arg for arg in get_args(tp) if arg is not type(None)], text.strip().lower()
    if len(args) < len(get_args(tp)):  # X | None
        return None if word in ("none", "null") else _parse(args[0], text)
    if args:  # a fixed tuple
        items = text.strip().strip("()[]").split(",")
        if len(items) != len(args):
            raise ValueError(f"{text!r} is not {len(args)} comma-separated values")
        return tuple(map(_parse, args, items))
    if tp is bool and word not in _BOOLS:
        raise ValueError(f"{text!r} is not a bool (true/false/1/0)")
    try:
        value = _BOOLS[word] if tp is bool else tp(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a {tp.__name__}") from None
    if isinstance(value, float) and not math.isfinite(value):  # as `validate`: no option means "no limit" by inf
        raise ValueError(f"{text!r} is not a finite float (no float option takes inf or nan)")
    return value


def _metavar(tp: Any) -> str:
    args = [arg for arg in get_args(tp) if arg is not type(None)]
    if len(args) < len(get_args(tp)):
        return _metavar(args[0]) + "|none"
    return ",".join(map(_metavar, args)) if args else "{true,false}" if tp is bool else tp.__name__.upper()


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(_text, value))
    return str(value).lower() if value is None or isinstance(value, bool) else str(value)


def _raise_config_error(event: tyro_errors.ParseErrorEvent) -> None:
    """tyro's parse-error hook: raise a ConfigError instead of printing tyro's error box and exiting."""
    if isinstance(event, tyro_errors.UnrecognizedArgs):
        _raise_unknown_option(event.tokens[0])
    argument = getattr(event, "argument", None)
    if argument is None:
        raise ConfigError(f"cannot parse the overrides ({type(event).__name__})")
    name, expected = argument.lowered.name_or_flags[0].lstrip("-"), argument.lowered.metavar
    if isinstance(event, tyro_errors.InvalidChoice):
        raise ConfigError(f"bad value for {name}: {event.value!r} is not one of {', '.join(event.choices)}"
                          f"{did_you_mean(event.value, event.choices)}")
    if isinstance(event, tyro_errors.BadValue):
        raise ConfigError(f"{name} needs a value ({expected})")
    raise ConfigError(f"bad value for {name} ({expected}): {getattr(event, 'message', type(event).__name__)}")


def _raise_unknown_option(token: str) -> None:
    """A ConfigError for an argument no field takes, with the closest section, key or flag."""
    if not token.startswith("-"):
        raise ConfigError(f"unexpected argument {token!r}: options look like --section.key=value (see --help)")
    section, dot, key = token.lstrip("-").partition("=")[0].replace("-", "_").partition(".")
    if dot:
        check_name(section, key, where=token)
    # `--seed`: a key without its section, or a misspelt --config / --resume
    owners = [f"--{name}.{section}" for name, cls in SECTIONS.items() if section in {f.name for f in fields(cls)}]
    hint = f" (did you mean {owners[0]!r}?)" if owners else did_you_mean(section, ["config", "resume"])
    raise ConfigError(f"unknown option {token!r}{hint}; options are --config, --resume, --print-config, -h and "
                      f"--SECTION.KEY=VALUE (sections: {', '.join(SECTIONS)}; see --help)")
