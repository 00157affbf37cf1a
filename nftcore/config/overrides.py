"""`--section.key=value` overrides applied to a TrainConfig, parsed by tyro.

tyro builds the parser from the dataclasses (types, defaults, `option` help texts). The rules below only teach it the
value forms this project has always taken, each as one token so that `--key=value` and `--key value` both work:
bools `true/false/1/0/yes/no/on/off`, tuples comma-separated (`0.9,0.999`, brackets optional), `none` (or `null`) to
unset an optional field, and finite floats only (no option means "no limit" by inf; 0 does where there is one).
Every parse failure becomes a ConfigError that names the key, the value and the expected type.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any, Union, get_args

import tyro
from tyro import _errors as tyro_errors  # the documented (if underscored) hook for parse failures; tyro is pinned
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, PrimitiveTypeInfo

from nftcore.config.errors import ConfigError, did_you_mean, listing
from nftcore.config.sections import TrainConfig, field_types, section_types

PROG = "python -m nftcore.train"
_TRUE, _FALSE, _NONE = ("true", "1", "yes", "on"), ("false", "0", "no", "off"), ("none", "null")
_REGISTRY = ConstructorRegistry()


def _spec(metavar: str, parse, is_instance, show) -> PrimitiveConstructorSpec:
    return PrimitiveConstructorSpec(nargs=1, metavar=metavar, instance_from_str=lambda args: parse(args[0]),
                                    is_instance=is_instance, str_from_instance=lambda value: [show(value)])


def _bool(text: str) -> bool:
    if text.strip().lower() not in _TRUE + _FALSE:
        raise ValueError(f"{text!r} is not a bool (true/false/1/0)")
    return text.strip().lower() in _TRUE


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite float (no float option takes inf or nan)")
    return value


def _items(text: str) -> list[str]:
    text = text.strip()
    if text[:1] in "([" and text[-1:] in ")]":
        text = text[1:-1]
    return [item.strip() for item in text.split(",")]


@_REGISTRY.primitive_rule
def _value_forms(info: PrimitiveTypeInfo) -> PrimitiveConstructorSpec | None:
    """bool, float, `X | None` and fixed tuples in the forms above; int, str and Literal are tyro's own."""
    args = get_args(info.type)

    def inner() -> list[PrimitiveConstructorSpec]:
        return [ConstructorRegistry.get_primitive_spec(PrimitiveTypeInfo.make(arg, info.markers))
                for arg in args if arg is not type(None)]

    if info.type is bool:
        return _spec("{true,false}", _bool, lambda x: isinstance(x, bool), lambda x: str(x).lower())
    if info.type is float:
        return _spec("FLOAT", _float, lambda x: isinstance(x, (int, float)) and not isinstance(x, bool), repr)
    if info.type_origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        (some,) = inner()
        return _spec(f"{some.metavar}|none",
                     lambda text: None if text.strip().lower() in _NONE else some.instance_from_str([text]),
                     lambda x: x is None or some.is_instance(x),
                     lambda x: "none" if x is None else some.str_from_instance(x)[0])
    if info.type_origin is tuple and Ellipsis not in args:
        specs = inner()

        def parse(text: str) -> tuple:
            items = _items(text)
            if len(items) != len(args):
                raise ValueError(f"{text!r} is not {len(args)} comma-separated values")
            return tuple(spec.instance_from_str([item]) for spec, item in zip(specs, items))

        return _spec(",".join(spec.metavar for spec in specs), parse, lambda x: isinstance(x, tuple),
                     lambda x: ",".join(spec.str_from_instance(item)[0] for spec, item in zip(specs, x)))
    return None


def tyro_cli(default: TrainConfig, args: Sequence[str], **kwargs: Any) -> TrainConfig:
    """tyro on TrainConfig, starting from `default`, with this module's value forms and errors."""
    with tyro_errors.on_parse_error(_raise_config_error):
        return tyro.cli(TrainConfig, args=list(args), default=default, prog=PROG, use_underscores=True,
                        registry=_REGISTRY, config=(tyro.conf.FlagConversionOff,), **kwargs)


def apply_overrides(cfg: TrainConfig, args: Sequence[str], where: str = "") -> TrainConfig:
    """A new config: `cfg` with the `--section.key=value` arguments applied, later ones winning; not validated.
    ConfigError (its message prefixed with `where`) for an unknown key or a bad value."""
    if not args:
        return cfg
    try:
        return tyro_cli(cfg, args)
    except ConfigError as error:
        raise ConfigError(f"{where}{error}") from None


def _raise_config_error(event: tyro_errors.ParseErrorEvent) -> None:
    """tyro's parse-error hook: raise a ConfigError instead of printing tyro's error box and exiting."""
    if isinstance(event, tyro_errors.UnrecognizedArgs):
        raise unknown_option(event.tokens[0])
    argument = getattr(event, "argument", None)
    if argument is None:
        raise ConfigError(f"cannot parse the overrides ({type(event).__name__})")
    name, expected = argument.lowered.name_or_flags[0].lstrip("-"), argument.lowered.metavar
    if isinstance(event, tyro_errors.InvalidChoice):
        raise ConfigError(f"bad value for {name}: {event.value!r} is not one of {listing(event.choices)}"
                          f"{did_you_mean(event.value, event.choices)}")
    if isinstance(event, tyro_errors.BadValue):
        raise ConfigError(f"{name} needs a value ({expected})")
    message = getattr(event, "message", type(event).__name__)
    raise ConfigError(f"bad value for {name} ({expected}): {message}")


def unknown_option(token: str) -> ConfigError:
    """The error for an argument no field takes, with the closest section, key or flag."""
    if not token.startswith("-"):
        return ConfigError(f"unexpected argument {token!r}: options look like --section.key=value (see --help)")
    name = token.lstrip("-").partition("=")[0].replace("-", "_")
    section, dot, key = name.partition(".")
    sections = section_types()
    if not dot:  # `--seed`: a key without its section, or a misspelt --config / --resume
        owners = [f"--{s}.{name}" for s, cls in sections.items() if name in field_types(cls)]
        hint = f" (did you mean {owners[0]!r}?)" if owners else did_you_mean(name, ["config", "resume"])
        return ConfigError(f"unknown option {token!r}{hint}; options are --config, --resume, --print-config, -h and "
                           f"--SECTION.KEY=VALUE (sections: {listing(sections)}; see --help)")
    if section not in sections:
        return ConfigError(f"unknown config section {section!r} ({token}){did_you_mean(section, sections)}; "
                           f"sections: {listing(sections)}")
    keys = field_types(sections[section])
    return ConfigError(f"unknown key {key!r} in section [{section}] ({token}){did_you_mean(key, keys)}; "
                       f"keys of [{section}]: {listing(keys)}")
