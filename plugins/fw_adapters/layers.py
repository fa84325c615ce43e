"""Bottleneck adapter modules: the bottleneck itself, and its serial and parallel placements."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from framework.gates import SequenceGate
from framework.layers import WrappedLayer
from framework.validation import InvalidArgument


class Bottleneck(nn.Module):
    """``up(act(down(x)))``: d -> bottleneck -> d_out. ``down`` keeps PyTorch's Linear init
    (kaiming-uniform, like LoRA's A: scaled to the input width); ``up`` starts at zero, so a
    fresh adapter contributes nothing and the adapted model starts equal to the base."""

    def __init__(self, d_in: int, bottleneck: int, d_out: int | None = None, non_linearity: str = "relu",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if non_linearity not in ACT2FN:
            raise InvalidArgument(
                "non_linearity", f"unknown '{non_linearity}'; choose one of "
                f"{', '.join(sorted(k for k in ACT2FN if k.isidentifier()))}"
            )
        self.down = nn.Linear(d_in, bottleneck, device=device, dtype=dtype)
        self.act = ACT2FN[non_linearity]
        self.up = nn.Linear(bottleneck, d_out or d_in, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.act(self.down(x.to(dtype))))


class _AdapterWrapper(WrappedLayer):
    """A sub-layer's output projection plus ``scaling · gate(x) · adapter(x)``."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, scaling: float,
                 gate: SequenceGate | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.scaling = scaling
        self.gate = gate

    def add_adapter(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = self.adapter(x)
        if self.gate is not None:
            delta = delta * self.gate(x)
        return out + (delta * self.scaling).to(out.dtype)


class SerialAdapter(_AdapterWrapper):
    """Wraps a sub-layer's output projection: ``y = base(x); y + scaling · gate · adapter(y)``
    (Houlsby et al. 2019: the adapter sits after the projection, before the residual)."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, scaling: float = 1.0,
                 gate: SequenceGate | None = None) -> None:
        super().__init__(base_layer, adapter, scaling, gate)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        return self.add_adapter(out, out)


class ParallelAdapter(_AdapterWrapper):
    """Wraps a sub-layer's output projection and adds ``scaling · adapter(sub-layer input)``
    (He et al. 2022). The sub-layer's input is captured by a forward pre-hook on the
    sub-layer's first projection (:meth:`capture_from`)."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck, scaling: float = 4.0,
                 gate: SequenceGate | None = None) -> None:
        super().__init__(base_layer, adapter, scaling, gate)
        self._input: torch.Tensor | None = None

    def capture_from(self, module: nn.Module) -> None:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._input = args[0]

        module.register_forward_pre_hook(hook)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        x, self._input = self._input, None
        if x is None:
            raise RuntimeError("ParallelAdapter: the sub-layer's input was not captured before its output projection ran")
        return self.add_adapter(out, x)
