"""One record of the model's current forward call, written by whoever changes the call and
read inside it (after AdapterHub's ``ForwardContext``).

Methods that prepend positions (prompt tuning and P-tuning put virtual tokens in front of the
hidden states; prefix tuning puts key/value positions in front through the cache) widen the
attention mask they pass on. Modules inside the model that pool over real tokens (mean
pooling, UniPELT's gates) need that widened mask, not the caller's. The context holds it:

- a forward pre-hook, registered first (``prepend=True``), records the caller's mask on
  every top-level call (PEFT's own prompt-learning wrapper calls the model again with the
  widened mask, so it is recorded there too);
- a method that widens the mask writes it with :meth:`ForwardContext.set_mask`;
- a reader takes :meth:`ForwardContext.mask_for` ``length``: the last ``length`` columns,
  which describe the ``length`` positions it sees (virtual tokens included; prefix positions,
  which live only in the cache, left out; on a decoding step, the new token).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

#: where the context lives on the top-level model
ATTRIBUTE = "fw_forward_context"


class ForwardContext:
    """The attention mask of the model's current forward call, as its layers see it."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def mask_for(self, length: int, batch: int) -> torch.Tensor | None:
        """The ``(batch, length)`` mask of the last ``length`` positions, or None if unknown."""
        mask = self.mask
        if mask is None or mask.shape[0] != batch:
            return None
        if mask.shape[1] < length:
            raise RuntimeError(
                f"forward context: the attention mask covers {mask.shape[1]} positions but a module sees {length}; "
                "a method prepended positions without widening the mask in the context (ForwardContext.set_mask)"
            )
        return mask[:, -length:]


def context_of(model: nn.Module) -> ForwardContext | None:
    return getattr(model, ATTRIBUTE, None)


def install(model: nn.Module) -> ForwardContext:
    """The model's context, created (with its recording pre-hook) on first use."""
    existing = context_of(model)
    if existing is not None:
        return existing
    context = ForwardContext()
    signature = inspect.signature(model.forward)

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        context.set_mask(mask)

    model.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    object.__setattr__(model, ATTRIBUTE, context)  # a plain attribute, not a submodule
    return context


def widened(model: nn.Module, mask: torch.Tensor) -> None:
    """A method that prepended positions says so: ``mask`` is what the layers see now."""
    context = context_of(model)
    if context is not None:
        context.set_mask(mask)
