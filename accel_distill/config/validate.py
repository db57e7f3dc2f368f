"""Strict, type-driven conversion of raw YAML mappings into config dataclasses.

Every error names the file and the dotted key path, and an unknown key gets the
closest valid key as a suggestion: a typo must never become a silent default.
Legacy string forms (``"8"``, ``"1e-5"``, ``"0.9,0.999"``) are normalised.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from accel_distill.errors import ConfigError

# Keys of other trainers that users carry over, with where they live here.
RENAMED_KEYS = {"models": "roles", "distill": "recipe", "method": "method_config"}


def fail(source: str, key: str, message: str) -> typing.NoReturn:
    """Raise the one-line error every config mistake produces."""
    raise ConfigError(f"{source}: {key}: {message}" if key else f"{source}: {message}")


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    valid = list(valid)
    if name in RENAMED_KEYS and RENAMED_KEYS[name] in valid:
        return f" (did you mean '{RENAMED_KEYS[name]}'?)"
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(sorted(valid))})"


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build(cls: type, data: Any, key: str, source: str) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``data``, validating every field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(source, key, f"expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    removed = getattr(cls, "REMOVED_KEYS", {})  # keys of older versions: say what became of them
    for name in data:
        if name in removed:
            fail(source, join(key, str(name)), removed[name])
        if name not in fields:
            fail(source, join(key, str(name)), "unknown key" + suggest(str(name), fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = coerce(hints[name], data[name], join(key, name), source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(source, join(key, name), "missing required key")
    return cls(**kwargs)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _number(tp: type, value: Any, key: str, source: str) -> Any:
    if isinstance(value, bool):
        fail(source, key, f"expected {tp.__name__}, got a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            fail(source, key, f"expected {tp.__name__}, got {value!r}")
    if not isinstance(value, (int, float)):
        fail(source, key, f"expected {tp.__name__}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        fail(source, key, f"expected a finite {tp.__name__}, got {value!r}")
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            fail(source, key, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Convert ``value`` to type ``tp`` or fail naming ``key``."""
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(inner[0], value, key, source)
        # One scalar type or a list of them (str | list[str]): a YAML list is the list, anything else the
        # scalar (so a comma in a single path is never split).
        lists = [a for a in inner if get_origin(a) is list]
        scalars = [a for a in inner if a not in lists]
        if len(lists) == 1 and len(scalars) == 1:
            return coerce(lists[0] if isinstance(value, (list, tuple)) else scalars[0], value, key, source)
        raise TypeError(f"unsupported union {tp}")
    if value is None:
        fail(source, key, "must not be empty (null)")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            fail(source, key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, source)
    if tp is bool:
        if not isinstance(value, bool):
            fail(source, key, f"expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        return _number(tp, value, key, source)
    if tp is str:
        if not isinstance(value, str):
            fail(source, key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # legacy "8" / "4,2,1" / "0.9,0.999"
            value = [v for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple:
            if len(args) != len(value):
                fail(source, key, f"expected {len(args)} values, got {len(value)}")
            return tuple(coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        return [coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail(source, key, f"expected a mapping, got {type(value).__name__}")
        return {str(k): coerce(args[1], v, join(key, str(k)), source) for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp} at {key}")


def check_range(
    source: str, key: str, value: float | None, low: float | None = None, high: float | None = None
) -> None:
    """Fail unless ``low <= value <= high`` (None bounds are open); None values pass."""
    if value is None:
        return
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        fail(source, key, f"must be in [{lo}, {hi}], got {value}")


def looks_local(path: str) -> bool:
    """A path is local unless it has the ``org/name`` shape of a Hub id and does not exist."""
    if os.path.exists(os.path.expanduser(path)):
        return True
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        return True
    return False


def check_path(source: str, key: str, path: str | None, *, allow_hub: bool = False) -> None:
    """Fail when a local path does not exist (Hub ids are checked when loaded)."""
    if path is None:
        return
    if allow_hub and not looks_local(path):
        return
    if not os.path.exists(os.path.expanduser(path)):
        fail(source, key, f"path does not exist: {path}")
