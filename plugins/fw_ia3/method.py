"""IA³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638). Three learned vectors per layer rescale
activations element-wise; nothing else trains::

    attention:  K = (W_k x) ⊙ l_k        V = (W_v x) ⊙ l_v        (l_k, l_v: d_kv entries)
    feed-forward:  y = W_down ((act(W_up x)) ⊙ l_ff)                 (l_ff: d_ff entries)

The vectors start at ones (the model starts equal to the base). Per layer of BERT-base that
is 768 + 768 + 3072 = 4,608 parameters (55,296 for 12 layers). ``merge()`` folds each vector
into its weight: rows of W_k and W_v (and their biases), columns of W_down.

Defaults by architecture role: the key and value projections, and the feed-forward's down
(output) projection, whose *input* is the inner activation. (A bare ``output.dense`` on BERT
would also match ``attention.output.dense``; the role table uses a regex that does not.)
GPT-2 fuses q, k and v in ``c_attn``: there the whole fused output is scaled, as Hugging Face
PEFT does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.layers import WeightDType, weight_dtype
from framework.method import MergeableLayers, PeftAdapter, PeftMethod
from framework.peft_compat import fw_targets, peft_targets, refuse_unknown_options, without
from framework.targeting import set_submodule, targets_or_roles
from framework.validation import InvalidArgument
from fw_ia3.layer import IA3Linear


class IA3(MergeableLayers, PeftMethod):
    """IA³: learned vectors rescaling keys, values and feed-forward inner activations (mergeable).

    Args:
        targets: modules whose *output* is rescaled (None: the architecture's key and value).
        feedforward_targets: modules whose *input* is rescaled (None: the feed-forward's down
            projection). Both lists take name patterns (suffix, glob, ``re:`` regex).
        dtype: dtype of the vectors (``base``: the base weight's dtype).
    """

    description = "IA³: learned vectors rescaling keys, values and feed-forward activations (mergeable)"
    layer_type = IA3Linear
    peft_type = "IA3"

    def __init__(
        self,
        targets: list[str] | None = None,
        feedforward_targets: list[str] | None = None,
        dtype: WeightDType = "float32",
    ) -> None:
        if targets == [] and feedforward_targets == []:
            raise InvalidArgument("targets", "both target lists are empty; IA³ would train nothing")
        self.targets = targets
        self.feedforward_targets = feedforward_targets
        self.dtype = dtype

    def _find(self, model: nn.Module, given: list[str] | None, roles: list[str], field: str) -> list[tuple[str, nn.Module]]:
        return targets_or_roles(model, given, roles, field=field) if given != [] else []

    def attach(self, model: nn.Module) -> None:
        scaled_out = self._find(model, self.targets, ["key", "value"], "targets")
        scaled_in = self._find(model, self.feedforward_targets, ["ffn_down"], "feedforward_targets")
        both = {n for n, _ in scaled_out} & {n for n, _ in scaled_in}
        if both:
            raise InvalidArgument(
                "feedforward_targets", f"{sorted(both)[:3]} also match targets; a module is scaled "
                "either at its output (targets) or at its input (feedforward_targets)"
            )
        for scale, found in (("output", scaled_out), ("input", scaled_in)):
            for name, layer in found:
                wrapped = IA3Linear(layer, scale, weight_dtype(self.dtype, layer.weight))
                set_submodule(model, name, wrapped)
                self.record(name, f"IA³ {scale} scale (+{wrapped.ia3_l.numel():,})")

    # -- Hugging Face PEFT's format: ia3_l is (out, 1) for output scaling, (1, in) for input ----

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        layers = {n: m for n in self.modified_modules if isinstance(m := model.get_submodule(n), IA3Linear)}
        stored = self.stored_state_dict(model)
        weights = {}
        for name, layer in layers.items():
            vector = stored[f"{name}.ia3_l"]
            weights[f"{name}.ia3_l"] = vector[:, None] if layer.scale == "output" else vector[None, :]
        conv1d = {m.fan_in_fan_out for m in layers.values()}
        feedforward = [n for n, m in layers.items() if m.scale == "input"]
        config = {
            "peft_type": "IA3", "target_modules": peft_targets(model, layers),
            "feedforward_modules": peft_targets(model, feedforward) if feedforward else [],
            "fan_in_fan_out": conv1d == {True},
        }
        return PeftAdapter(config, weights)

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unknown_options(config, {"target_modules", "feedforward_modules", "fan_in_fan_out"}, cls.__name__)
        targets = fw_targets(config.get("target_modules"), "adapter_config.json: target_modules")
        feedforward = config.get("feedforward_modules") or []
        ff = fw_targets(feedforward, "adapter_config.json: feedforward_modules") if feedforward else []
        return {"targets": without(targets, ff), "feedforward_targets": ff}

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.flatten() for key, value in weights.items()}



__all__ = ["IA3"]
