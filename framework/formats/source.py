"""Trained weights from outside the run: a Lightning checkpoint, an fw adapter folder or a
Hugging Face PEFT adapter folder, checked against a recipe and loaded into its module.

Two steps, because the method must exist before the module is built:

1. :meth:`Adapter.method_config` decides the ``model.method`` to build: the adapter's own
   (fw, checkpoint), or the recipe method's class with the arguments PEFT's config gives
   (PEFT). A method of another class than the recipe's is an error naming both, and only
   the classes of installed plugins (or the recipe's own) are ever imported from a file.
2. :meth:`Adapter.load_into` checks the built module (task, architecture) and loads the
   weights: a checkpoint's trainable state, or the method's stored form.

Nothing here unpickles: checkpoints load with ``weights_only=True``, folders are
safetensors and JSON.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from framework import registry
from framework.config import to_config
from framework.formats import fw as fw_format
from framework.formats import peft as peft_format
from framework.formats.fw import AdapterError, architecture
from framework.method import PeftMethod, load_trainable_parameters
from framework.module import CHECKPOINT_KEY
from framework.settings import TASK_FIELDS


def canonical(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def method_class(config: Any) -> type[PeftMethod] | None:
    """The class a recipe's ``model.method`` names (registered name, import path or class name)."""
    if config is None:
        return None
    path = str(config.get("class_path") if hasattr(config, "get") else config)
    plugins = registry.discover()
    if path in plugins:
        return registry.get(path)
    for plugin in plugins.values():
        if plugin.cls is not None and path in (plugin.class_path, canonical(plugin.cls), plugin.cls.__name__):
            return plugin.cls
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)  # the recipe's own import path


def _class_paths(config: Any) -> list[str]:
    if isinstance(config, dict):
        own = [str(config["class_path"])] if "class_path" in config else []
        return own + [p for v in config.values() for p in _class_paths(v)]
    if isinstance(config, list):
        return [p for v in config for p in _class_paths(v)]
    return []


def plain(config: Any) -> Any:
    """A jsonargparse Namespace (or anything else) as plain dicts and lists."""
    if hasattr(config, "as_dict"):
        return config.as_dict()
    if isinstance(config, dict):
        return {k: plain(v) for k, v in config.items()}
    if isinstance(config, list):
        return [plain(v) for v in config]
    return config


@dataclass
class Adapter:
    """Trained weights read from ``path`` (see the module docstring)."""

    path: Path
    kind: str  # "checkpoint", "fw" or "peft"
    state: dict[str, torch.Tensor]
    method: dict[str, Any] | None = None  # fw, checkpoint: class_path + init_args
    task: dict[str, Any] | None = None
    train_head: bool | None = None
    architecture: dict[str, Any] | None = None
    backbone: Any = None  # what the adapter says it was trained on
    peft_config: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)  # a checkpoint's model hyper-parameters

    @property
    def label(self) -> str:
        what = {"checkpoint": "checkpoint", "fw": "fw adapter", "peft": "PEFT adapter"}[self.kind]
        return f"{what} {self.path}"

    # -- 1. the method to build -----------------------------------------------------------

    def method_config(self, recipe_method: Any) -> dict[str, Any] | None:
        """``model.method`` for this adapter (``recipe_method``: the recipe's, or None)."""
        recipe_method = plain(recipe_method)
        recipe_cls = method_class(recipe_method)
        if self.kind == "peft":
            return self._peft_method(recipe_method, recipe_cls)
        if self.method is None:
            if recipe_cls is not None:
                raise AdapterError(
                    f"{self.label} is full fine-tuning (no method) but the recipe's model.method is "
                    f"{canonical(recipe_cls)}; use a recipe with method: null"
                )
            return None
        allowed = {canonical(p.cls) for p in registry.discover().values() if p.cls is not None}
        allowed |= {canonical(c) for c in map(method_class, _class_paths(recipe_method)) if c is not None}
        foreign = [p for p in _class_paths(self.method) if p not in allowed]
        if foreign:
            raise AdapterError(
                f"{self.label}: method class {foreign[0]} is not an installed fw method; fw imports only "
                "registered methods (or the recipe's) when reading an adapter"
            )
        if recipe_cls is not None and canonical(recipe_cls) != self.method["class_path"]:
            raise AdapterError(
                f"{self.label} holds {self.method['class_path']} weights but the recipe's model.method is "
                f"{canonical(recipe_cls)}; use a recipe with the adapter's method"
            )
        return self.method

    def _peft_method(self, recipe_method: Any, recipe_cls: type[PeftMethod] | None) -> dict[str, Any]:
        """The recipe's method class with PEFT's arguments over the recipe's own (e.g. QLoRA's
        quantization settings stay the recipe's)."""
        peft_type = str(self.peft_config["peft_type"])
        if recipe_cls is None:
            found = [p.cls for p in registry.discover().values() if p.cls is not None and "peft_type" in vars(p.cls)
                     and p.cls.peft_type == peft_type]
            if not found:
                raise AdapterError(f"{self.label}: no installed fw method reads PEFT's {peft_type} adapters")
            recipe_cls = found[0]
        elif recipe_cls.peft_type != peft_type:
            raise AdapterError(
                f"{self.label} is PEFT's {peft_type} but the recipe's model.method is {canonical(recipe_cls)} "
                f"(which reads {recipe_cls.peft_type or 'no PEFT adapters'}); use a recipe with the matching method"
            )
        same = recipe_method is not None and method_class(recipe_method) is recipe_cls
        base = dict((recipe_method.get("init_args") or {}) if same and isinstance(recipe_method, dict) else {})
        return {"class_path": canonical(recipe_cls), "init_args": {**base, **recipe_cls.from_peft(self.peft_config)}}

    def model_update(self, recipe_model: Any) -> dict[str, Any]:
        """The ``model`` config update that builds this adapter's module from the recipe's:
        the method, whether the head trained, and a ``config`` backbone's seed when the recipe
        leaves it open (the random weights the adapter was trained on)."""
        recipe_model = plain(recipe_model) or {}
        update: dict[str, Any] = {"method": self.method_config(recipe_model.get("method"))}
        if self.head_trained() is not None:
            update["train_head"] = self.head_trained()
        backbone = recipe_model.get("backbone") or {}
        seed = self.backbone.get("seed") if isinstance(self.backbone, dict) else None
        if backbone.get("config") is not None and backbone.get("seed") is None and seed is not None:
            update["backbone"] = {"seed": seed}
        return update

    def head_trained(self) -> bool | None:
        """Whether the adapter carries a trained task head (None: as the task decides)."""
        if self.kind == "peft":
            return bool(self.peft_config.get("modules_to_save")) or None
        return self.train_head

    # -- 2. the weights -------------------------------------------------------------------

    def load_into(self, module: Any) -> None:
        """Check ``module`` (built with :meth:`method_config`) and load the weights into it."""
        self._check_task(module)
        self._check_architecture(module)
        try:
            if self.kind == "checkpoint":
                module.load_state_dict({f"model.{k}": v for k, v in self.state.items()})
            elif module.method is None:
                load_trainable_parameters(module.model, self.state, "full fine-tuning")
            else:
                stored = self._stored(module)
                if self.kind == "peft" and not module.train_head:  # PEFT keeps a classification head in
                    stored = self._load_head(module, stored)  # every SEQ_CLS adapter: it is the one to use
                module.method.load_stored_state_dict(module.model, stored)
        except (KeyError, ValueError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise AdapterError(f"{self.label} does not fit the recipe's backbone {self._recipe_backbone(module)}: {message}") from err

    def _stored(self, module: Any) -> dict[str, torch.Tensor]:
        if self.kind == "fw":
            return self.state
        heads = module.head_names
        head = {k: v for k, v in self.state.items() if any(k.startswith(h + ".") for h in heads)}
        rest = {k: v for k, v in self.state.items() if k not in head}
        return {**module.method.from_peft_weights(module.model, rest), **head}

    @staticmethod
    def _load_head(module: Any, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy the head tensors of ``stored`` into ``module``'s (frozen) head; the rest."""
        head = {k: v for k, v in stored.items() if any(k.startswith(h + ".") for h in module.head_names)}
        for name, value in head.items():
            try:
                target = module.model.get_parameter(name)
            except AttributeError as err:
                raise KeyError(f"{name}: the model's head has no such parameter") from err
            if target.shape != value.shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)}, the model's is {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value)
        return {k: v for k, v in stored.items() if k not in head}

    @staticmethod
    def _recipe_backbone(module: Any) -> str:
        b = module.backbone
        return repr(b.name_or_path) if b.name_or_path is not None else f"config {architecture(module.model)}"

    def _check_task(self, module: Any) -> None:
        if self.kind == "peft":
            want = module.task.peft_task_type
            got = self.peft_config.get("task_type")
            if got and want and got != want:
                raise AdapterError(
                    f"{self.label} was trained for PEFT task_type {got} but the recipe's task is "
                    f"{type(module.task).__name__} ({want})"
                )
            return
        if self.task is None:
            return
        mine = to_config(module.task)
        theirs = self.task
        differ = [k for k in TASK_FIELDS if theirs.get("init_args", {}).get(k) != mine["init_args"].get(k)]
        if theirs.get("class_path") != mine["class_path"] or differ:
            raise AdapterError(
                f"{self.label} was trained for task {theirs.get('class_path')} {theirs.get('init_args')} but the "
                f"recipe's model.task is {mine['class_path']} {mine['init_args']} ({', '.join(differ) or 'class'} differ)"
            )

    def _check_architecture(self, module: Any) -> None:
        if not self.architecture:
            return
        mine = architecture(module.model)
        differ = sorted(k for k in self.architecture.keys() & mine.keys() if self.architecture[k] != mine[k])
        if differ:
            theirs = self.backbone
            if isinstance(theirs, dict):
                theirs = theirs.get("name_or_path") or "a config backbone"
            raise AdapterError(
                f"{self.label} was trained on {theirs!r} ({', '.join(f'{k}={self.architecture[k]}' for k in differ)}) "
                f"but the recipe's backbone {self._recipe_backbone(module)} has "
                f"{', '.join(f'{k}={mine[k]}' for k in differ)}"
            )


def updated(model_config: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A recipe's plain ``model`` section with :meth:`Adapter.model_update` applied."""
    backbone = {**(model_config.get("backbone") or {}), **update.get("backbone", {})}
    return {**model_config, **update, "backbone": backbone}


def read_adapter(path: str | Path) -> Adapter:
    """A checkpoint file, an fw adapter folder or a PEFT adapter folder."""
    path = Path(path)
    if path.is_file():
        return _read_checkpoint(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter folder or checkpoint file")
    if (path / fw_format.CONFIG_FILE).is_file():
        meta, state = fw_format.read_fw_adapter(path)
        return Adapter(path, "fw", state, method=meta.get("method"), task=meta.get("task"),
                       train_head=meta.get("train_head"), architecture=meta.get("architecture"),
                       backbone=meta.get("backbone"))
    if peft_format.is_peft_folder(path):
        config, state = peft_format.read_peft_adapter(path)
        return Adapter(path, "peft", state, backbone=config.get("base_model_name_or_path"), peft_config=config)
    raise AdapterError(
        f"{path}: neither an fw adapter ({fw_format.CONFIG_FILE}) nor a PEFT adapter ({peft_format.CONFIG_FILE})"
    )


def _read_checkpoint(path: Path) -> Adapter:
    if not zipfile.is_zipfile(path):
        raise AdapterError(f"{path}: not a readable checkpoint (not a file torch.save writes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise AdapterError(
            f"{path}: holds pickled objects beyond tensors and plain data; fw loads checkpoints with "
            "weights_only=True and never runs code from a file (fw's own checkpoints are plain data)"
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise AdapterError(f"{path}: not a readable checkpoint ({err})") from err
    info = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(info, dict) or "state_dict" not in checkpoint:
        raise AdapterError(f"{path}: not an fw checkpoint (no '{CHECKPOINT_KEY}' entry)")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    hparams = checkpoint.get("hyper_parameters") or {}
    return Adapter(path, "checkpoint", state, method=info.get("method"), task=info.get("task"),
                   train_head=hparams.get("train_head"), architecture=info.get("architecture"),
                   backbone=info.get("backbone"), hparams=hparams)

