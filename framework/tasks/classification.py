"""Sequence classification: one label per text (or text pair); accuracy and macro-F1."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from framework.tasks.base import Task


class Classification(Task):
    """Sequence classification with a linear head on the backbone.

    Args:
        num_labels: number of classes; must cover every label in the data.
        label_names: optional class names, in label-id order (shown in predictions).
        pooling: what the head reads: ``cls``, the model's own (BERT: the first token through
            its pooler; decoders: the last token), or ``mean``, the masked mean of all tokens
            (for encoders; what sentence-embedding models such as MiniLM were trained with).
    """

    auto_class = "AutoModelForSequenceClassification"
    train_head_default = True
    peft_task_type = "SEQ_CLS"
    data_class = "ClassificationData"

    def __init__(
        self, num_labels: int = 2, label_names: list[str] | None = None, pooling: Literal["cls", "mean"] = "cls"
    ) -> None:
        if num_labels < 2:
            raise ValueError(f"model.task.num_labels: expected at least 2 classes, got {num_labels}")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(
                f"model.task.label_names: {len(label_names)} names given for num_labels={num_labels}"
            )
        if pooling not in ("cls", "mean"):
            raise ValueError(f"model.task.pooling: expected cls or mean, got {pooling!r}")
        self.num_labels = num_labels
        self.label_names = label_names
        self.pooling = pooling

    def configure_model(self, model: nn.Module) -> None:
        if self.pooling == "mean":
            from framework.tasks import pooling

            pooling.install(model)

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"num_labels": self.num_labels}
        if self.label_names:
            kwargs["id2label"] = dict(enumerate(self.label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(self.label_names)}
        return kwargs

    def metrics(self) -> MetricCollection:
        return MetricCollection(
            {
                "accuracy": MulticlassAccuracy(self.num_labels, average="micro"),
                "f1_macro": MulticlassF1Score(self.num_labels, average="macro"),
            }
        )

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
        return loss, logits

    def update_metrics(self, metrics: MetricCollection, batch: dict[str, torch.Tensor], outputs: Any) -> None:
        metrics.update(outputs.detach(), batch["labels"])

    def predict(self, model: nn.Module, batch: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        probs = model(**inputs).logits.float().softmax(-1)
        records = []
        for i, row in enumerate(probs.tolist()):
            pred = max(range(len(row)), key=row.__getitem__)
            record: dict[str, Any] = {"prediction": pred, "probabilities": [round(p, 6) for p in row]}
            if self.label_names:
                record["prediction_name"] = self.label_names[pred]
            if "labels" in batch:
                record["label"] = int(batch["labels"][i])
            records.append(record)
        return records
