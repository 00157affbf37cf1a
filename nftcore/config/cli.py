"""The command line: `--config <recipe|file.toml>`, then `--section.key=value` overrides, then validation.

    python -m nftcore.train --config qwen_image_edit_r1 --run.out runs/q1 --filter.rule=code --optim.betas=0.9,0.99
    python -m nftcore.train --config my_run.toml --resume latest

Order of precedence, lowest first: the recipe (or the recipe a TOML file names, default `demo`), the TOML file's
sections, the command-line overrides in the order given. Validation runs once at the end, so an override may pass
through a state that is invalid on its own. `--section.key value` works like `--section.key=value`; a bool given as a
bare `--section.key` means true. Dashes in names are read as underscores (`--checkpoint.keep-latest`).
`--resume latest|PATH` is `--checkpoint.resume`. `-h/--help` prints every option with its type, the chosen config's
value and its help; `--print-config` prints the effective config as TOML; both then exit.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nftcore.config.errors import ConfigError, did_you_mean
from nftcore.config.recipes import DEFAULT_RECIPE, RECIPES, build_recipe
from nftcore.config.sections import SECTIONS, TrainConfig, field_help, field_types, section_types
from nftcore.config.serialize import config_to_toml, load_toml, resolve_field, set_option
from nftcore.config.values import describe_type, toml_literal

PROG = "python -m nftcore.train"
USAGE = (f"usage: {PROG} [--config RECIPE|FILE.toml] [--resume latest|PATH] [--SECTION.KEY=VALUE ...] "
         "[--print-config] [-h]")
_TOP_LEVEL = ("config", "resume", "help", "print-config")


@dataclass
class CommandLine:
    """argv, split into its parts; values are still text."""

    config: str | None = None
    overrides: list[tuple[str, str, str, str]] = field(default_factory=list)  # (section, key, text, flag as written)
    help: bool = False
    print_config: bool = False


def _unknown_option(token: str) -> ConfigError:
    name = token.lstrip("-").partition("=")[0].replace("_", "-")
    dotted = [f"{section}.{key}" for section, cls in section_types().items() for key in field_types(cls)]
    same_key = [flag for flag in dotted if flag.split(".")[1].replace("_", "-") == name]
    hint = f" (did you mean '--{same_key[0]}'?)" if same_key else did_you_mean(name, [*_TOP_LEVEL, *dotted])
    return ConfigError(f"unknown option {token!r}{hint}; options are --config, --resume, --print-config, -h and "
                       f"--SECTION.KEY=VALUE (sections: {', '.join(SECTIONS)}; see --help)")


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Split argv into the config source, the overrides and the flags; ConfigError for anything unknown."""
    line, args, i = CommandLine(), list(argv), 0
    while i < len(args):
        token = args[i]
        i += 1
        if token in ("-h", "--help"):
            line.help = True
            continue
        if token == "--print-config":
            line.print_config = True
            continue
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: options look like --section.key=value (see --help)")
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name in ("config", "resume"):
            if not has_value:
                if i == len(args) or args[i].startswith("--"):
                    expected = "RECIPE|FILE.toml" if name == "config" else "latest|PATH"
                    raise ConfigError(f"--{name} needs a value ({expected})")
                value, i = args[i], i + 1
            if name == "resume":
                line.overrides.append(("checkpoint", "resume", value, token if has_value else f"--resume {value}"))
            elif line.config is not None:
                raise ConfigError(f"--config given twice ({line.config!r} and {value!r}); give one recipe or file")
            else:
                line.config = value
            continue
        section, dot, key = name.partition(".")
        if not dot:
            raise _unknown_option(token)
        tp = resolve_field(section, key, token)
        origin = token
        if not has_value:
            if i == len(args) or args[i].startswith("--"):
                if tp is not bool:
                    raise ConfigError(f"{token} needs a value ({describe_type(tp)})")
                value = "true"  # a bare bool flag switches it on
            else:
                value, i = args[i], i + 1
                origin = f"{token} {value}"
        line.overrides.append((section, key, value, origin))
    return line


def base_config(source: str | None) -> TrainConfig:
    """The config before command-line overrides: a recipe by name, or a TOML file (not yet validated)."""
    source = DEFAULT_RECIPE if source is None else source
    if source in RECIPES:
        return build_recipe(source)
    if source.endswith(".toml") or Path(source).is_file():
        return load_toml(source, validate=False)
    raise ConfigError(f"--config {source!r} is neither a recipe nor a file{did_you_mean(source, RECIPES)}; "
                      f"recipes: {', '.join(RECIPES)}; or pass a .toml file")


def config_from_command_line(line: CommandLine) -> TrainConfig:
    """Apply a parsed command line: base config, overrides in order, then one validation."""
    cfg = base_config(line.config)
    for section, key, text, origin in line.overrides:
        set_option(cfg, section, key, text, origin)
    return cfg.validate()


def format_help(cfg: TrainConfig) -> str:
    """Usage, the recipes, and every option with its type, its value in `cfg` and its help text."""
    lines = [
        USAGE,
        "",
        f"Recipes: {', '.join(RECIPES)} (default {DEFAULT_RECIPE}). Values below are those of {cfg.recipe!r} "
        "with any --config file applied.",
        "Value syntax: bool true/false/1/0, tuples comma-separated (0.9,0.999), 'none' unsets an optional value.",
        "--resume latest|PATH is --checkpoint.resume. --print-config prints the effective config as TOML and exits.",
    ]
    for section in SECTIONS:
        values = getattr(cfg, section)
        cls = type(values)
        lines += ["", f"[{section}] {(cls.__doc__ or '').strip().splitlines()[0]}"]
        for key, tp in field_types(cls).items():
            lines.append(f"  --{section}.{key} {describe_type(tp)} = {toml_literal(getattr(values, key))}")
            lines += textwrap.wrap(field_help(cls, key), width=116, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The validated `TrainConfig` for `argv` (default `sys.argv[1:]`); ConfigError on any mistake.

    Like argparse, `-h/--help` and `--print-config` print to stdout and raise SystemExit(0).
    """
    line = parse_command_line(sys.argv[1:] if argv is None else argv)
    if line.help:
        sys.stdout.write(format_help(base_config(line.config)))
        raise SystemExit(0)
    cfg = config_from_command_line(line)
    if line.print_config:
        sys.stdout.write(config_to_toml(cfg))
        raise SystemExit(0)
    return cfg
