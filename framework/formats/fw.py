"""fw's adapter format: what a method stores after training, for every method, without pickle.

A folder with two files:

- ``adapter.safetensors``: the method's stored form (:meth:`PeftMethod.stored_state_dict`:
  LoRA's A and B, a flat prefix, P-tuning's encoder output, the Fisher mask's indices and
  values, ...) and the trained task head, named as in the model;
- ``adapter.json``: the format and its version, fw's version, the method
  (``class_path`` + ``init_args``), the task, whether the head trained, the backbone's
  identity and architecture (what the weights fit), and the parameter counts.

Full fine-tuning (no method) stores every trained parameter the same way.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from framework.atomic_save import write_atomically
from framework.config import to_config

FORMAT = "fw-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
#: config fields that decide whether stored weights fit a model
ARCHITECTURE_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "num_labels",
)


class AdapterError(ValueError):
    """An adapter (checkpoint or folder) that does not fit the recipe: one line for the user."""


class AdapterFormatError(AdapterError):
    """An adapter folder that fw cannot read (missing file, other format, newer version)."""


def fw_version() -> str:
    try:
        return importlib.metadata.version("fw")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def architecture(model: nn.Module) -> dict[str, Any]:
    """The fields of ``model``'s config that decide which weights fit it."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = {}
    for key in ARCHITECTURE_FIELDS:
        value = getattr(config, key, None) if key == "num_labels" else getattr(text, key, None)
        if isinstance(value, (int, str)):
            out[key] = value
    if not hasattr(model, "score") and not hasattr(model, "classifier"):
        out.pop("num_labels", None)  # a language model's config carries a meaningless default
    return out


def stored_state(module: Any) -> dict[str, torch.Tensor]:
    """The module's stored form as contiguous CPU tensors of their own (every rank must call
    this under FSDP: gathering shards is a collective)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.stored_state_dict().items()}


def metadata(module: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fw_version": fw_version(),
        "method": to_config(module.method),
        "task": to_config(module.task),
        "train_head": module.train_head,
        "backbone": module.backbone.identity(),
        "architecture": architecture(module.model),
        "param_counts": module.param_counts().as_dict(),
    }


def write_fw_adapter(module: Any, directory: str | Path, write: bool = True) -> Path:
    """Write ``module``'s adapter into ``directory`` (created; its two files replaced whole).
    Under a distributed strategy every rank calls this (the tensors and counts are gathered)
    and only the one with ``write`` writes."""
    directory = Path(directory)
    state, meta = stored_state(module), metadata(module)
    if not write:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_FILE, lambda f: f.write(save(state, metadata={"format": "pt"})))
    write_atomically(directory / CONFIG_FILE, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return directory


def read_fw_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter.json, tensors)`` of an fw adapter folder."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{directory}: no {CONFIG_FILE} (not an fw adapter folder)")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFormatError(f"{config_path}: not an fw adapter (format: {meta.get('format') if isinstance(meta, dict) else meta!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{config_path}: format_version {version!r}; this fw reads version {FORMAT_VERSION} and older "
            f"(written by fw {meta.get('fw_version')}: upgrade fw)"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFormatError(f"{directory}: {WEIGHTS_FILE} is missing")
    return meta, load_file(str(weights))
