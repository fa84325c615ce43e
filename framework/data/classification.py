"""Text classification data: a text (or text pair) column and a label column."""

from __future__ import annotations

from typing import Any

import datasets
import torch

from framework.data.checks import Locate, check_labels, non_empty, require_columns
from framework.data.text import TextDataModule


class ClassificationData(TextDataModule):
    """Sequence-classification data (see :class:`TextDataModule` for sources and splits).

    Args:
        text_column: the text to classify.
        text_pair_column: an optional second text (e.g. a hypothesis for NLI).
        label_column: integer ids or class names; names are mapped to ids in sorted order
            unless the column is a ``ClassLabel`` (whose order is kept).
    """

    def __init__(
        self,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self._label_names: list[str] | None = None

    @property
    def label_names(self) -> list[str]:
        """Class names in id order (ids as strings when the data has bare integers)."""
        if self._label_names is None:
            raw = self.load_raw()
            feature = raw["train"].features.get(self.label_column)
            if isinstance(feature, datasets.ClassLabel):
                self._label_names = list(feature.names)
            else:
                values = sorted({v for split in raw.values() for v in split[self.label_column]})
                self._label_names = [str(v) for v in values]
                if all(isinstance(v, int) for v in values):
                    self._label_names = [str(i) for i in range(max(values) + 1)]
        return self._label_names

    def _label_ids(self, values: list[Any]) -> list[int]:
        if all(isinstance(v, int) for v in values):
            return values
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[str(v)] for v in values]

    def check_rows(self, data: datasets.Dataset, where: str, locate: Locate) -> None:
        require_columns(data, (self.text_column, self.text_pair_column, self.label_column), where,
                        "data.text_column / data.label_column")
        non_empty(data, self.text_column, "text", where, locate)
        check_labels(data, self.label_column, where, locate)

    def encode(self, split: str, data: datasets.Dataset) -> datasets.Dataset:
        require_columns(data, (self.text_column, self.text_pair_column, self.label_column), f"data: the {split} split",
                        "data.text_column / data.label_column")

        def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
            pair = batch[self.text_pair_column] if self.text_pair_column else None
            out = self.tokenizer(batch[self.text_column], pair, truncation=True, max_length=self.max_length)
            out["labels"] = self._label_ids(batch[self.label_column])
            out["text"] = batch[self.text_column]
            return out

        return self.tokenized(split, data, tokenize)

    def collate(self, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [row["text"] for row in rows]
        features = [{k: v for k, v in row.items() if k != "text"} for row in rows]
        batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
        batch["labels"] = torch.as_tensor(batch["labels"], dtype=torch.long)
        if split == "predict":
            batch["text"] = texts
        return batch
