"""``fw export``: a trained adapter out of fw, in Hugging Face PEFT's format, as a merged
transformers model, or in fw's own format (see :mod:`framework.formats`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from framework.formats.fw import write_fw_adapter
from framework.formats.merged import write_merged
from framework.formats.peft import write_peft_adapter
from framework.formats.source import read_adapter, updated
from framework.method import ExportNotSupportedError

WRITERS = {"peft": write_peft_adapter, "merged": write_merged, "fw": write_fw_adapter}


def formats_for(module: Any) -> list[str]:
    """The formats ``module``'s method can be written in (for an error's hint)."""
    method = module.method
    out = ["fw"]
    if method is None or method.can_merge():
        out.insert(0, "merged")
    return out


def export(model_config: dict[str, Any], source: str, fmt: str, output: str | Path,
           overrides: list[str] | None = None) -> Path:
    """Build the recipe's module with ``source``'s weights (checkpoint or adapter folder) and
    write it as ``fmt`` into ``output``."""
    from framework.cli import build_module

    adapter = read_adapter(source)
    module = build_module(updated(model_config, adapter.model_update(model_config)), overrides)
    adapter.load_into(module)
    module.eval()
    try:
        return WRITERS[fmt](module, Path(output))
    except ExportNotSupportedError as err:
        if fmt != "peft" or "pooling" in str(err):
            raise
        raise ExportNotSupportedError(
            f"--format peft: {err}; {type(module.method).__name__} can be exported with --format "
            f"{' or '.join(formats_for(module))}"
        ) from err
