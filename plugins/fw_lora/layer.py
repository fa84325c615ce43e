"""The LoRA layer: a frozen Linear (or GPT-2 Conv1D) plus a trainable low-rank update."""

from __future__ import annotations

import math

import torch
from torch import nn

from framework.layers import WrappedLayer, linear_dims, weight_dtype
from fw_lora.branch import lora_branch


class LoRALinear(WrappedLayer):
    """``y = base(x) + (dropout(x) @ A^T) * scaling @ B^T`` with A (r, in), B (out, r).

    A starts kaiming-uniform (a=sqrt(5)) and B at zero, so the wrapped layer starts equal to
    the base. The scaling multiplies the rank-r activations, the cheapest place for it.
    The branch is one autograd Function (:mod:`fw_lora.branch`) that keeps ``x``, the rank-r
    activations and the random generator's state for backward, not a dropped-out copy of ``x``
    and its mask; outputs, gradients and the random stream are the plain ops'.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_features, out_features, self.fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        device = base_layer.weight.device
        dtype = dtype or weight_dtype("base", base_layer.weight)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out + self.lora_update(x).to(out.dtype)

    @property
    def dropout_p(self) -> float:
        """The dropout probability the branch applies now (0 in eval mode or without dropout)."""
        dropout = self.lora_dropout
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """``(dropout(x) @ A^T) * scaling @ B^T`` in A and B's dtype (or the autocast dtype)."""
        return lora_branch(x, self.lora_A, self.lora_B, self.scaling, self.dropout_p)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout (transposed for Conv1D), in fp32."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
