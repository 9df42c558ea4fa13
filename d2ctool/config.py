"""Typed configs: nested dataclasses built from YAML, with validated `dotted.key=value` overrides.

A config class is a plain dataclass whose fields carry type hints (int, float, str, bool, Literal,
Optional, list, nested dataclasses) and optional bounds in `field(metadata={"min": ...})`.
Every value is checked against its hint; errors name the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal

import yaml

from d2ctool.errors import UserError


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(UserError):
    pass


def bounded(default, *, min=None, max=None, **kw):
    """A dataclass field with inclusive numeric bounds checked on load."""
    return dataclasses.field(default=default, metadata={"min": min, "max": max}, **kw)


def nested(cls):
    """A dataclass field holding a sub-config with its defaults."""
    return dataclasses.field(default_factory=cls)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp, where: str):
    """Check `value` (as YAML would give it) against the type hint `tp`; return the typed value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        others = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if others == [str] and isinstance(value, str) and not value.strip():
            # an optional path or name given as "": never what was meant (a path would resolve to . or /)
            raise ConfigError(f"{where}: empty; give a value, or null to leave it unset")
        if len(others) == 1:  # Optional[X]: X's own message says more (e.g. "a finite number")
            return _coerce(value, others[0], where)
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, where)
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        value = float(value)  # PyYAML reads `1e-4` (no dot) as a string
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    if not ok(value):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is float:  # NaN passes every `<` check: no setting takes it, nor ±inf (or an int too big for a float)
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {data_repr(value)}")
    return value


def data_repr(value) -> str:
    return {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan" if value != value else repr(value))


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (leaves and sub-sections)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(valid_keys(tp, key + "."))
    return keys


def _unknown_key(key: str, candidates: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.75)
    if not close:  # compare the last component too: `prepare.shardsize` → `shard_size`
        last = key.rsplit(".", 1)[-1]
        close = [c for c in candidates if c.rsplit(".", 1)[-1] in difflib.get_close_matches(
            last, [c.rsplit(".", 1)[-1] for c in candidates], n=4, cutoff=0.6)][:4]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(candidates)}"
    return ConfigError(f"{where}unknown key '{key}'{hint}")


def build(cls, data: dict, where: str = ""):
    """Build dataclass `cls` from a dict, checking every key, type and bound."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key), valid_keys(cls, prefix), "")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{prefix}{f.name}: required, but not given")
            continue
        tp = hints[f.name]
        value = _coerce(data[f.name], tp, prefix + f.name)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if value is not None and lo is not None and value < lo:
            raise ConfigError(f"{prefix}{f.name}: must be >= {lo}, got {value!r}")
        if value is not None and hi is not None and value > hi:
            raise ConfigError(f"{prefix}{f.name}: must be <= {hi}, got {value!r}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _field_type(cls, parts: list[str]):
    """The type hint at a dotted path, or None when the path does not exist."""
    tp = cls
    for part in parts:
        if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = _hints(tp)[part]
    return tp


def parse_override(text: str, root_cls, default_section: str | None = None) -> tuple[list[str], Any]:
    """Parse `dotted.key=value` into (path, raw value) against the schema of `root_cls`.

    A key may be written relative to the running command's section (`shard_size=10`), which is tried
    first, or from the recipe's root (`prepare.shard_size=10`). String fields take the text verbatim
    (`name=007` stays "007"); other fields parse it as YAML and are type-checked on build.
    """
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. --set prepare.shard_size=500")
    key, raw = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    tp = None
    if default_section is not None:  # the running command's section first: `sample` has a key `discrete`
        tp = _field_type(root_cls, [default_section] + parts)
        if tp is not None:
            parts = [default_section] + parts
    if tp is None:
        tp = _field_type(root_cls, parts)
    if tp is None:
        raise _unknown_key(key, valid_keys(root_cls), "--set: ")
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"--set {key}: '{key}' is a section; set one of its keys, e.g. "
                          f"{valid_keys(tp, key + '.')[0]}=...")
    if tp is str or (_is_optional(tp) and str in typing.get_args(tp) and raw.strip() not in ("null", "~")):
        return parts, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str], root_cls, default_section: str | None = None) -> dict:
    """Return a copy of the raw recipe dict with every override set."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text, root_cls, default_section)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
