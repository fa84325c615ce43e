"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen weight W gets a trainable low-rank update; only A and B train::

         x ──────────────┬───────────────┐
                         │               │
                  ┌──────▼──────┐   ┌────▼────┐  A: r × in  (kaiming-uniform)
                  │ W (frozen)  │   │    A    │
                  │  out × in   │   └────┬────┘
                  └──────┬──────┘   ┌────▼────┐  B: out × r  (zeros, so ΔW = 0 at start)
                         │          │    B    │
                         │          └────┬────┘
                         │               │ × alpha / r   (alpha / sqrt(r) with rsLoRA)
                         └──────(+)◄─────┘
                                 │
                                 y = W x + (alpha / r) · B A x

Each adapted layer adds r · (in + out) parameters. After training, ``merge()`` folds
``(alpha / r) · B A`` into W, so inference costs exactly what the base model costs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.layers import WeightDType, weight_dtype
from framework.method import ExportNotSupportedError, MergeableLayers, PeftAdapter, PeftMethod
from framework.peft_compat import fw_targets, peft_targets, refuse_unknown_options
from framework.targeting import set_submodule, targets_or_roles
from framework.validation import positive, positive_int, probability
from fw_lora.layer import LoRALinear


class LoRA(MergeableLayers, PeftMethod):
    """Low-rank updates B·A on chosen Linear layers; mergeable into the base weights.

    Args:
        r: rank of the update (> 0).
        alpha: scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        targets: module name patterns (suffix, glob or ``re:`` regex, or ``all-linear``);
            None picks the architecture's query and value projections.
        dropout: dropout on the LoRA branch's input.
        rslora: rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski, 2023).
        dtype: dtype of A and B (``base``: the base weight's dtype).
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B trains at the learning
            rate × this ratio (> 0; the paper: ~16), A and everything else at the learning rate.
            None: one learning rate.

    LoRA+ groups as PEFT's ``create_loraplus_optimizer`` with ``loraplus_weight_decay`` equal to
    ``model.weight_decay``, with two differences: PEFT also gives every other 1-D trainable
    parameter (biases, norms; e.g. a classifier's bias) the ratio, fw only B (the head trains at
    the learning rate); and fw's LoRA wraps no embeddings, so PEFT's ``loraplus_lr_embedding``
    group has no counterpart.
    """

    description = "LoRA: trainable low-rank updates B·A on chosen Linear layers (mergeable)"
    peft_type = "LORA"
    #: the wrapper put around each target, and what merge() visits (hybrids substitute a
    #: subclass, e.g. a gated one)
    layer_type: type[LoRALinear] = LoRALinear

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        targets: list[str] | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: WeightDType = "float32",
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        positive_int(r, "r", "a positive integer rank")
        positive(alpha, "alpha")
        probability(dropout, "dropout")
        if loraplus_lr_ratio is not None:
            positive(loraplus_lr_ratio, "loraplus_lr_ratio")
        self.r = r
        self.alpha = alpha
        self.targets = targets
        self.dropout = dropout
        self.rslora = rslora
        self.dtype = dtype
        self.loraplus_lr_ratio = loraplus_lr_ratio

    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return targets_or_roles(model, self.targets, ["query", "value"], field="targets")

    def attach(self, model: nn.Module) -> None:
        for name, layer in self.target_modules(model):
            wrapped = self.layer_type(layer, self.r, self.alpha, self.dropout, self.rslora, self.adapter_dtype(layer))
            set_submodule(model, name, wrapped)
            self.on_wrapped(name, wrapped)

    def adapter_dtype(self, layer: nn.Module) -> torch.dtype:
        """The dtype of A and B beside ``layer`` (subclasses: another rule, e.g. QLoRA's compute dtype)."""
        return weight_dtype(self.dtype, layer.weight)

    def on_wrapped(self, name: str, wrapped: LoRALinear) -> None:
        """Called for every layer :meth:`attach` wrapped: records it (subclasses also configure it)."""
        added = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        self.record(name, f"LoRA r={self.r} (+{added:,})")

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """LoRA+: every B at ``lr × loraplus_lr_ratio``, the layers' other trainable parameters
        (A) at ``lr``; None without a ratio (one learning rate)."""
        if self.loraplus_lr_ratio is None:
            return None
        a, b = [], []
        for module_name in self.modified_modules:  # this method's layers only (compose may hold others)
            for name, p in model.get_submodule(module_name).named_parameters():
                if p.requires_grad:
                    (b if name == "lora_B" else a).append(p)
        return [{"params": a}, {"params": b, "lr": lr * self.loraplus_lr_ratio}]

    # -- Hugging Face PEFT's format --------------------------------------------------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        layers = {n: m for n in self.modified_modules if isinstance(m := model.get_submodule(n), LoRALinear)}
        plain = {n for n, m in layers.items() if type(m).forward is LoRALinear.forward}
        if plain != set(layers):
            raise ExportNotSupportedError(
                f"{type(self).__name__}'s layers ({type(next(iter(layers.values()))).__name__}) compute more than "
                "PEFT's LoRA does, so PEFT cannot load them"
            )
        conv1d = {m.fan_in_fan_out for m in layers.values()}
        if len(conv1d) > 1:
            raise ExportNotSupportedError(
                "LoRA targets both Linear and GPT-2 Conv1D modules; PEFT's fan_in_fan_out is one setting per adapter"
            )
        stored = self.stored_state_dict(model)
        weights: dict[str, torch.Tensor] = {}
        for name in layers:
            weights[f"{name}.lora_A.weight"] = stored[f"{name}.lora_A"]
            weights[f"{name}.lora_B.weight"] = stored[f"{name}.lora_B"]
        config = {
            "peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
            "use_rslora": self.rslora, "fan_in_fan_out": conv1d == {True},
            "target_modules": peft_targets(model, layers),
        }
        return PeftAdapter(config, weights)

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unknown_options(config, {"r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out", "target_modules"}, cls.__name__)
        return {
            "r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout") or 0.0), "rslora": bool(config.get("use_rslora", False)),
            "targets": fw_targets(config.get("target_modules"), "adapter_config.json: target_modules"),
        }

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key.removesuffix(".weight"): value for key, value in weights.items()}


__all__ = ["LoRA"]
