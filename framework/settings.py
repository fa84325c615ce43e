"""The settings that decide what a checkpoint's weights mean: the backbone they were trained on,
the method and its arguments, the task's head, whether the head trained.

The recipe is the authority. A checkpoint trained with other settings is refused naming every
differing field (``--ckpt_settings adopt`` takes the checkpoint's instead, said out loud, and
never its ``trust_remote_code``): silently rebuilding another method, backbone or head from a
file is how a checkpoint ends up evaluating something else than the recipe says, or importing
code the recipe never named.
"""

from __future__ import annotations

import inspect
from typing import Any

BACKBONE_FIELDS = ("name_or_path", "config", "dtype", "revision", "gguf_file", "seed")
TASK_FIELDS = ("num_labels", "pooling")
ADOPTED = ("backbone", "method", "task", "train_head")


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def weight_settings(hparams: dict[str, Any]) -> dict[str, Any]:
    """The fields of a module's hyper-parameters (plain config) that decide its weights, flat."""
    backbone = hparams.get("backbone") or {}
    task = hparams.get("task") or {}
    out = {f"model.backbone.{k}": backbone.get(k) for k in BACKBONE_FIELDS}
    out.update(_flatten(hparams.get("method"), "model.method"))
    out["model.task.class_path"] = task.get("class_path")
    out.update({f"model.task.init_args.{k}": (task.get("init_args") or {}).get(k) for k in TASK_FIELDS})
    out["model.train_head"] = hparams.get("train_head")
    return out


def differences(recipe: dict[str, Any], checkpoint: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """``field: recipe X, checkpoint Y`` for every weight setting that differs (a seed the
    checkpoint did not record is not a difference). ``defaults``: field -> the default of the
    recipe method's argument; a field the checkpoint does not have at all (written before the
    method had that argument) is not a difference where the recipe keeps its default."""
    ours, theirs = weight_settings(recipe), weight_settings(checkpoint)
    defaults = defaults or {}
    out = []
    for key in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(key), theirs.get(key)
        if key.endswith(".seed") and (a is None or b is None):
            continue
        if key not in theirs and key in defaults and a == defaults[key]:
            continue
        if a != b:
            out.append(f"{key}: recipe {a!r}, checkpoint {b!r}")
    return out


def adopted(checkpoint: dict[str, Any], trust_remote_code: bool) -> dict[str, Any]:
    """The checkpoint's weight settings as a ``model`` config update; ``trust_remote_code``
    stays the recipe's."""
    update = {k: checkpoint[k] for k in ADOPTED if k in checkpoint}
    if isinstance(update.get("backbone"), dict):
        update["backbone"] = {**update["backbone"], "trust_remote_code": trust_remote_code}
    return update


def method_defaults(method: Any) -> dict[str, Any]:
    """The defaults of ``method``'s ``__init__`` arguments, as :func:`differences` names them."""
    if method is None:
        return {}
    parameters = inspect.signature(type(method).__init__).parameters.values()
    return {f"model.method.init_args.{p.name}": p.default for p in parameters if p.default is not inspect.Parameter.empty}
