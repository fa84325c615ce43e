"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024, arXiv:2402.09353).

A frozen weight W is seen as a magnitude per output row times a direction. LoRA updates the
direction (V = W + s·B A); DoRA also trains the magnitude m, one value per output feature::

         x ───────────────┬──────────────────┐
                          │                  │
                   ┌──────▼──────┐      ┌────▼────┐  A: r × in  (kaiming-uniform)
                   │ W (frozen)  │      │    A    │
                   │  out × in   │      └────┬────┘
                   └──────┬──────┘      ┌────▼────┐  B: out × r  (zeros)
                          │             │    B    │
                          │             └────┬────┘
                          │                  │ × s = alpha / r   (alpha / sqrt(r) with rsLoRA)
                          └──────(+)◄────────┘
                                  │  W x + s·B A x
                                  ▼
                        × m / ‖W + s·B A‖   per output row; m trained (out), starts at that
                                  │         norm; the norm is a constant to autograd (§4.3)
                                  ▼
                                 (+ bias)  =  y

Each adapted layer adds r · (in + out) + out parameters: BERT-base with r=8 on query and
value, 12 × 2 × (8 · (768 + 768) + 768) = 313,344. The math is Hugging Face PEFT's
``LoraConfig(use_dora=True)`` for Linear (and GPT-2 Conv1D) layers, dropout included (see
:class:`fw_dora.layer.DoRALinear`); the PEFT form is a LoRA adapter with ``use_dora: true``
and ``<module>.lora_magnitude_vector`` tensors. ``merge()`` folds
``(m / ‖W + s·BA‖) ⊙ (W + s·BA)`` into W, so inference costs what the base model costs.
"""

from __future__ import annotations

from typing import Any

import torch
from fw_lora.method import LoRA
from torch import nn

from framework.layers import WeightDType
from framework.method import ExportNotSupportedError, PeftAdapter
from framework.peft_compat import fw_targets, refuse_unknown_options
from fw_dora.layer import DoRALinear

#: PEFT's name of the magnitude (``<module>.lora_magnitude_vector`` in a saved adapter) and fw's
PEFT_MAGNITUDE, MAGNITUDE = "lora_magnitude_vector", "magnitude"


class DoRA(LoRA):
    """DoRA: LoRA on the direction of each weight row plus a trained magnitude per row (mergeable).

    Args:
        r: rank of the update (> 0).
        alpha: scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        targets: module name patterns (suffix, glob or ``re:`` regex, or ``all-linear``);
            None picks the architecture's query and value projections.
        dropout: dropout on the input of the DoRA correction (as PEFT: see ``DoRALinear``).
        rslora: rank-stabilized scaling alpha / sqrt(r).
        dtype: dtype of A, B and the magnitude (``base``: the base weight's dtype).
        loraplus_lr_ratio: LoRA+: B at the learning rate × this ratio, A and the magnitude at the
            learning rate (PEFT's ``create_loraplus_optimizer`` also gives 1-D parameters, the
            magnitude among them, the ratio). None: one learning rate.
    """

    description = "DoRA: LoRA on the weights' direction plus a trained magnitude per output row (mergeable)"
    layer_type: type[DoRALinear] = DoRALinear
    label = "DoRA"
    peft_layer = DoRALinear

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
        super().__init__(r=r, alpha=alpha, targets=targets, dropout=dropout, rslora=rslora, dtype=dtype,
                         loraplus_lr_ratio=loraplus_lr_ratio)

    # -- Hugging Face PEFT's format: LoRA with use_dora ------------------------------------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        """LoRA's PEFT form with ``use_dora`` and each layer's magnitude vector."""
        adapter = super().to_peft(model)
        stored = self.stored_state_dict(model)
        for name in self.modified_modules:
            adapter.weights[f"{name}.{PEFT_MAGNITUDE}"] = stored[f"{name}.{MAGNITUDE}"]
        adapter.config["use_dora"] = True
        return adapter

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        if config.get("use_dora") is not True:
            raise ExportNotSupportedError(
                f"adapter_config.json: a PEFT LORA adapter without use_dora: true is plain LoRA, which {cls.__name__} "
                "does not compute; read it with the lora method"
            )
        understood = {"use_dora", "r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out", "target_modules"}
        refuse_unknown_options(config, understood, cls.__name__)
        return {
            "r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout") or 0.0), "rslora": bool(config.get("use_rslora", False)),
            "targets": fw_targets(config.get("target_modules"), "adapter_config.json: target_modules"),
        }

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in weights.items():
            if key.endswith(f".{PEFT_MAGNITUDE}"):
                out[key.removesuffix(PEFT_MAGNITUDE) + MAGNITUDE] = value
            else:
                out[key.removesuffix(".weight")] = value
        return out


__all__ = ["DoRA"]
