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

from typing import Literal

from torch import nn

from framework.architectures import role_patterns
from framework.backbone import DTYPES
from framework.method import MergeableLayers, PeftMethod
from framework.targeting import find_modules, set_submodule
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
    """

    description = "LoRA: trainable low-rank updates B·A on chosen Linear layers (mergeable)"
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
        dtype: Literal["float32", "bfloat16", "float16", "base"] = "float32",
    ) -> None:
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"model.method.init_args.r: expected a positive integer rank, got {r!r}")
        if alpha <= 0:
            raise ValueError(f"model.method.init_args.alpha: expected > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.method.init_args.dropout: expected a probability in [0, 1), got {dropout!r}")
        self.r = r
        self.alpha = alpha
        self.targets = targets
        self.dropout = dropout
        self.rslora = rslora
        self.dtype = dtype

    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        if self.targets is not None:
            return find_modules(model, self.targets, field="model.method.init_args.targets")
        patterns = role_patterns(model, ["query", "value"], field="model.method.init_args.targets")
        return find_modules(model, patterns, field="model.method.init_args.targets", require_each=False)

    def attach(self, model: nn.Module) -> None:
        dtype = None if self.dtype == "base" else DTYPES[self.dtype]
        for name, layer in self.target_modules(model):
            wrapped = self.layer_type(layer, self.r, self.alpha, self.dropout, self.rslora, dtype)
            set_submodule(model, name, wrapped)
            added = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
            self.record(name, f"LoRA r={self.r} (+{added:,})")


    @staticmethod
    def unload(model: nn.Module) -> nn.Module:
        """Merge, then put the plain base layers back: a model with no trace of LoRA."""
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                module.merge()
                set_submodule(model, name, module.base_layer)
        return model


__all__ = ["LoRA"]
