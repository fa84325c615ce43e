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
        self.record_layers(model)

    def record_layers(self, model: nn.Module) -> None:
        """Record every PEFT tuner layer in ``model`` with the parameters it added."""
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
        loraplus_lr_ratio: LoRA+ through PEFT's ``create_loraplus_optimizer``: its learning rates
            per group (B and every other 1-D trainable parameter at the ratio); the core's
            weight-decay split applies inside them. None: one learning rate.
    """

    description = "Hugging Face PEFT's LoRA layers, injected in place (benchmark reference)"

    def __init__(self, r: int = 8, alpha: float = 16.0, targets: list[str] | None = None, dropout: float = 0.0,
                 loraplus_lr_ratio: float | None = None) -> None:
        self.r, self.alpha, self.targets, self.dropout = r, alpha, targets, dropout
        self.loraplus_lr_ratio = loraplus_lr_ratio

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        if self.loraplus_lr_ratio is None:
            return None
        import torch
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=lr, loraplus_lr_ratio=self.loraplus_lr_ratio)
        return [{"params": g["params"], "lr": g["lr"]} for g in optimizer.param_groups if g["params"]]

    def peft_config(self, model: nn.Module) -> Any:
        from peft import LoraConfig

        targets = self.targets or _suffixes(model, ["query", "value"])
        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=peft_pattern(targets), lora_dropout=self.dropout)


class PeftDoRA(PeftLoRA):
    """Hugging Face PEFT's LoRA layers with ``use_dora=True`` (for comparison with fw's ``dora``).

    Args:
        r: rank.
        alpha: scale numerator (alpha / r).
        targets: module name suffixes (None: the architecture's query and value projections).
        dropout: dropout on the DoRA input.
    """

    description = "Hugging Face PEFT's DoRA (LoRA layers with use_dora), injected in place (benchmark reference)"

    def __init__(self, r: int = 8, alpha: float = 16.0, targets: list[str] | None = None, dropout: float = 0.0) -> None:
        super().__init__(r=r, alpha=alpha, targets=targets, dropout=dropout)

    def peft_config(self, model: nn.Module) -> Any:
        from dataclasses import replace

        return replace(super().peft_config(model), use_dora=True)


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


class PeftAdaLoRA(_Injected):
    """Hugging Face PEFT's AdaLoRA (for comparison with fw's ``adalora``): PEFT's ``AdaLoraModel``
    injects its ``SVDLinear`` layers; its orthogonal regularization (PEFT adds it in
    ``AdaLoraModel.forward`` when the model returns a loss; fw's tasks compute the loss) is the
    ``loss_term``, and its ``update_and_allocate(step)`` runs after every optimizer step.

    Args: as fw's ``adalora`` (PEFT's ``AdaLoraConfig`` fields; ``alpha`` is ``lora_alpha``).
    """

    description = "Hugging Face PEFT's AdaLoRA, injected in place, allocated by PEFT (benchmark reference)"
    supports_sharding = False
    sharding_refusal = "PEFT's rank allocator needs whole gradients"

    def __init__(self, target_r: int = 8, init_r: int = 12, tinit: int = 0, tfinal: int = 0, deltaT: int = 1,  # noqa: N803
                 beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.5, total_step: int | None = None,
                 alpha: float = 8.0, dropout: float = 0.0, targets: list[str] | None = None) -> None:
        self.target_r, self.init_r, self.tinit, self.tfinal, self.deltaT = target_r, init_r, tinit, tfinal, deltaT
        self.beta1, self.beta2, self.orth_reg_weight, self.total_step = beta1, beta2, orth_reg_weight, total_step
        self.alpha, self.dropout, self.targets = alpha, dropout, targets

    def peft_config(self, model: nn.Module) -> Any:
        """PEFT's config; PEFT checks the schedule when it is made, so without ``total_step`` a
        placeholder stands until :meth:`prepare` reads the run's step count."""
        from peft import AdaLoraConfig

        total_step = self.total_step if self.total_step is not None else self.tinit + self.tfinal + 1

        targets = self.targets or _suffixes(model, ["query", "value"])
        return AdaLoraConfig(
            target_r=self.target_r, init_r=self.init_r, tinit=self.tinit, tfinal=self.tfinal, deltaT=self.deltaT,
            beta1=self.beta1, beta2=self.beta2, orth_reg_weight=self.orth_reg_weight, total_step=total_step,
            lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=peft_pattern(targets))

    def attach(self, model: nn.Module) -> None:
        from peft.tuners.adalora import AdaLoraModel

        tuner = AdaLoraModel(model, self.peft_config(model), "default")
        self.__dict__["_tuner"] = tuner  # PEFT's allocator and config; the layers are in ``model``
        self.record_layers(model)

    @property
    def tuner(self) -> Any:
        return self.__dict__["_tuner"]

    def prepare(self, context: Any) -> None:
        if self.total_step is None and context.total_steps is not None:
            self.tuner.peft_config["default"].total_step = int(context.total_steps())

    def loss_term(self, model: nn.Module) -> Any:
        """PEFT's own ``AdaLoraModel.forward`` run on a stand-in whose model returns a zero loss:
        what it adds to the loss is its orthogonal regularization."""
        from types import SimpleNamespace

        import torch

        tuner = self.tuner
        zero = SimpleNamespace(loss=torch.zeros((), device=next(model.parameters()).device))
        stand_in = SimpleNamespace(
            model=SimpleNamespace(forward=lambda: zero, named_parameters=model.named_parameters),
            peft_config=tuner.peft_config, trainable_adapter_name=tuner.trainable_adapter_name)
        return type(tuner).forward(stand_in).loss

    def on_after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.tuner.update_and_allocate(step)


class PeftVeRA(_Injected):
    """Hugging Face PEFT's VeRA layers (for comparison with fw's ``vera``): the same shared
    random matrices for the same ``projection_prng_key``.

    Args: as fw's ``vera`` (r, targets, dropout, d_initial, projection_prng_key).
    """

    description = "Hugging Face PEFT's VeRA layers, injected in place (benchmark reference)"

    def __init__(self, r: int = 256, targets: list[str] | None = None, dropout: float = 0.0, d_initial: float = 0.1,
                 projection_prng_key: int = 0) -> None:
        self.r, self.targets, self.dropout, self.d_initial = r, targets, dropout, d_initial
        self.projection_prng_key = projection_prng_key

    def peft_config(self, model: nn.Module) -> Any:
        from peft import VeraConfig

        targets = self.targets or _suffixes(model, ["query", "value"])
        return VeraConfig(r=self.r, target_modules=peft_pattern(targets), vera_dropout=self.dropout,
                          d_initial=self.d_initial, projection_prng_key=self.projection_prng_key)

    def attach(self, model: nn.Module) -> None:
        """Through PEFT's ``VeraModel`` (``inject_adapter_in_model`` refuses VeRA: the shared
        matrices live on the tuner); the layers hold the matrices, the wrapper is dropped."""
        from peft.tuners.vera import VeraModel

        VeraModel(model, self.peft_config(model), "default")
        self.record_layers(model)
