"""Field types of the config: how a value is described, parsed from text, checked, and written as TOML.

The config uses a small closed set of field types — `int`, `float`, `bool`, `str`, `Literal[...]`, fixed or
variadic `tuple[...]`, and `X | None` — so one converter serves the command line (text), TOML files and JSON
checkpoints (already typed values) alike, and every mistake becomes a `ConfigError` that says what was expected.

Floats must be finite: inf and nan are refused for every float field, whatever its source (text, TOML's own
`inf`/`nan`, Python), because no option means "no limit" by inf — where an option has such a setting it is 0
(`optim.max_grad_norm = 0` turns clipping off) — and an inf or nan that got through would only surface hours later
as a NaN loss or a request that never times out.

Text forms: bool is true/false/1/0 (also yes/no/on/off); a tuple is comma-separated (`0.9,0.999`, brackets
optional); `none` (or `null`) unsets an optional field. TOML has no null, so the dump writes `"none"` for it.
"""

from __future__ import annotations

import json
import math
import types
from typing import Any, Literal, Union, get_args, get_origin

from nftcore.config.errors import ConfigError, did_you_mean, listing

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")
_SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}


def _optional_inner(tp: Any) -> Any | None:
    """X for `X | None` / `Optional[X]`, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [arg for arg in get_args(tp) if arg is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
    return None


def describe_type(tp: Any) -> str:
    """Short human form of a field type, as `--help` prints it: `int`, `{paper,code,none}`, `float,float`."""
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{describe_type(inner)}|none"
    if get_origin(tp) is Literal:
        return "{" + ",".join(str(choice) for choice in get_args(tp)) + "}"
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{describe_type(args[0])},..."
        return ",".join(describe_type(arg) for arg in args)
    if tp in _SCALARS:
        return _SCALARS[tp]
    raise TypeError(f"unsupported config field type {tp!r}")


def _bad(where: str, value: Any, expected: str, extra: str = "") -> ConfigError:
    return ConfigError(f"bad value for {where}: {value!r} is not {expected}{extra}")


def convert(value: Any, tp: Any, where: str) -> Any:
    """`value` (text from the command line, or a TOML/JSON value) as type `tp`; ConfigError naming `where` if not.

    Strings are parsed for every type, so `lr = "3e-4"` in TOML works like `--optim.lr=3e-4`. Ints are accepted
    for floats; nothing else is widened (a float for an int field is an error rather than a silent truncation).
    """
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return convert(value, inner, where)
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        for choice in choices:
            if (isinstance(value, str) and value.strip() == str(choice)) or (
                type(value) is type(choice) and value == choice
            ):
                return choice
        hint = did_you_mean(str(value), [str(choice) for choice in choices])
        raise _bad(where, value, f"one of {listing(choices)}", hint)
    if get_origin(tp) is tuple:
        return _convert_tuple(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _bad(where, value, "a bool (true/false/1/0)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _bad(where, value, "an int")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise _bad(where, value, "a float")
        try:
            number = float(number)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if not math.isfinite(number):
            raise _bad(where, value, "a finite float", "; no float option takes inf or nan")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(where, value, "a string")
    raise TypeError(f"unsupported config field type {tp!r} for {where}")


def _convert_tuple(value: Any, tp: Any, where: str) -> tuple:
    args = get_args(tp)
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[(" and text[-1:] in "])":
            text = text[1:-1]
        items = [item.strip() for item in text.split(",")] if text.strip() else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _bad(where, value, f"a comma-separated {describe_type(tp)}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(item, args[0], f"{where}[{index}]") for index, item in enumerate(items))
    if len(items) != len(args):
        raise _bad(where, value, f"{len(args)} values ({describe_type(tp)})", f"; got {len(items)}")
    return tuple(convert(item, arg, f"{where}[{index}]") for index, (item, arg) in enumerate(zip(items, args)))


def type_problem(value: Any, tp: Any) -> str | None:
    """Why `value` is not of field type `tp` (None when it is), for configs built or edited in Python.

    Stricter than `convert`: no text is parsed, because a str in an int field set from code is a bug, not input.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else type_problem(value, inner)
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if any(type(value) is type(choice) and value == choice for choice in choices):
            return None
        return f"{value!r} is not one of {listing(choices)}{did_you_mean(str(value), [str(c) for c in choices])}"
    if get_origin(tp) is tuple:
        if not isinstance(value, tuple):
            return f"expected a tuple ({describe_type(tp)}), got {type(value).__name__}"
        args = get_args(tp)
        element_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(element_types) != len(value):
            return f"expected {len(element_types)} values ({describe_type(tp)}), got {len(value)}"
        problems = [type_problem(item, arg) for item, arg in zip(value, element_types)]
        return next((problem for problem in problems if problem), None)
    numeric = {int: (int,), float: (int, float)}.get(tp)
    if numeric is not None:
        ok = isinstance(value, numeric) and not isinstance(value, bool)
    else:
        ok = type(value) is tp
    if not ok:
        return f"expected {describe_type(tp)}, got {type(value).__name__} {value!r}"
    if tp is float and not _finite(value):
        return f"{value!r} is not a finite float (no float option takes inf or nan)"
    return None


def _finite(value: int | float) -> bool:
    """Whether a float field's value is a finite float (an int is finite unless too large for a float)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def toml_literal(value: Any) -> str:
    """`value` as a TOML value that `tomllib` reads back to the same Python value (floats via repr, exactly)."""
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, except that TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")
