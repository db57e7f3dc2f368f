"""Name -> class registries for model families and training methods.

A family or a method is one file with a decorator; the entry point composes
``FAMILIES[recipe.family]`` with ``METHODS[recipe.method]`` (N + M, never N x M).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)

FAMILIES: dict[str, type] = {}
METHODS: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    def decorator(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} is already registered by {table[name].__qualname__}")
        table[name] = cls
        cls.name = name
        return cls

    return decorator


def register_family(name: str) -> Callable[[T], T]:
    """Class decorator: make a model family selectable as ``recipe.family: name``."""
    return _register(FAMILIES, "family", name)


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: make a training method selectable as ``recipe.method: name``."""
    return _register(METHODS, "method", name)


def load_builtins() -> None:
    """Import the bundled families and methods so their decorators run."""
    import accel_distill.families  # noqa: F401
    import accel_distill.methods  # noqa: F401
