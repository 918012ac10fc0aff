"""Configuration I/O for every config dataclass: dict / JSON / YAML round trips and dotted `key=value` overrides.

One coercer serves the model (`xvla.config.XVLAConfig`), training (`xvla.train.config`) and the demo
(`xvla.demo.config.DemoConfig`). Loading is strict: an unknown key is an error that names it and lists close
matches, and a value of the wrong type names its field. Values are coerced by the field's type hint, so JSON
lists become tuples where a tuple is declared and YAML 1.1's `1e-4` (a string to YAML) becomes a float.

Why hand-written and not a library: `dacite`/`cattrs` coerce dicts but know no dotted overrides and give no
"did you mean" errors; `tyro`/`draccus` would replace the argparse CLI that each subpackage registers. This
module is the one place such rules live.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, mapping or override that does not fit the schema."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build `cls` from a (nested) mapping; unknown keys and wrong types raise ConfigError naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        name = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(_unknown_key(name, key, list(fields)))
        kwargs[key] = _coerce(hints[key], value, name)
    return cls(**kwargs)


def parse_value(raw: str) -> Any:
    """A command-line value as YAML (scalars, lists, mappings), except that JSON numbers win: YAML 1.1 reads
    `3e-4` as a string."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return value
    return value


def parse_overrides(items: Sequence[str], example: str = "optim.lr=3e-4") -> dict[str, Any]:
    """`["a.b=value", ...]` -> `{"a.b": parsed value}` (values through `parse_value`)."""
    updates: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. {example}")
        updates[key.strip()] = parse_value(raw)
    return updates


def set_dotted(cls: type, data: Mapping[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `data` (a dict of `cls`) with `updates` set: keys dotted (`"head.depth"`) or values nested
    (`{"head": {"depth": 2}}`) for sections; a key that names no field of `cls` is an error."""
    out: dict[str, Any] = json.loads(json.dumps(data))
    for key, value in _flatten(cls, updates).items():
        parts = key.split(".")
        _check_path(cls, parts)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = value
    return out


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with command-line `a.b=value` overrides set (values parsed as YAML)."""
    return set_dotted(cls, data, parse_overrides(overrides))


def replace(cfg: T, updates: Mapping[str, Any]) -> T:
    """`cfg` with dotted or nested `updates`, coerced and validated as if loaded from a file."""
    cls = type(cfg)
    return from_dict(cls, set_dotted(cls, to_dict(cfg), updates))


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read a JSON or YAML config file, apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return from_dict(cls, apply_overrides(cls, data, overrides))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The top-level keys whose values differ between two config dicts (present in one only included), sorted:
    what a refusal to mix two runs names."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def get_dotted(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def flatten(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts -> `{"a.b": value}` with scalar values (others as strings), for loggers' flat configs."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _section(cls: Any, name: str) -> Any:
    """The dataclass type of field `name` of dataclass `cls` (also through `X | None`), else None."""
    if not dataclasses.is_dataclass(cls) or name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    hint = typing.get_type_hints(cls)[name]
    return next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)


def _flatten(cls: Any, updates: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings under dataclass sections -> dotted keys; mappings for free-form fields stay whole."""
    out: dict[str, Any] = {}
    for key, value in updates.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        section = _section(cls, str(key))
        if section is not None and isinstance(value, Mapping):
            out.update(_flatten(section, value, name))
        else:
            out[name] = value
    return out


def _check_path(cls: type, parts: list[str]) -> None:
    """Raise for a dotted key that names no field (free-form dict fields accept any sub-key)."""
    current: Any = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(current):
            return  # inside a free-form mapping
        fields = {f.name for f in dataclasses.fields(current)}
        if part not in fields:
            raise ConfigError(_unknown_key(".".join(parts[: i + 1]), part, sorted(fields)))
        current = _section(current, part) or typing.get_type_hints(current)[part]


def _unknown_key(name: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {name!r}{hint} (valid keys here: {', '.join(sorted(known))})"


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, path=name)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} matches none of {_type_name(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
        return value
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        if len(args) == 2:
            return {k: _coerce(args[1], v, f"{name}.{k}") for k, v in value.items()}
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
