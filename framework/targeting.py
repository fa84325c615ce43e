"""Pick modules by name, the way every fw plugin finds its targets.

A pattern is one of

- a **name suffix** (no wildcard): ``query`` or ``attention.output.dense`` matches every
  module whose dotted name ends with those components (``query`` never matches ``x_query``);
- a **glob** (contains ``*``, ``?`` or ``[``): ``*.layer.*.output.dense`` matched against the
  full dotted name with :func:`fnmatch.fnmatchcase`;
- a **regex** (prefixed ``re:``): ``re:.*\\.(q|v)_proj`` matched with :func:`re.fullmatch`.

The special pattern ``all-linear`` selects every Linear-like module except the task head and
the output embedding. When a pattern matches nothing, the error lists the Linear-like module
names that exist, with layer indices folded (``encoder.layer.*.attention.self.query``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from framework.validation import InvalidArgument

ALL_LINEAR = "all-linear"

#: Names transformers gives task heads; they stay out of method targets and train as a head.
HEAD_NAMES = ("classifier", "score", "qa_outputs", "classification_head", "pre_classifier", "lm_head")


def linear_types() -> tuple[type[nn.Module], ...]:
    """nn.Linear (bitsandbytes' 4/8-bit linears subclass it) and GPT-2's Conv1D."""
    types: list[type[nn.Module]] = [nn.Linear]
    from transformers.pytorch_utils import Conv1D

    types.append(Conv1D)
    return tuple(types)


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level task heads of a transformers model (classifier, score, lm_head, ...)."""
    names = [name for name, _ in model.named_children() if name in HEAD_NAMES]
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        names += [n for n, m in model.named_modules() if m is out and n and n not in names]
    return names


def _is_under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def matches(name: str, pattern: str) -> bool:
    """Whether the dotted module ``name`` matches one ``pattern`` (see the module docstring)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def fold_indices(names: Iterable[str]) -> list[str]:
    """``a.0.b``, ``a.1.b`` -> ``a.*.b`` (sorted, unique): a readable list of module names."""
    return sorted({re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names})


def find_modules(
    model: nn.Module,
    patterns: str | Sequence[str],
    types: tuple[type[nn.Module], ...] | None = None,
    exclude: Sequence[str] = (),
    field: str = "targets",
    require_each: bool = True,
) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` (default: Linear-like) whose names match any pattern.

    Task heads are always excluded, as is anything under ``exclude``. Every pattern must
    match at least one module (with ``require_each=False``: the patterns together must match
    one, as for per-architecture defaults that list alternatives); otherwise an
    :class:`InvalidArgument` names ``field`` (the method's argument), the pattern and the
    candidates that exist.
    """
    types = types or linear_types()
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise InvalidArgument(field, "the list of target patterns is empty; name at least one module")
    skip = [*head_module_names(model), *exclude]
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, types) and not _is_under(name, skip)
    ]
    chosen: dict[str, nn.Module] = {}

    def no_match(what: str) -> InvalidArgument:
        kinds = "/".join(t.__name__ for t in types)
        available = fold_indices(n for n, _ in candidates)
        return InvalidArgument(
            field, f"{what} matches no {kinds} module of {type(model).__name__}. "
            f"Modules that exist: {', '.join(available) or '(none)'}"
        )

    for pattern in patterns:
        hits = candidates if pattern == ALL_LINEAR else [(n, m) for n, m in candidates if matches(n, pattern)]
        if not hits and require_each:
            raise no_match(f"pattern '{pattern}'")
        chosen.update(hits)
    if not chosen:
        raise no_match(f"none of the patterns {list(patterns)}")
    # keep the model's own order, whatever the order of the patterns
    order = {name: i for i, (name, _) in enumerate(candidates)}
    return sorted(chosen.items(), key=lambda item: order[item[0]])


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def targets_or_roles(
    model: nn.Module, targets: Sequence[str] | None, roles: Sequence[str], field: str = "targets"
) -> list[tuple[str, nn.Module]]:
    """The modules ``targets`` names, or (``targets`` None) the architecture's modules playing
    ``roles`` (:mod:`framework.architectures`): how methods pick their defaults."""
    if targets is not None:
        return find_modules(model, targets, field=field)
    from framework.architectures import role_patterns

    return find_modules(model, role_patterns(model, roles, field=field), field=field, require_each=False)
