"""The command line: `--config <recipe|file.toml>`, then `--section.key=value` overrides, then validation.

    python -m nftcore.train --config qwen_image_edit_r1 --run.out runs/q1 --filter.rule=code --optim.betas=0.9,0.99
    python -m nftcore.train --config my_run.toml --resume latest

Order of precedence, lowest first: the recipe (or the recipe a TOML file names, default `demo`), the TOML file's
sections, the command-line overrides in the order given. Validation runs once at the end, so an override may pass
through a state that is invalid on its own. tyro parses the overrides (`overrides`); this module only takes out what
is not a config field and spells one form tyro lacks:

- `--config RECIPE|FILE.toml` picks the base config, `--resume latest|PATH` is `--checkpoint.resume`,
  `--print-config` prints the effective config as TOML, `-h/--help` every option with the base config's value;
- a bare bool flag (`--metrics.wandb`, followed by another option or nothing) means `--metrics.wandb=true`.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from nftcore.config.errors import ConfigError, did_you_mean
from nftcore.config.overrides import apply_overrides, tyro_cli
from nftcore.config.recipes import DEFAULT_RECIPE, RECIPES, build_recipe
from nftcore.config.sections import TrainConfig, field_types, section_types
from nftcore.config.serialize import config_to_toml, load_toml

DESCRIPTION = f"""\
Start from a recipe or a TOML file and override any option below (defaults shown: that base config's values).
  --config RECIPE|FILE.toml  a recipe: {', '.join(RECIPES)} (default {DEFAULT_RECIPE}),
                             or a TOML file, such as a run's config.toml
  --resume latest|PATH       the same as --checkpoint.resume
  --print-config             print the effective config as TOML and exit
  Values: bools true/false (a bare flag is true), tuples comma-separated (0.9,0.999), none unsets an optional one."""


_VALUES = {"--config": "RECIPE|FILE.toml", "--resume": "latest|PATH"}


@dataclass
class CommandLine:
    """argv, split into its parts; the overrides are still text, for tyro."""

    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    help: bool = False
    print_config: bool = False


@cache
def _bool_flags() -> frozenset[str]:
    return frozenset(f"--{section}.{key}" for section, cls in section_types().items()
                     for key, tp in field_types(cls).items() if tp is bool)


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Split argv into the config source, the overrides and the flags (the overrides are checked when applied)."""
    line, args, i = CommandLine(), list(argv), 0
    while i < len(args):
        token = args[i]
        i += 1
        name, has_value, value = token.partition("=")
        ends_here = i == len(args) or args[i].startswith("--")  # no value follows
        if token in ("-h", "--help"):
            line.help = True
        elif token == "--print-config":
            line.print_config = True
        elif name in ("--config", "--resume"):
            if not has_value:
                if ends_here:
                    raise ConfigError(f"{name} needs a value ({_VALUES[name]})")
                value, i = args[i], i + 1
            if name == "--resume":
                line.overrides.append(f"--checkpoint.resume={value}")
            elif line.config is not None:
                raise ConfigError(f"--config given twice ({line.config!r} and {value!r}); give one recipe or file")
            else:
                line.config = value
        elif not has_value and ends_here and "--" + name[2:].replace("-", "_") in _bool_flags():
            line.overrides.append(f"{token}=true")
        else:
            line.overrides.append(token)
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


def format_help(cfg: TrainConfig) -> str:
    """tyro's help: the usage, then every option by section with its type, its value in `cfg` and its help text."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        tyro_cli(cfg, ["--help"], description=DESCRIPTION)
    return "".join(line.rstrip() + "\n" for line in out.getvalue().splitlines())  # tyro pads lines to its width


def load_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """The validated `TrainConfig` for `argv` (default `sys.argv[1:]`); ConfigError on any mistake.

    Like argparse, `-h/--help` and `--print-config` print to stdout and raise SystemExit(0).
    """
    line = parse_command_line(sys.argv[1:] if argv is None else argv)
    cfg = base_config(line.config)
    if line.help:
        sys.stdout.write(format_help(cfg))
        raise SystemExit(0)
    cfg = apply_overrides(cfg, line.overrides).validate()
    if line.print_config:
        sys.stdout.write(config_to_toml(cfg))
        raise SystemExit(0)
    return cfg
