"""Hugging Face PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writing asks the method for its PEFT form (:meth:`PeftMethod.to_peft`), builds the config
through PEFT's own config class (so the fields are PEFT's, validated by PEFT) and adds what
the run knows: ``task_type``, ``base_model_name_or_path`` and the trained task head in
``modules_to_save``. Tensor names carry PEFT's prefixes: ``base_model.model.<module>...``
for injected methods, ``prompt_embeddings`` and ``base_model.<head>...`` for the
prompt-learning methods.

Reading accepts safetensors only: an ``adapter_model.bin`` is a pickle, and fw never
unpickles a file it did not write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from framework.formats.fw import AdapterFormatError
from framework.formats.merged import refuse_fw_only_forward
from framework.method import ExportNotSupportedError, PeftAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROMPT_LEARNING = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}
NOTES_FILE = "fw_export.json"


def prefix_of(peft_type: str) -> str:
    """What PEFT puts in front of a module name in its saved tensors."""
    return "base_model." if peft_type in PROMPT_LEARNING else "base_model.model."


def config_base(module: Any) -> str | None:
    """What PEFT should load as the base: the folder for local models, the hub id otherwise."""
    if module.backbone.name_or_path is None:
        return None
    source = module.backbone.resolve()
    return str(Path(source.path).resolve()) if source.kind != "hub" else source.path


def trained_heads(module: Any) -> list[str]:
    return [h for h in module.head_names if any(p.requires_grad for p in module.model.get_submodule(h).parameters())]


def to_peft(module: Any) -> PeftAdapter:
    """The module's method and trained head as one PEFT adapter (config + tensors, prefixed)."""
    if module.method is None:
        raise ExportNotSupportedError("full fine-tuning has no PEFT form; export it with --format merged (or fw)")
    refuse_fw_only_forward(module, "peft")
    adapter = module.method.to_peft(module.model)
    peft_type = str(adapter.config["peft_type"])
    prefix = prefix_of(peft_type)
    weights = {k if k == "prompt_embeddings" else prefix + k: v for k, v in adapter.weights.items()}
    heads = trained_heads(module)
    if module.task.peft_task_type == "SEQ_CLS":  # PEFT wraps and loads a classification head in
        heads = list(module.head_names)  # every such adapter: it must be there, trained or not
    for head in heads:  # as they are: the head's stored form is its parameters
        for name, value in module.model.get_submodule(head).named_parameters():
            weights[f"{prefix}{head}.{name}"] = value.detach()
    notes = list(adapter.notes)
    base = config_base(module)
    source = module.backbone.resolve() if module.backbone.name_or_path is not None else None
    if source is not None and source.gguf_file:
        notes.append(
            f"the base is a GGUF file: {type(module.model).__name__}.from_pretrained('{base}', "
            f"gguf_file='{source.gguf_file}', dtype=torch.{module.backbone.dtype if module.backbone.dtype != 'auto' else 'float32'})"
        )
    config = {
        **adapter.config,
        "task_type": module.task.peft_task_type or None,
        "base_model_name_or_path": base,
        "modules_to_save": heads or None,
        "inference_mode": True,
    }
    return PeftAdapter(config, weights, notes)


def write_peft_adapter(module: Any, directory: str | Path) -> Path:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    adapter = to_peft(module)
    fields = {k: v for k, v in adapter.config.items() if k != "peft_type"}
    config = PEFT_TYPE_TO_CONFIG_MAPPING[adapter.config["peft_type"]](**fields)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter.weights.items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if adapter.notes:
        (directory / NOTES_FILE).write_text(json.dumps({"notes": adapter.notes}, indent=2) + "\n")
    return directory


def is_peft_folder(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def read_peft_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json, tensors without PEFT's prefixes)``; head tensors keep their
    module names (``classifier.weight``), the prompt-learning tensor is ``prompt_embeddings``."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: cannot be read ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: no peft_type (not a PEFT adapter config)")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        if pickled:
            raise AdapterFormatError(
                f"{directory}: only {', '.join(pickled)} (a pickle, which can run code when loaded); fw reads "
                f"{WEIGHTS_FILE}. Convert it where you trust the file: PeftModel.from_pretrained(base, dir)"
                ".save_pretrained(new_dir, safe_serialization=True)"
            )
        raise AdapterFormatError(f"{directory}: {WEIGHTS_FILE} is missing")
    prefix = prefix_of(config["peft_type"])
    tensors = {}
    for key, value in load_file(str(weights)).items():
        name = key.removeprefix(prefix) if key.startswith(prefix) else key
        tensors[name] = value
    return config, tensors
