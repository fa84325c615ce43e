"""A merged model: the method folded into the weights, saved as a plain transformers folder
(``save_pretrained``: safetensors + config, and the tokenizer) that any runtime loads with
``AutoModelFor...from_pretrained`` and no fw installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framework.method import ExportNotSupportedError, MergeNotSupportedError


def refuse_fw_only_forward(module: Any, fmt: str) -> None:
    """Formats read by other libraries run the architecture's own forward: a task that changes
    it with hooks (mean pooling) would give other predictions there than in fw."""
    if getattr(module.task, "pooling", None) == "mean":
        raise ExportNotSupportedError(
            f"model.task.pooling: mean is fw's own hook (transformers' classifier reads the first token), so a "
            f"--format {fmt} folder would predict differently outside fw; export with --format fw, or train with "
            "pooling: cls"
        )


def write_merged(module: Any, directory: str | Path) -> Path:
    """Merge ``module``'s method into its model (in place: the module is spent afterwards)
    and save the model and tokenizer into ``directory``."""
    refuse_fw_only_forward(module, "merged")
    model = module.model
    if module.method is not None:
        try:
            model = module.method.unload(model)
        except MergeNotSupportedError as err:
            raise ExportNotSupportedError(f"{err}; export it with --format fw (or peft where PEFT has the method)") from err
    left = sorted(set(model.state_dict()) - module.base_state_keys)
    if left:  # a method whose unload leaves its modules in place: fw's bug, not the user's
        raise RuntimeError(f"{type(module.method).__name__}.unload left modules in the model: {left[:5]}")
    directory = Path(directory)
    model.save_pretrained(str(directory))
    if module.backbone.name_or_path is not None or module.backbone.tokenizer is not None:
        module.tokenizer.save_pretrained(str(directory))
    return directory
