"""Strict loading of JSON objects into typed dataclasses.

Every JSON config (`--mm-data`, `--mm-model`, `--mm-tool`) is parsed by `from_dict`, which
refuses unknown keys (suggesting the closest valid one), missing required keys, and values
of the wrong type, naming the file and the dotted key path. A typo in a config is an error
at start-up, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any, Dict, Literal, Optional, Type, TypeVar, Union, get_args, get_origin, get_type_hints

from ..errors import MindSpeedMMError
from . import aliases
from .aliases import suggest

T = TypeVar("T")


class ConfigError(MindSpeedMMError, ValueError):
    """A config file or value that cannot be used; the message names the file and key."""

    same_on_all_ranks = True  # checks of flags and config files, identical on every rank


def _suggest(word: str, options, era: Optional[Dict[str, str]] = None) -> str:
    """' Did you mean ...?' for a misspelling of a valid name or of a guide-era name (`era`: era key -> today's)."""
    era = era or {}
    close = suggest(word, [o for o in list(options) + list(era) if o != word])
    if close is None:
        return ""
    if close in era and era[close] and era[close] != close:
        return f" Did you mean '{close}' (the guide-era name of '{era[close]}')?"
    return f" Did you mean '{close}'?"


def _fail(source: str, key: str, message: str) -> ConfigError:
    where = f"{source}: key '{key}'" if key else source
    return ConfigError(f"{where}: {message}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "object"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "object"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(source, key, f"must not be null; expected {_type_name(tp)}.")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, source, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(source, key, f"expected {_type_name(tp)}, got {json.dumps(value)[:80]}.")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = _suggest(str(value), [str(a) for a in allowed])
            raise _fail(source, key, f"{json.dumps(value)} is not one of {', '.join(map(repr, allowed))}.{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _fail(source, key, f"expected a list, got {json.dumps(value)[:80]}.")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _fail(source, key, f"expected a list of {len(args)} items, got {len(value)}.")
            return tuple(_convert(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, f"expected an object, got {json.dumps(value)[:80]}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, key, f"expected true or false, got {json.dumps(value)[:80]}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, f"expected an integer, got {json.dumps(value)[:80]}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, key, f"expected a number, got {json.dumps(value)[:80]}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, key, f"expected a string, got {json.dumps(value)[:80]}.")
        return value
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def from_dict(cls: Type[T], data: Any, *, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from a JSON object, strictly; see the module docstring. The guide-era names of its keys
    are mapped first (`aliases`); their notices are printed when the outermost call (or job) ends."""
    with aliases.collect_notices():
        return _from_dict(cls, data, source, prefix)


def _from_dict(cls: Type[T], data: Any, source: str, prefix: str) -> T:
    if not isinstance(data, dict):
        raise _fail(source, prefix, f"expected an object, got {json.dumps(data)[:80]}.")
    data = aliases.apply(cls.__name__, data, source, prefix)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else key
            hint = _suggest(key, fields, aliases.era_names(cls.__name__))
            raise _fail(source, path, f"unknown key.{hint} Valid keys here: {', '.join(sorted(fields))}.")
    kwargs: Dict[str, Any] = {}
    for name, field in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], source, path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise _fail(source, path, "is required but missing.")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise _fail(source, prefix, str(exc)) from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise _fail(source, prefix, str(exc)) from exc
    return obj


def to_dict(obj: Any) -> Any:
    """The JSON-ready form of a config dataclass (inverse of `from_dict`)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load_json(path: str, what: str) -> Any:
    """Read a JSON file, with errors that name the file, the flag and the fix."""
    if not path:
        raise ConfigError(f"{what}: no path given.")
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: file '{path}' does not exist (working directory: {os.getcwd()}).")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: '{path}' is not a UTF-8 text file ({exc.reason} at byte {exc.start}); pass the "
                          f"JSON config file.") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what}: '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from exc


def load_config(cls: Type[T], path: str, what: str) -> T:
    """`load_json` + `from_dict`, naming `path` in every error."""
    return from_dict(cls, load_json(path, what), source=path)
