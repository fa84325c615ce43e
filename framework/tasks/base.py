"""The Task interface: the part of a run that depends on what is predicted."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection


class Task(ABC):
    """What the backbone is fine-tuned to do.

    A task picks the transformers auto class (which head the backbone gets), computes the
    loss, owns the metrics and turns outputs into predictions.
    """

    #: transformers auto class that builds the backbone with this task's head
    auto_class: str = ""
    #: whether the task head trains by default (a classifier does; a tied LM head does not)
    train_head_default: bool = True
    #: Hugging Face PEFT's task_type for this task (for ``fw export``)
    peft_task_type: str = ""
    #: the DataModule class (or a subclass of it) that feeds this task
    data_class: str = ""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra arguments for ``from_pretrained``/``from_config`` (e.g. ``num_labels``)."""
        return {}

    def configure_model(self, model: nn.Module) -> None:
        """Adjust the freshly built model for this task (before the method attaches)."""

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Receive the backbone's tokenizer before a stage runs (tasks that score generated
        text decode with it)."""

    def auto_model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)

    @abstractmethod
    def metrics(self) -> MetricCollection:
        """Fresh metrics for one stage (the module clones them per stage)."""

    @abstractmethod
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Forward pass: the loss and the model outputs."""

    @abstractmethod
    def update_metrics(self, metrics: MetricCollection, batch: dict[str, torch.Tensor], outputs: Any) -> None:
        """Feed one batch's outputs to the metrics."""

    @abstractmethod
    def predict(self, model: nn.Module, batch: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
        """One record per example (what ``fw predict`` writes)."""
