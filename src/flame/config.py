"""Settings as data: one dataclass per stage, each field declared once with `setting(...)`.

A field carries its type (the annotation), default, help text, range check and flag shape.
From that one declaration come
- the command line (`flame.cli` builds every flag and its "(default ...)" text from it),
- `--config FILE` (YAML keys are the field names, `-` or `_`),
- type conversion (YAML reads `5e-4` as text and `yes` as a bool; both are accepted where
  they make sense) and range checks, as one `FlameError` line before any work starts.
Precedence: field defaults < the YAML file < the flags given. A derived default (one that
depends on the data, say "max(D, 4096)") is a `None` field whose `shown` text says how it is
derived; the stage computes it in one place.

This module knows nothing of argparse: `flame.cli` is the only command-line layer.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flame.errors import FlameError, first_line

MISSING = dataclasses.MISSING
Check = tuple[Callable[[Any], bool], str]


def setting(default: Any = MISSING, *, help: str = "", check: Check | None = None, flag: str | None = None,
            aliases: tuple[str, ...] = (), metavar: str | tuple[str, ...] | None = None,
            choices: tuple[str, ...] | None = None, shown: str | None = None, group: str = "settings",
            positional: bool = False, negate: str | None = None, optional_value: Any = MISSING,
            required: bool = False, cli: bool = True, factory: Callable[[], Any] | None = None,
            repeat: bool = False) -> Any:
    """A dataclass field with what the command line, the YAML loader and the checks need.

    check: (predicate, "must be ...") applied to a non-None value after conversion.
    flag: the long flag (default `--` + the name with `-`); aliases: more spellings (`-m`).
    shown: the default as the help text shows it (default: the value itself; "" hides it).
    negate: for a bool defaulting to True, the flag that turns it off (`--no-progress`).
    optional_value: the flag may be given without a value, meaning this (`--resume`).
    required: must be set by a flag or the YAML file. cli=False: YAML and API only.
    repeat: a list flag given twice adds to the list (`--data a --data b`); otherwise the last wins.
    """
    meta = dict(help=help, check=check, flag=flag, aliases=aliases, metavar=metavar, choices=choices, shown=shown,
                group=group, positional=positional, negate=negate, optional_value=optional_value,
                required=required, cli=cli, repeat=repeat)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, list | dict | set):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# -- common checks ----------------------------------------------------------------------------
def at_least(lo: float) -> Check:
    return (lambda v: v >= lo), f"must be >= {lo}"


POSITIVE: Check = ((lambda v: v > 0), "must be > 0")


def one_of(*values: str) -> Check:
    return (lambda v: v in values), "must be " + (", ".join(values[:-1]) + " or " + values[-1] if len(values) > 1
                                                  else values[0])


# -- fields -----------------------------------------------------------------------------------
def fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def shown_default(f: dataclasses.Field) -> str:
    """The default as `--help` shows it ("" for none)."""
    shown = f.metadata.get("shown")
    if shown is not None:
        return shown
    value = default_of(f)
    if value is MISSING or value is None or value == [] or (isinstance(value, bool) and f.metadata.get("negate")):
        return ""
    if isinstance(value, bool):
        return "on" if value else ""
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


# -- conversion -------------------------------------------------------------------------------
def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {s!r}")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` (from YAML, the flags or the API) as the annotated type `hint`, or one FlameError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        items = [value] if origin is list and isinstance(value, str | Path) else value
        n = len(args) if origin is tuple and Ellipsis not in args else None
        if not isinstance(items, list | tuple) or (n is not None and len(items) != n):
            what = f"{n} values" if n else "a list"
            raise FlameError(f"{where}: expected {what}, got {value!r}")
        out = [coerce(v, args[0], where) for v in items]
        return tuple(out) if origin is tuple else out
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str):
                return parse_bool(value)
        elif hint is int and not isinstance(value, bool):
            number = float(value) if isinstance(value, str | float) else value
            if isinstance(number, int) or (isinstance(number, float) and number.is_integer()):
                return int(number)
        elif hint is float and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                return number
        elif hint in (str, Path) and isinstance(value, str | int | float | os.PathLike) and not isinstance(value, bool):
            return hint(value) if hint is Path else str(value)
        elif hint is Any:
            return value
    except (ValueError, TypeError, OverflowError):
        pass
    kind = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
            Path: "a path"}.get(hint, hint)
    raise FlameError(f"{where}: expected {kind}, got {value!r}")


def validate(cfg: Any) -> Any:
    """Convert every field to its type and check its range, then the dataclass's own `check()`
    (rules between fields): one clear FlameError before anything is read, written or deleted."""
    types_ = hints(type(cfg))
    for f in fields(type(cfg)):
        flag = flag_of(f)
        where = f"{flag} ({f.name})" if not f.metadata.get("positional") else f.name.upper()
        value = coerce(getattr(cfg, f.name), types_[f.name], where)
        setattr(cfg, f.name, value)
        if f.metadata.get("required") and (value is None or value == "" or value == []):
            raise FlameError(f"{flag} is required (flag or config file)")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise FlameError(f"{flag} must be one of {', '.join(map(str, choices))} (got {value})")
        check = f.metadata.get("check")
        if value is not None and check is not None and not check[0](value):
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
            raise FlameError(f"{flag} {check[1]}" + (f" (got {shown})" if shown else ""))
    own = getattr(cfg, "check", None)
    if callable(own):
        own()
    return cfg


def load_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file's content (safe loader), or one FlameError naming `what` is missing or bad."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FlameError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FlameError(f"{path} is not valid YAML: {first_line(e)}") from e


def read_yaml(path: str | Path) -> dict:
    """A settings file: a YAML mapping."""
    loaded = load_yaml(path) or {}
    if not isinstance(loaded, dict):
        raise FlameError(f"{path} must hold a mapping of settings")
    return loaded


def build(cls, given: dict, config_file: str | Path | None = None) -> Any:
    """Field defaults < the YAML file < `given` (the flags a user typed), converted and checked."""
    names = {f.name for f in fields(cls)}
    values: dict = {}
    if config_file:
        for key, value in read_yaml(config_file).items():
            key = str(key).replace("-", "_")
            if key not in names:
                raise FlameError(f"{config_file}: unknown setting {key!r}")
            values[key] = value
    values.update({k: v for k, v in given.items() if k in names})
    return validate(cls(**values))
