"""Reading a config's values: `--set KEY=VALUE` overrides into the raw mapping, and the
raw mapping into the typed dataclasses of mlxtune.config (unknown keys with a "did you
mean", wrong types and values outside a key's choices or range named with the dotted key).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Union

import yaml

from mlxtune.errors import ConfigError


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.iters=50")
    key, _, value = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {item}: invalid key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = parsed


# A decimal number as people write it (1e-4, 2E-4, 5., .5e-3); not nan or inf.
_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(typing.get_args(t)[0])}"
    if dataclasses.is_dataclass(t):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(t, str(t))


def build(cls, raw: Any, prefix: str, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else (
                f" (known keys here: {', '.join(fields)})")
            raise ConfigError(f"{where}: {dotted}: unknown key{hint}")
        kwargs[key] = _convert(hints[key], value, dotted, where, fields[key])
    return cls(**kwargs)


def _convert(t, value, dotted: str, where: str, f=None):
    origin = typing.get_origin(t)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(t)):
                return None
            raise ConfigError(f"{where}: {dotted}: must be set ({_type_name(t)})")
        errors = []
        for a in args:
            try:
                return _convert(a, value, dotted, where, f)
            except ConfigError as e:
                errors.append(e)
        if len(args) == 1:
            raise errors[-1]
        # A value of the right type but not among the choices says what the choices are.
        choice = [e for e in errors if "is not one of" in str(e)]
        raise choice[0] if choice else ConfigError(
            f"{where}: {dotted}: expected {_type_name(t)}, got {value!r}")
    if dataclasses.is_dataclass(t):
        if value is None:
            return t()
        return build(t, value, dotted + ".", where)
    if origin is list:
        (item_t,) = typing.get_args(t)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {dotted}: expected a list, got {value!r}")
        return [_convert(item_t, v, f"{dotted}[{i}]", where) for i, v in enumerate(value)]
    if t is float and isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
        # YAML 1.1 reads 1e-4 and 2E-4 (an exponent without a dot) as strings.
        value = float(value.strip())
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, (str, int, float)) and not isinstance(value, bool),
    }.get(t)
    if ok is None:
        raise TypeError(f"unsupported config type {t}")
    if not ok:
        raise ConfigError(f"{where}: {dotted}: expected {_type_name(t)}, got {value!r}")
    value = t(value)
    meta = f.metadata if f is not None else {}
    if "choices" in meta and value not in meta["choices"]:
        options = ", ".join(str(c).lower() if isinstance(c, bool) else str(c)
                            for c in meta["choices"])
        raise ConfigError(f"{where}: {dotted}: {value!r} is not one of: {options}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: {dotted}: must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: {dotted}: must be <= {meta['max']}, got {value!r}")
    return value
