"""What the PEFT literature compares: parameter counts, peak memory, timings.

Two parameter counts matter (see the seeds): what *trains* (e.g. prefix tuning's
reparameterization MLP) and what is *stored* after training (the flat prefix). Both are
given without the task head, as counts and as % of the backbone.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.targeting import head_module_names

if TYPE_CHECKING:  # pragma: no cover
    from framework.method import PeftMethod


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def numel(params: Any) -> int:
    """Number of entries; bitsandbytes 4-bit weights count their unpacked size."""
    total = 0
    for p in params:
        quant_state = getattr(p, "quant_state", None)
        total += int(torch.Size(quant_state.shape).numel()) if quant_state is not None else p.numel()
    return total


@dataclass
class ParamCounts:
    backbone_params: int  # the model before the method attached (head included)
    total_params: int  # the model as it runs now (backbone + what the method added)
    trainable_params: int  # everything that gets a gradient (method + head)
    method_params: int  # what the method adds or unfreezes, without the task head
    stored_params: int  # what a finished run stores for the method, without the task head
    head_params: int  # trainable task-head parameters

    def percent(self, key: str) -> float:
        return 100.0 * getattr(self, key) / max(self.backbone_params, 1)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        for key in ("trainable_params", "method_params", "stored_params"):
            out[key.replace("_params", "_percent")] = round(self.percent(key), 6)
        return out


def count_params(model: nn.Module, method: PeftMethod | None, backbone_params: int) -> ParamCounts:
    """Parameter counts of ``model`` with ``method`` attached (None: full fine-tuning)."""
    heads = head_module_names(model)
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    head = [p for n, p in trainable if _under(n, heads)]
    method_only = [p for n, p in trainable if not _under(n, heads)]
    if method is None:
        stored = numel(method_only)
    else:
        stored = numel(  # integer entries (a sparse mask's indices) locate parameters, they are not ones
            t for n, t in method.stored_state_dict(model).items() if not _under(n, heads) and t.is_floating_point()
        )
    return ParamCounts(
        backbone_params=backbone_params,
        total_params=numel(p for _, p in named),
        trainable_params=numel(p for _, p in trainable),
        method_params=numel(method_only),
        stored_params=stored,
        head_params=numel(head),
    )


def peak_memory_bytes(device: torch.device | None = None) -> tuple[int, str]:
    """Peak memory and what was measured: CUDA peak allocated, else the process's peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


def current_rss_bytes() -> int | None:
    """The process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
