"""Input-dependent gates on a method's contribution, and where they learn which tokens are padding.

UniPELT's gate; it lives in the core because the gated parts belong to several plugins
(fw_adapters' ``attach_at(gate=True)``, fw_unipelt's gated LoRA and prefix).

Mao et al. 2022 switch each sub-module by ``gate = mean over the sequence of
sigmoid(Linear(x))``, one gate per example, with ``x`` the sub-module's input. The mean
covers real tokens only when a :class:`PaddingMask` is attached to the model (padding
must not change a sequence's outputs); without one it covers every position.

A sequence mean sees the future, which a model trained for next-token prediction must not:
its position ``t`` would read tokens after ``t`` in training but not while generating. For
such models the gate pools causally instead: ``token`` gates each position by its own input
(``sigmoid(Linear(x_t))``), and ``first`` gates the whole example by its first real token.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn


class PaddingMask:
    """Keeps the attention mask of the model's current forward call, for the gates inside it.

    :meth:`install` registers a forward pre-hook on the top-level model. Methods that
    prepend positions (prefix, prompt tuning) widen the mask in front, and decoding steps
    see the whole history; the tokens a sub-module sees are always the mask's last columns.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def install(self, model: nn.Module) -> None:
        signature = inspect.signature(model.forward)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mask = kwargs.get("attention_mask")
            if mask is None and args:
                mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

        model.register_forward_pre_hook(hook, with_kwargs=True)

    def for_tokens(self, x: torch.Tensor) -> torch.Tensor | None:
        """The ``(batch, length)`` mask of ``x``'s positions, or None if unknown."""
        mask = self.mask
        if mask is None or x.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return None
        return mask[:, -x.shape[1]:]


Pooling = Literal["mean", "token", "first"]


class SequenceGate(nn.Module):
    """A gate in (0, 1) from ``sigmoid(Linear(x))``, pooled over the sequence ``x``:
    ``mean`` over real tokens (one gate per example, ``(batch, 1, 1)``), per ``token``
    (``(batch, length, 1)``), or the ``first`` real token's (``(batch, 1, 1)``)."""

    def __init__(self, d_in: int, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 pooling: Pooling = "mean") -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, 1, device=device, dtype=dtype)
        self.pooling = pooling
        self.padding: PaddingMask | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.proj(x.to(self.proj.weight.dtype)))  # (batch, length, 1)
        if gates.dim() == 2:
            return gates.unsqueeze(1)
        if self.pooling == "token":
            return gates
        mask = self.padding.for_tokens(x) if self.padding is not None else None
        if self.pooling == "first":
            first = mask.argmax(dim=1) if mask is not None else torch.zeros(len(x), dtype=torch.long, device=x.device)
            return gates[torch.arange(len(x), device=x.device), first].unsqueeze(1)
        if mask is None:
            return gates.mean(dim=1, keepdim=True)
        weights = mask.to(gates.dtype).unsqueeze(-1)
        return (gates * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}"
