"""The IA³ layer: a frozen Linear (or GPT-2 Conv1D) whose output or input is rescaled by a
learned vector."""

from __future__ import annotations

import torch
from torch import nn

from framework.layers import WrappedLayer, linear_dims, weight_dtype


class IA3Linear(WrappedLayer):
    """``y = base(x) * l`` (``scale="output"``) or ``y = base(x * l)`` (``scale="input"``).

    ``l`` starts at ones, so the wrapped layer starts equal to the base. Merging multiplies
    the weight's rows (output scaling; the bias too) or columns (input scaling) by ``l``.
    """

    def __init__(self, base_layer: nn.Module, scale: str, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if scale not in ("output", "input"):
            raise ValueError(f"IA3Linear: scale must be 'output' or 'input', got {scale!r}")
        in_features, out_features, self.fan_in_fan_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.scale = scale
        size = out_features if scale == "output" else in_features
        weight = base_layer.weight
        dtype = dtype or weight_dtype("base", weight)
        self.ia3_l = nn.Parameter(torch.ones(size, device=weight.device, dtype=dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.scale == "input":
            return self.base_layer(x * self.ia3_l.to(x.dtype))
        out = self.base_layer(x)
        return out * self.ia3_l.to(out.dtype)

    def _factor(self) -> torch.Tensor:
        """``l`` shaped to broadcast over the weight in its own layout."""
        scale_rows = (self.scale == "output") != self.fan_in_fan_out  # Conv1D weights are (in, out)
        return self.ia3_l.float()[:, None] if scale_rows else self.ia3_l.float()[None, :]

    @torch.no_grad()
    def _rescale(self, power: int) -> None:
        weight = self.base_layer.weight
        factor = self._factor() ** power
        weight.copy_((weight.float() * factor).to(weight.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if self.scale == "output" and bias is not None:
            bias.copy_((bias.float() * self.ia3_l.float() ** power).to(bias.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._rescale(1)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            if torch.any(self.ia3_l == 0):
                raise ValueError("IA3: cannot unmerge a scaling vector with zero entries (the base weights are lost)")
            self._rescale(-1)
            self.merged = False

    def extra_repr(self) -> str:
        return f"scale={self.scale}, size={self.ia3_l.numel()}, merged={self.merged}"
