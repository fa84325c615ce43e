"""The optimizer a recipe picks (``model.optimizer``).

``adamw`` is torch's AdamW. The others are bitsandbytes' (Dettmers et al.):

- ``adamw_8bit``: AdamW with block-wise 8-bit optimizer states (~75 % less state memory);
- ``paged_adamw`` / ``paged_adamw_8bit``: the same, 32-bit or 8-bit, with the states in
  CUDA unified memory that is paged out to CPU RAM when the GPU runs short (the QLoRA
  paper's answer to memory spikes from long sequences).

Paging needs CUDA. When the parameters are not on a CUDA device, fw says so once and uses
the non-paged bitsandbytes optimizer with the same state format (so a checkpoint resumes
on either).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch

OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _devices(param_groups: Iterable[dict[str, Any]]) -> set[str]:
    return {p.device.type for group in param_groups for p in group["params"]}


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZERS`) over ``param_groups``.

    Each group carries its own ``weight_decay``; ``lr`` is the peak learning rate.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"model.optimizer: expected one of {list(OPTIMIZERS)}, got {name!r}")
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr)
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency of fw
        raise ImportError(f"model.optimizer: {name} needs bitsandbytes ({err}); use adamw") from err
    paged = name.startswith("paged_")
    eight_bit = name.endswith("_8bit")
    if paged:
        devices = _devices(param_groups)
        if devices and devices != {"cuda"}:
            fallback = "adamw_8bit" if eight_bit else "bitsandbytes' 32-bit AdamW"
            _warn_once(
                f"model.optimizer: {name} pages optimizer states through CUDA unified memory, which "
                f"needs the parameters on a CUDA device (they are on {', '.join(sorted(devices))}); "
                f"using the non-paged {fallback} instead"
            )
            paged = False
    classes = {
        (False, False): bnb.optim.AdamW,
        (False, True): bnb.optim.AdamW8bit,
        (True, False): bnb.optim.PagedAdamW,
        (True, True): bnb.optim.PagedAdamW8bit,
    }
    return classes[(paged, eight_bit)](param_groups, lr=lr)
