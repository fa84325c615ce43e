"""Components as plain data: what a recipe writes, what checkpoints and W&B record."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any


def init_args(obj: Any) -> dict[str, Any]:
    """The ``__init__`` arguments of ``obj``, read back from same-named attributes.

    fw components (methods, tasks) keep each typed ``__init__`` argument as an attribute
    of the same name; that is what lets a run be written back as a recipe.
    """
    names = [p for p in inspect.signature(type(obj).__init__).parameters if p not in ("self", "args", "kwargs")]
    return {name: getattr(obj, name) for name in names if hasattr(obj, name)}


def class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def to_config(value: Any) -> Any:
    """Plain data for ``value``: dataclasses as mappings, other objects as class_path/init_args."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_config(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_config(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return {"class_path": class_path(value), "init_args": to_config(init_args(value))}


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``base`` in place (nested mappings merge, anything else replaces)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base
