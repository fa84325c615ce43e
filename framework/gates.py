"""Input-dependent gates on a method's contribution.

UniPELT's gate; it lives in the core because the gated parts belong to several plugins
(fw_adapters' ``attach_at(gate=True)``, fw_unipelt's gated LoRA and prefix).

Mao et al. 2022 switch each sub-module by ``gate = mean over the sequence of
sigmoid(Linear(x))``, one gate per example, with ``x`` the sub-module's input. The mean
covers real tokens only when the gate reads the model's forward context
(:mod:`framework.forward_context`: padding must not change a sequence's outputs); without it
every position.

A sequence mean sees the future, which a model trained for next-token prediction must not:
its position ``t`` would read tokens after ``t`` in training but not while generating. For
such models the gate pools causally instead: ``token`` gates each position by its own input
(``sigmoid(Linear(x_t))``), and ``first`` gates the whole example by its first real token.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from framework.forward_context import ForwardContext

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
        self.padding: ForwardContext | None = None  # set by whoever installs the gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.sigmoid(self.proj(x.to(self.proj.weight.dtype)))  # (batch, length, 1)
        if gates.dim() == 2:
            return gates.unsqueeze(1)
        if self.pooling == "token":
            return gates
        mask = self.padding.mask_for(x.shape[1], x.shape[0]) if self.padding is not None and x.dim() == 3 else None
        if self.pooling == "first":
            first = mask.argmax(dim=1) if mask is not None else torch.zeros(len(x), dtype=torch.long, device=x.device)
            return gates[torch.arange(len(x), device=x.device), first].unsqueeze(1)
        if mask is None:
            return gates.mean(dim=1, keepdim=True)
        weights = mask.to(gates.dtype).unsqueeze(-1)
        return (gates * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}"
