"""Hugging Face PEFT's tuner layers injected in place (``peft.inject_adapter_in_model``).

The reference side of fw's benchmarks: the same ``PeftModule`` loop trains them, so a
difference in step time or memory is the layers' own. Only the tuners PEFT can inject into
an existing model are here (LoRA, IA³); PEFT's prompt-learning methods wrap the model
instead (:mod:`fw_hfpeft.prompt_learning`).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from framework.architectures import role_patterns
from framework.method import PeftMethod


def _tuner_layers(model: nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


class _Injected(PeftMethod):
    """Common part: inject a PEFT config, record the layers, merge through PEFT."""

    def peft_config(self, model: nn.Module) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        try:
            from peft import inject_adapter_in_model
        except ImportError as e:
            raise ImportError(f"{type(self).__name__} needs Hugging Face PEFT: pip install peft") from e
        inject_adapter_in_model(self.peft_config(model), model)
        for name, layer in _tuner_layers(model):
            added = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            self.record(name, f"PEFT {type(layer).__name__} (+{added:,})")

    def merge(self, model: nn.Module) -> None:
        for _, layer in _tuner_layers(model):
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        for _, layer in _tuner_layers(model):
            layer.unmerge()


def _suffixes(model: nn.Module, roles: list[str]) -> list[str]:
    return role_patterns(model, roles, field="targets")


def peft_pattern(patterns: list[str]) -> list[str] | str:
    """fw target patterns (module-name suffixes, or ``re:`` regular expressions over the full
    name) in PEFT's terms: the suffix list as is, or one regular expression PEFT full-matches
    when any pattern is a regex (PEFT reads a list as suffixes only)."""
    if not any(p.startswith("re:") for p in patterns):
        return patterns
    return "|".join(f"(?:{p[3:]})" if p.startswith("re:") else rf"(?:.*\.)?{re.escape(p)}" for p in patterns)


class PeftLoRA(_Injected):
    """Hugging Face PEFT's LoRA layers (for comparison with fw's ``lora``).

    Args:
        r: rank.
        alpha: scale numerator (alpha / r).
        targets: module name suffixes (None: the architecture's query and value projections).
        dropout: dropout on the LoRA input.
    """

    description = "Hugging Face PEFT's LoRA layers, injected in place (benchmark reference)"

    def __init__(self, r: int = 8, alpha: float = 16.0, targets: list[str] | None = None, dropout: float = 0.0) -> None:
        self.r, self.alpha, self.targets, self.dropout = r, alpha, targets, dropout

    def peft_config(self, model: nn.Module) -> Any:
        from peft import LoraConfig

        targets = self.targets or _suffixes(model, ["query", "value"])
        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=peft_pattern(targets), lora_dropout=self.dropout)


class PeftIA3(_Injected):
    """Hugging Face PEFT's IA³ layers (for comparison with fw's ``ia3``): keys, values and the
    feed-forward down projection's input."""

    description = "Hugging Face PEFT's IA³ layers, injected in place (benchmark reference)"

    def __init__(self) -> None:
        pass

    def peft_config(self, model: nn.Module) -> Any:
        from peft import IA3Config

        kv, ffn = _suffixes(model, ["key", "value"]), _suffixes(model, ["ffn_down"])
        return IA3Config(target_modules=peft_pattern(kv + ffn), feedforward_modules=peft_pattern(ffn))
