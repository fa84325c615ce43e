"""Bottleneck adapters: small trainable modules inserted into a frozen transformer.

Houlsby et al. 2019 (arXiv:1902.00751), Pfeiffer et al. 2021 (arXiv:2005.00247) and
He et al. 2022 (arXiv:2110.04366). A bottleneck maps hidden size d down to d / factor and
back; its up-projection starts at zero, so the adapted model starts equal to the base::

    serial (Houlsby: after attention and after the FFN; Pfeiffer: after the FFN only)

        x ──► sub-layer projection ──► y ──┬────────────────────► (+) ──► residual + LayerNorm
                                           └─► down ─► act ─► up ──┘

    parallel (He et al.: the FFN's input feeds the adapter; its output is scaled and added)

        x ──┬──► FFN ──────────────────────────────► (+) ──► residual + LayerNorm
            └──► down ─► act ─► up ──► × scaling ───┘        (scaling 4.0 by default)

Each adapter on hidden size d with bottleneck m adds d·m + m + m·d + d parameters: with
BERT-base (d = 768, factor 16, m = 48) that is 74,544 per adapter: 894,528 for Pfeiffer (one
per layer) and 1,789,056 for Houlsby (two per layer). Placement is by architecture role
(``attn_out``, ``ffn_down``; the parallel adapter's input is captured at ``ffn_up`` or
``query``), so the same plugin serves BERT-, GPT-2- and Llama-family models. The sub-layer
inputs/outputs are the projections' own, before the residual connection.

Adapters stay in the model at inference: ``merge()`` fails with a clear message.

Three registered configurations share this code: ``houlsby``, ``pfeiffer`` (serial) and
``parallel_adapter``.
"""

from __future__ import annotations

import re
from typing import Literal

from torch import nn

from framework.gates import SequenceGate
from framework.layers import WeightDType, linear_dims, weight_dtype
from framework.method import MergeNotSupportedError, PeftMethod
from framework.targeting import set_submodule, targets_or_roles
from framework.validation import InvalidArgument, optional_positive_int, positive
from fw_adapters.layers import Bottleneck, ParallelAdapter, SerialAdapter

Placement = Literal["attention", "ffn"]
#: where each placement reads its input (parallel) and where it adds its output
INPUT_ROLE = {"attention": "query", "ffn": "ffn_up"}
OUTPUT_ROLE = {"attention": "attn_out", "ffn": "ffn_down"}


def layer_prefix(name: str) -> str:
    """``bert.encoder.layer.3.output.dense`` -> ``bert.encoder.layer.3`` (the enclosing block)."""
    match = re.match(r"(.*\.\d+)\.", name)
    return match.group(1) if match else ""


def bottleneck_width(d: int, reduction_factor: float, bottleneck_size: int | None) -> int:
    return bottleneck_size or max(1, int(d // reduction_factor))


class BottleneckAdapter(PeftMethod):
    """Bottleneck adapters, serial or parallel, at chosen sub-layers (see the module docstring).

    Args:
        placements: sub-layers that get an adapter: ``attention`` and/or ``ffn``.
        parallel: parallel (reads the sub-layer's input) instead of serial (reads its output).
        reduction_factor: bottleneck = hidden / reduction_factor.
        bottleneck_size: an explicit bottleneck width (overrides reduction_factor).
        non_linearity: activation between the projections (transformers' ACT2FN names).
        scaling: multiplies the adapter's output (parallel adapters use 4.0).
        dtype: dtype of the adapter weights (``base``: the base weight's dtype).
    """

    description = "Bottleneck adapters (serial or parallel) after attention and/or the feed-forward block"

    def __init__(
        self,
        placements: list[Placement] = ["attention", "ffn"],  # noqa: B006 (read-only default)
        parallel: bool = False,
        reduction_factor: float = 16.0,
        bottleneck_size: int | None = None,
        non_linearity: str = "relu",
        scaling: float = 1.0,
        dtype: WeightDType = "float32",
    ) -> None:
        unknown = sorted(set(placements) - set(OUTPUT_ROLE))
        if not placements or unknown:
            raise InvalidArgument("placements", f"expected a non-empty subset of {list(OUTPUT_ROLE)}, got {placements}")
        positive(reduction_factor, "reduction_factor")
        optional_positive_int(bottleneck_size, "bottleneck_size")
        self.placements = list(placements)
        self.parallel = parallel
        self.reduction_factor = reduction_factor
        self.bottleneck_size = bottleneck_size
        self.non_linearity = non_linearity
        self.scaling = scaling
        self.dtype = dtype

    def _modules(self, model: nn.Module, role: str) -> list[tuple[str, nn.Module]]:
        return targets_or_roles(model, None, [role], field="placements")

    def attach(self, model: nn.Module) -> None:
        for placement in self.placements:
            self.attach_at(model, placement)

    def attach_at(self, model: nn.Module, placement: str, gate: bool = False) -> list[nn.Module]:
        """Insert adapters at one placement; returns the wrappers (hybrids reuse this, with
        ``gate=True`` for UniPELT's learned gate on the adapter's contribution)."""
        inputs = {}
        if self.parallel:
            for name, module in self._modules(model, INPUT_ROLE[placement]):
                inputs.setdefault(layer_prefix(name), module)
        wrappers = []
        for name, out_layer in self._modules(model, OUTPUT_ROLE[placement]):
            d_in_out, d_out, _ = linear_dims(out_layer)
            weight = out_layer.weight
            dtype = weight_dtype(self.dtype, weight)
            if self.parallel:
                source = inputs.get(layer_prefix(name))
                if source is None:
                    raise InvalidArgument(
                        "placements", f"found no {INPUT_ROLE[placement]} module in the block of "
                        f"'{name}' to read the parallel adapter's input from"
                    )
                d_in = linear_dims(source)[0]
                adapter = Bottleneck(d_in, bottleneck_width(d_in, self.reduction_factor, self.bottleneck_size),
                                     d_out, self.non_linearity, weight.device, dtype)
                wrapper = ParallelAdapter(out_layer, adapter, self.scaling,
                                          SequenceGate(d_in, weight.device, dtype) if gate else None)
                wrapper.capture_from(source)
            else:
                adapter = Bottleneck(d_out, bottleneck_width(d_out, self.reduction_factor, self.bottleneck_size),
                                     d_out, self.non_linearity, weight.device, dtype)
                wrapper = SerialAdapter(out_layer, adapter, self.scaling,
                                        SequenceGate(d_out, weight.device, dtype) if gate else None)
            set_submodule(model, name, wrapper)
            added = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
            kind = "parallel" if self.parallel else "serial"
            self.record(name, f"{kind} adapter {placement} {adapter.down.out_features}-wide (+{added:,})")
            wrappers.append(wrapper)
        return wrappers

    def can_merge(self) -> bool:
        return False

    def merge(self, model: nn.Module) -> None:
        raise MergeNotSupportedError(
            f"{type(self).__name__}: bottleneck adapters are non-linear (down → activation → up), so "
            "they cannot be folded into the base weights; they stay in the model at inference"
        )


class Houlsby(BottleneckAdapter):
    """Houlsby adapters: serial bottlenecks after attention and after the feed-forward block."""

    description = "Houlsby adapters: serial bottlenecks after attention and after the FFN (2 per layer)"

    def __init__(self, reduction_factor: float = 16.0, bottleneck_size: int | None = None,
                 non_linearity: str = "relu", scaling: float = 1.0,
                 dtype: WeightDType = "float32") -> None:
        super().__init__(["attention", "ffn"], False, reduction_factor, bottleneck_size, non_linearity, scaling, dtype)


class Pfeiffer(BottleneckAdapter):
    """Pfeiffer adapters: one serial bottleneck after the feed-forward block of each layer."""

    description = "Pfeiffer adapters: one serial bottleneck after the FFN of each layer"

    def __init__(self, reduction_factor: float = 16.0, bottleneck_size: int | None = None,
                 non_linearity: str = "relu", scaling: float = 1.0,
                 dtype: WeightDType = "float32") -> None:
        super().__init__(["ffn"], False, reduction_factor, bottleneck_size, non_linearity, scaling, dtype)


class Parallel(BottleneckAdapter):
    """Parallel adapters (He et al. 2022): the FFN's input feeds a bottleneck whose scaled output is added."""

    description = "Parallel adapters: a scaled bottleneck beside the FFN (He et al. 2022)"

    def __init__(self, placements: list[Placement] = ["ffn"], reduction_factor: float = 16.0,  # noqa: B006
                 bottleneck_size: int | None = None, non_linearity: str = "relu", scaling: float = 4.0,
                 dtype: WeightDType = "float32") -> None:
        super().__init__(placements, True, reduction_factor, bottleneck_size, non_linearity, scaling, dtype)
