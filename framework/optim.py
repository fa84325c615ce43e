"""The optimizer a recipe picks (``model.optimizer``).

``adamw`` is torch's AdamW. The others are bitsandbytes' (Dettmers et al.):

- ``adamw_8bit``: AdamW with block-wise 8-bit optimizer states (~75 % less state memory);
- ``paged_adamw`` / ``paged_adamw_8bit``: the same, 32-bit or 8-bit, with the states in
  CUDA unified memory that is paged out to CPU RAM when the GPU runs short (the QLoRA
  paper's answer to memory spikes from long sequences).

Paging needs CUDA. When the parameters are not on a CUDA device, fw says so once and uses
the non-paged bitsandbytes optimizer with the same state format (so a checkpoint resumes
on either).

:func:`param_groups` builds the groups: decay (matrices, or ``p.fw_weight_decay``) and
no-decay, inside every group a method asks for (:meth:`framework.method.PeftMethod.param_groups`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal, get_args

import torch
from torch import nn

OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


#: what a method's group may set besides ``params``
GROUP_OPTIONS = ("lr", "weight_decay")


def decays(p: torch.Tensor) -> bool:
    """Whether ``p`` takes weight decay: ``p.fw_weight_decay`` when a plugin set it, else matrices."""
    return bool(getattr(p, "fw_weight_decay", p.ndim >= 2))


def split_by_decay(params: list[torch.Tensor], weight_decay: float, **options: Any) -> list[dict[str, Any]]:
    """``params`` as a decay group (``weight_decay``) and a no-decay group, both with ``options``."""
    return [
        {"params": [p for p in params if decays(p)], "weight_decay": weight_decay, **options},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0, **options},
    ]


def param_groups(
    model: nn.Module,
    weight_decay: float,
    requested: list[dict[str, Any]] | None = None,
    owner: str = "the method",
    optional: Iterable[torch.Tensor] = (),
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups over ``model``'s trainable parameters.

    ``requested`` None: one decay and one no-decay group. Otherwise the groups a method asked
    for (``owner`` names it in errors), each split by decay unless it sets ``weight_decay``,
    then the default groups for the trainable parameters it did not list, which must all be
    in ``optional`` (the task head's parameters). Each trainable parameter is in
    exactly one group; a group's ``lr`` is absolute (the schedule scales every group's own).
    """
    trainable = {id(p): (name, p) for name, p in model.named_parameters() if p.requires_grad}
    if requested is None:
        return split_by_decay([p for _, p in trainable.values()], weight_decay)
    if not isinstance(requested, list):
        raise TypeError(f"{owner}.param_groups: expected a list of dicts or None, got {type(requested).__name__}")
    listed: dict[int, int] = {}  # id(parameter) -> the group listing it
    groups: list[dict[str, Any]] = []
    for index, group in enumerate(requested):
        params = _group_params(group, index, owner)
        for p in params:
            _claim(p, index, trainable, listed, owner)
        options = _group_options(group, index, owner)
        if "weight_decay" in options:
            groups.append({"params": params, **options})
        else:
            groups.extend(split_by_decay(params, weight_decay, **options))
    unlisted = [(name, p) for key, (name, p) in trainable.items() if key not in listed]
    spared = {id(p) for p in optional}
    missing = sorted(name for name, p in unlisted if id(p) not in spared)
    if missing:
        raise ValueError(
            f"{owner}.param_groups: every trainable parameter of the method must be in one group; "
            f"missing: {missing[:5]}{'...' if len(missing) > 5 else ''}"
        )
    groups.extend(split_by_decay([p for _, p in unlisted], weight_decay))
    return [g for g in groups if g["params"]] or split_by_decay([], weight_decay)


def _group_params(group: Any, index: int, owner: str) -> list[torch.Tensor]:
    """The parameters of a requested group (checked: a dict with ``params`` and known keys)."""
    if not isinstance(group, dict) or "params" not in group:
        raise TypeError(f"{owner}.param_groups: group {index} must be a dict with 'params', got {group!r:.80}")
    unknown = sorted(set(group) - {"params", *GROUP_OPTIONS})
    if unknown:
        raise ValueError(
            f"{owner}.param_groups: group {index} sets {unknown}; a group may set only {list(GROUP_OPTIONS)}"
        )
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    return params


def _claim(p: Any, index: int, trainable: dict[int, tuple[str, Any]], listed: dict[int, int], owner: str) -> None:
    """Record that group ``index`` holds ``p``: a trainable parameter of the model, listed once."""
    if id(p) not in trainable:
        what = f"a tensor of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else repr(p)[:80]
        raise ValueError(f"{owner}.param_groups: group {index} lists {what} that is not a trainable parameter of the model")
    if id(p) in listed:
        raise ValueError(
            f"{owner}.param_groups: '{trainable[id(p)][0]}' is listed twice (groups {listed[id(p)]} and {index})"
        )
    listed[id(p)] = index


def _group_options(group: dict[str, Any], index: int, owner: str) -> dict[str, float]:
    """A requested group's ``lr`` (> 0) and ``weight_decay`` (>= 0), where it sets them."""
    options = {key: group[key] for key in GROUP_OPTIONS if key in group}
    for key, value in options.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (value > 0 if key == "lr" else value >= 0):
            bound = "> 0" if key == "lr" else ">= 0"
            raise ValueError(f"{owner}.param_groups: group {index}'s {key} must be a number {bound}, got {value!r}")
    return {key: float(value) for key, value in options.items()}


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
