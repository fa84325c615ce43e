"""The gated parts of UniPELT: each is the other plugin's own method with a learned gate
(:class:`fw_adapters.SequenceGate`) on its contribution.

- :class:`GatedLoRA`: LoRA's layer with ``y = W x + gate(x) · (alpha / r) · B A x``; one gate
  per adapted Linear, reading that Linear's input.
- :class:`GatedPrefixTuning`: prefix tuning whose layer-``l`` prefix keys and values are
  multiplied by a gate reading that layer's attention input (the query projection's input);
  on an encoder-decoder, one gate per prefixed attention block (encoder self-attention,
  decoder self- and cross-attention), reading that block's query input.
  Attach it before LoRA: its gates hook the query projections, which LoRA then wraps (the
  hook stays on the wrapped projection and still sees its input). The gate is computed
  when the prefix enters the cache: on the whole input in training
  and on the prompt when generating (later decoding steps reuse the gated prefix).
- :class:`GatedPfeiffer`: a Pfeiffer adapter with ``y + gate(y) · adapter(y)``.
"""

from __future__ import annotations

from typing import Any

import torch
from fw_adapters import Pfeiffer
from fw_lora import LoRA
from fw_lora.layer import LoRALinear
from fw_prefix import PrefixTuning
from fw_prefix.shapes import block_attention
from torch import nn

from framework.gates import SequenceGate
from framework.layers import linear_dims
from framework.method import MergeNotSupportedError
from framework.targeting import targets_or_roles
from framework.validation import InvalidArgument

#: where the prefix gates live in the model (parameters ``prefix_gates.<layer>.proj.*``)
PREFIX_GATES = "prefix_gates"


class GatedLoRALinear(LoRALinear):
    """A LoRA layer whose update is scaled by an input-dependent gate in (0, 1)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora, dtype)
        self.gate = SequenceGate(self.lora_A.shape[1], self.lora_A.device, self.lora_A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + (self.lora_update(x) * self.gate(x)).to(out.dtype)

    def merge(self) -> None:
        raise MergeNotSupportedError(
            "a gated LoRA update depends on the input (its gate reads the sequence), so it cannot be folded into W"
        )


class GatedLoRA(LoRA):
    """LoRA with UniPELT's gate on every adapted layer."""

    description = "LoRA with an input-dependent gate per layer (UniPELT's LoRA part)"
    layer_type = GatedLoRALinear

    def can_merge(self) -> bool:
        return False


class GatedPrefixTuning(PrefixTuning):
    """Prefix tuning with UniPELT's per-layer gate on the prefix keys and values."""

    description = "Prefix tuning with an input-dependent gate per layer (UniPELT's prefix part)"

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        encoder = self.prefix_encoder(model)
        queries = targets_or_roles(model, None, ["query"], field="")
        if encoder.layout is not None:
            queries = queries_per_block(queries, block_attention(model, encoder.layout))
        if len(queries) != encoder.shape.num_layers:
            raise InvalidArgument(
                "", f"UniPELT's prefix gates: found {len(queries)} query projections for {encoder.shape.num_layers} layers; "
                "the gate reads each layer's attention input there"
            )
        weight = encoder.embedding.weight
        gates = nn.ModuleList(SequenceGate(linear_dims(q)[0], weight.device, weight.dtype) for _, q in queries)
        model.add_module(PREFIX_GATES, gates)
        for layer, ((_, query), gate) in enumerate(zip(queries, gates)):
            query.register_forward_pre_hook(_PrefixGateHook(encoder.injector, layer, gate))
        added = sum(p.numel() for p in gates.parameters())
        self.record(PREFIX_GATES, f"prefix gates: {len(gates)} x Linear({linear_dims(queries[0][1])[0]} -> 1) (+{added:,})")


def queries_per_block(queries: list[tuple[str, nn.Module]], attention: list[str]) -> list[tuple[str, nn.Module]]:
    """The query projection inside each block's attention module (names in ``attention``)."""
    out = []
    for name in attention:
        inside = [(n, q) for n, q in queries if n.startswith(name + ".")]
        if len(inside) != 1:
            raise InvalidArgument("", f"UniPELT's prefix gates: found {len(inside)} query projections in {name}; the gate reads one")
        out += inside
    return out


class _PrefixGateHook:
    """Before block ``layer`` computes its query, scale its prefix in the cache by the gate."""

    def __init__(self, injector: Any, layer: int, gate: SequenceGate) -> None:
        self.injector, self.layer, self.gate = injector, layer, gate

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        slot = self.injector.prefix_slot(self.layer)
        if slot is None:
            return  # a later decoding step: the cache holds the prefix gated on the prompt
        gate = self.gate(args[0]).unsqueeze(1).to(slot.keys.dtype)  # (batch, 1, 1, 1)
        slot.keys, slot.values = slot.keys * gate, slot.values * gate


class GatedPfeiffer(Pfeiffer):
    """A Pfeiffer adapter (after the FFN) with UniPELT's gate on its output."""

    description = "Pfeiffer adapter with an input-dependent gate per layer (UniPELT's adapter part)"

    def attach(self, model: nn.Module) -> None:
        for placement in self.placements:
            self.attach_at(model, placement, gate=True)
