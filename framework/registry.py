"""Discovers method plugins through the ``fw.methods`` entry-point group.

Every installed distribution that declares ``[project.entry-points."fw.methods"]`` is found
here; fw itself registers its in-repo plugins the same way, so a third-party package needs
no change to fw. A recipe names a method by its registered name (``class_path: lora``) or by
an import path (``class_path: fw_lora.LoRA``).
"""

from __future__ import annotations

import importlib.metadata as metadata
import warnings
from dataclasses import dataclass
from typing import Any

from framework.method import PeftMethod

GROUP = "fw.methods"


@dataclass(frozen=True)
class Plugin:
    """One installed method plugin."""

    name: str  # the registered (entry-point) name
    target: str  # "module:Class" as declared
    distribution: str  # the package that provides it
    cls: type[PeftMethod] | None  # None when it failed to load
    error: str | None = None

    @property
    def class_path(self) -> str:
        return self.target.replace(":", ".")

    @property
    def description(self) -> str:
        return self.cls.summary_line() if self.cls else f"(failed to load: {self.error})"


_CACHE: dict[str, Plugin] | None = None


def discover(reload: bool = False) -> dict[str, Plugin]:
    """Load every ``fw.methods`` entry point, keyed by registered name.

    A plugin that fails to import, or does not subclass :class:`PeftMethod`, is reported
    with a warning and kept (with its error) so ``fw methods`` can show it; it never takes
    the CLI down with it.
    """
    global _CACHE
    if _CACHE is not None and not reload:
        return _CACHE
    plugins: dict[str, Plugin] = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in plugins and plugins[ep.name].target != ep.value:
            warnings.warn(
                f"fw.methods: '{ep.name}' is registered by both {plugins[ep.name].distribution} "
                f"and {dist}; using {plugins[ep.name].distribution}'s",
                stacklevel=2,
            )
            continue
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, PeftMethod)):
                raise TypeError(f"{ep.value} is not a subclass of framework.method.PeftMethod")
            plugins[ep.name] = Plugin(ep.name, ep.value, dist, cls)
        except Exception as err:  # one broken plugin must not break the others
            warnings.warn(f"fw.methods: plugin '{ep.name}' ({ep.value}) failed to load: {err}", stacklevel=2)
            plugins[ep.name] = Plugin(ep.name, ep.value, dist, None, f"{type(err).__name__}: {err}")
    _CACHE = dict(sorted(plugins.items()))
    return _CACHE


class UnknownMethodError(ValueError):
    """A recipe names a method that no installed plugin registers."""


def _unknown(name: str, plugins: dict[str, Plugin]) -> UnknownMethodError:
    return UnknownMethodError(
        f"model.method: unknown method '{name}'; installed methods: {', '.join(plugins) or '(none)'} "
        "(or give an import path such as my_package.MyMethod)"
    )


def get(name: str) -> type[PeftMethod]:
    """The method class registered as ``name``; an unknown name lists the installed ones."""
    plugins = discover()
    if name not in plugins:
        raise _unknown(name, plugins)
    plugin = plugins[name]
    if plugin.cls is None:
        raise ImportError(f"method '{name}' is installed but failed to load: {plugin.error}")
    return plugin.cls


def resolve_names(config: Any) -> Any:
    """Replace registered method names used as ``class_path`` by their import paths.

    jsonargparse resolves a bare class name, but a registered name (``lora``) is not a
    class name (``LoRA``). This walks a loaded recipe and rewrites, in any nesting,
    ``{class_path: <registered name>}`` and ``method: <registered name>``. Dotted paths and
    unregistered names are left for jsonargparse to resolve or reject.
    """
    plugins = discover()

    def rewrite(name: Any, is_method: bool) -> Any:
        if isinstance(name, str) and name in plugins:
            return plugins[name].class_path
        if is_method and isinstance(name, str) and "." not in name:
            raise _unknown(name, plugins)
        return name

    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "class_path":
                out[key] = rewrite(value, False)
            elif key == "method" and isinstance(value, str):
                out[key] = rewrite(value, True)
            elif key == "method" and isinstance(value, dict) and "class_path" in value:
                out[key] = {**resolve_names(value), "class_path": rewrite(value["class_path"], True)}
            else:
                out[key] = resolve_names(value)
        return out
    if isinstance(config, list):
        return [resolve_names(v) for v in config]
    return config


def resolve_cli_names(argv: list[str]) -> list[str]:
    """Rewrite registered names given on the command line (``--model.method lora``)."""
    plugins = discover()
    out = list(argv)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        if not (key.endswith(".method") or key.endswith(".method.class_path")):
            continue
        at = i if eq else i + 1
        if not eq:
            if i + 1 >= len(out):
                continue
            value = out[i + 1]
        if value in plugins:
            value = plugins[value].class_path
        elif value.isidentifier():  # a bare name (not a dotted path, not inline YAML)
            raise _unknown(value, plugins)
        out[at] = f"{key}={value}" if eq else value
    return out
