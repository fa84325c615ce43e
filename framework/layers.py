"""What several method plugins need to know about the layers they wrap: a Linear-like module's
dimensions, the dtype a plugin's own weights take, and a base class for wrappers."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from framework.backbone import DTYPES

#: the dtype of a plugin's own weights: a fixed one, or ``base`` (the wrapped weight's dtype)
WeightDType = Literal["float32", "bfloat16", "float16", "base"]


def weight_dtype(name: str, base_weight: torch.Tensor) -> torch.dtype:
    """The dtype ``name`` stands for next to ``base_weight`` (``base``: its dtype, float32 if it
    is not floating point, e.g. 4-bit codes)."""
    if name != "base":
        return DTYPES[name]
    return base_weight.dtype if base_weight.is_floating_point() else torch.float32


def linear_dims(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of nn.Linear, bnb linears or GPT-2's Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if type(layer).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight is (in, out)
        return layer.weight.shape[0], layer.weight.shape[1], True
    raise TypeError(f"expected an nn.Linear or GPT-2 Conv1D module, got a {type(layer).__name__}")


class WrappedLayer(nn.Module):
    """A method's wrapper around a model's layer (``base_layer``) that still shows the layer's
    ``weight`` and ``bias``: models read them from the module they called (T5's feed-forward
    casts its input to ``wo.weight.dtype``), as Hugging Face PEFT's tuner layers allow."""

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)


class AdditiveUpdate(WrappedLayer):
    """A wrapper whose method adds ``delta_weight()`` to its base layer's weight (low-rank
    updates): merging adds the update to the base weight (in float32), unmerging subtracts it."""

    merged: bool

    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's layout, float32."""
        raise NotImplementedError

    @torch.no_grad()
    def _add(self, sign: int) -> None:
        weight = self.base_layer.weight
        weight.copy_((weight.float() + sign * self.delta_weight().to(weight.device)).to(weight.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._add(1)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add(-1)
            self.merged = False
