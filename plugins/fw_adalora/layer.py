"""The AdaLoRA layer: a frozen Linear (or GPT-2 Conv1D) plus a trainable update in SVD form."""

from __future__ import annotations

import torch
from torch import nn

from framework.layers import AdditiveUpdate, linear_dims


class SVDLinear(AdditiveUpdate):
    """``y = base(x) + (dropout(x) @ (A ⊙ E)^T @ B^T) · alpha / (r + 1e-5)``.

    ``A`` (r × in: Q, the right singular vectors), ``E`` (r × 1: Λ, the singular values) and
    ``B`` (out × r: P, the left singular vectors), named as PEFT names them; ``r`` is the initial rank
    (``init_r``), which stays the divisor when ranks are pruned, as in Hugging Face PEFT's
    ``SVDLinear``. Pruned ranks are the zero entries of ``E`` (the rank allocator zeroes them);
    :attr:`rank_mask` records which ranks the last allocation kept.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / (float(r) + 1e-5)  # PEFT: scaling / (ranknum + 1e-5), ranknum = init_r
        device = base_layer.weight.device
        # drawn in PEFT's order (A, E, B and its ranknum from randn, then E zeros, A and B
        # normal(0, 0.02)), so one seed gives PEFT's initial weights
        a = torch.randn(r, self.in_features)
        e = torch.randn(r, 1)
        b = torch.randn(self.out_features, r)
        torch.randn(1)  # PEFT's ranknum, overwritten with r
        nn.init.zeros_(e)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_E = nn.Parameter(e.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=device), persistent=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        a = self.lora_A
        h = self.lora_dropout(x.to(a.dtype)) @ (a * self.lora_E).T @ self.lora_B.T
        return out + (h * self.scaling).to(out.dtype)

    @property
    def rank(self) -> int:
        """The ranks the last allocation kept (``init_r`` before any)."""
        return int(self.rank_mask.sum())

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the singular values of the pruned ranks (PEFT's ``mask_using_rank_pattern``)."""
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    def delta_weight(self) -> torch.Tensor:
        """``B (A ⊙ E) · alpha / (r + 1e-5)`` in float32, in the base weight's layout."""
        delta = self.lora_B.float() @ (self.lora_A.float() * self.lora_E.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"init_r={self.r}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"
