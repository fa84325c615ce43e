"""Forward-argument helpers shared by the virtual-token methods (prompt tuning, P-tuning, prefix
tuning, in the fw_prompt and fw_prefix plugins).

These methods change what a transformers model is *called with*, not its layers. They do it
in a forward pre-hook on the top-level model, which sees exactly what the caller passes: a
task's training step (``model(input_ids=..., attention_mask=...)``) or every step of
``model.generate``. The helpers below turn the call into keyword arguments and build the
extended tensors without modifying the caller's tensors in place.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import torch
from torch import nn

from framework.validation import InvalidArgument


@cache
def _positional_names(cls: type) -> tuple[str, ...]:
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # drop self
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def forward_kwargs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call ``model(*args, **kwargs)`` as keyword arguments only (a new dict)."""
    out = dict(kwargs)
    if args:
        names = _positional_names(type(model))
        if len(args) > len(names):
            raise TypeError(f"{type(model).__name__}.forward takes at most {len(names)} positional arguments")
        for name, value in zip(names, args):
            if name in out:
                raise TypeError(f"{type(model).__name__}.forward got multiple values for argument '{name}'")
            out[name] = value
    return out


def cache_keyword(model: nn.Module, kwargs: dict[str, Any]) -> str:
    """The forward keyword of the key/value cache: the one the caller used, else ``cache``
    where the model takes it (transformers 5.24 renamed ``past_key_values`` to ``cache``),
    else ``past_key_values``."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return name
    for candidate in (model, getattr(model, "base_model", model)):
        if "cache" in inspect.signature(type(candidate).forward).parameters:
            return "cache"
    return "past_key_values"


def output_cache(output: Any) -> Any:
    """The key/value cache a forward call returned (``cache``, or ``past_key_values`` before 5.24)."""
    fields = getattr(output, "keys", lambda: ())()
    return output.get("cache") if "cache" in fields else getattr(output, "past_key_values", None)


def input_size(kwargs: dict[str, Any]) -> tuple[int, int, torch.device]:
    """(batch size, number of new positions, device) of a forward call."""
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    x = embeds if embeds is not None else ids
    if x is None:
        raise ValueError("virtual-token methods need input_ids or inputs_embeds in the forward call")
    return x.shape[0], x.shape[1], x.device


def prepend(tensor: torch.Tensor, count: int, value: float) -> torch.Tensor:
    """``count`` columns of ``value`` in front of a (batch, length) tensor."""
    if tensor.dim() != 2:
        raise ValueError(
            f"virtual-token methods extend 2-D (batch, length) masks and ids; got shape {tuple(tensor.shape)}"
        )
    pad = torch.full((tensor.shape[0], count), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def extend_positions(position_ids: torch.Tensor, shift: int, virtual: int) -> torch.Tensor:
    """Move ``position_ids`` (batch or 1, length) right by ``shift``; put ``virtual`` positions
    ``0..virtual-1`` in front (prompt tokens that are part of this call's input)."""
    if position_ids.dim() != 2:
        raise ValueError(f"virtual-token methods need 2-D position_ids; got shape {tuple(position_ids.shape)}")
    shifted = position_ids + shift
    if not virtual:
        return shifted
    front = torch.arange(virtual, dtype=position_ids.dtype, device=position_ids.device)
    return torch.cat([front.expand(position_ids.shape[0], virtual), shifted], dim=1)


def position_limit(model: nn.Module) -> int | None:
    """The length of the model's learned position table (BERT, GPT-2, ...), None for rotary or
    relative positions: past it, an absolute-position model fails with an index error."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    tables = (m for m in model.modules() if isinstance(m, nn.Embedding))
    return limit if any(t.num_embeddings == limit for t in tables) else None


def check_length(limit: int | None, added: int, length: int, argument: str) -> None:
    """The virtual positions (the method's ``argument``) and the input fit the position table."""
    if limit is not None and added + length > limit:
        raise InvalidArgument(
            argument, f"{added} virtual positions + {length} input tokens exceed the backbone's "
            f"{limit} positions; lower data.max_length to {limit - added} or fewer, or use fewer virtual tokens"
        )


def mark(cache: Any, attribute: str, value: int) -> None:
    """Note on a transformers ``Cache`` that it already holds this method's virtual positions."""
    if cache is not None:
        setattr(cache, attribute, value)


def seen_positions(cache: Any) -> int:
    """How many positions a transformers ``Cache`` holds (0 for None)."""
    return int(cache.get_seq_length()) if cache is not None else 0
