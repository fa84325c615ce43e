"""Classification data whose rows also say which named adapter reads them."""

from __future__ import annotations

from typing import Any

import datasets

from framework.data.checks import Locate, require_columns
from framework.data.classification import ClassificationData


class RoutedClassificationData(ClassificationData):
    """:class:`ClassificationData` plus a routing column kept in every batch (a list of adapter
    names, or of indices): the ``multi`` method routes each example by it.

    Args:
        adapter_column: the column naming each row's adapter (``__base__``: the base model).
    """

    def __init__(self, adapter_column: str = "adapter", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adapter_column = adapter_column

    def check_rows(self, data: datasets.Dataset, where: str, locate: Locate) -> None:
        super().check_rows(data, where, locate)
        require_columns(data, (self.adapter_column,), where, "data.adapter_column")

    def encode(self, split: str, data: datasets.Dataset) -> datasets.Dataset:
        require_columns(data, (self.adapter_column,), f"data: the {split} split", "data.adapter_column")
        encoded = super().encode(split, data)
        return encoded.add_column(self.adapter_column, list(data[self.adapter_column]))

    def collate(self, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        routes = [row[self.adapter_column] for row in rows]
        batch = super().collate(split, [{k: v for k, v in row.items() if k != self.adapter_column} for row in rows])
        batch[self.adapter_column] = routes
        return batch



class MultiTaskData(RoutedClassificationData):
    """Several classification tasks in one run, one named adapter each: every task's rows are
    cut into splits on their own, its labels are moved into one shared label space (task after
    task: the first task's classes get ids 0..n-1, the next its own after them, named
    ``task:class``), and each row's routing column names its task.

    Args:
        tasks: adapter name -> a packaged corpus (``rotten_tomatoes``, ``bbc_news``, ...) or a
            local csv/tsv/json/jsonl/parquet file with ``text`` and ``label`` columns.
        group_columns: task -> the column its rows are grouped by when split (e.g.
            ``movie_name``: no movie in two splits).

    ``max_train_examples`` / ``max_eval_examples`` apply to each task. :attr:`head_classes`
    is each task's class ids (what ``multi``'s ``head_classes`` takes).
    """

    def __init__(self, tasks: dict[str, str], group_columns: dict[str, str] | None = None, **kwargs: Any) -> None:
        if not tasks:
            raise ValueError("data.tasks: expected at least one task (adapter name -> corpus or file)")
        if kwargs.get("dataset") is not None or kwargs.get("data_files") is not None:
            raise ValueError("data: MultiTaskData reads its tasks' data from `tasks`; leave dataset and data_files out")
        kwargs["dataset"] = "+".join(tasks)  # a label only: load_raw below reads the tasks
        super().__init__(**kwargs)
        unknown = sorted(set(group_columns or {}) - set(tasks))
        if unknown:
            raise ValueError(f"data.group_columns: no task named {unknown[0]!r}; tasks: {', '.join(tasks)}")
        self.tasks = dict(tasks)
        self.group_columns = dict(group_columns or {})
        self.head_classes: dict[str, list[int]] = {}

    @property
    def label_names(self) -> list[str]:
        """``task:class`` in label-id order (every task's classes, task after task)."""
        self.load_raw()
        assert self._label_names is not None
        return list(self._label_names)

    def _source(self, task: str, source: str) -> datasets.Dataset:
        from pathlib import Path

        from framework.data.packaged import PACKAGED
        from framework.data.text import FILE_FORMATS

        if source in PACKAGED:
            return PACKAGED[source]()["train"]
        path = Path(source)
        if not path.is_file() or path.suffix not in FILE_FORMATS:
            raise FileNotFoundError(
                f"data.tasks.{task}: '{source}' is neither a packaged corpus nor a data file ({sorted(FILE_FORMATS)})")
        kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        return datasets.load_dataset(FILE_FORMATS[path.suffix], data_files={"train": str(path)}, **kwargs)["train"]

    def load_raw(self) -> dict[str, datasets.Dataset]:
        from framework.data.text import grouped_split

        if self.raw is not None:
            return self.raw
        parts: dict[str, list[datasets.Dataset]] = {"train": [], "validation": [], "test": []}
        names: list[str] = []
        for task, source in self.tasks.items():
            data = self._source(task, source)
            require_columns(data, (self.text_column, self.label_column), f"data.tasks.{task}", "data.text_column / data.label_column")
            feature = data.features.get(self.label_column)
            own = list(feature.names) if isinstance(feature, datasets.ClassLabel) else sorted({str(v) for v in data[self.label_column]})
            index = {name: i for i, name in enumerate(own)}
            offset = len(names)
            self.head_classes[task] = list(range(offset, offset + len(own)))
            names += [f"{task}:{name}" for name in own]
            fractions = {"validation": self.validation_fraction, "test": self.test_fraction}
            for split, rows in grouped_split(data, fractions, self.group_columns.get(task), self.seed).items():
                rows = self._subsample(split, rows)
                labels = rows[self.label_column]
                ids = labels if isinstance(feature, datasets.ClassLabel) else [index[str(v)] for v in labels]
                parts[split].append(datasets.Dataset.from_dict({
                    self.text_column: rows[self.text_column], self.label_column: [offset + i for i in ids],
                    self.adapter_column: [task] * len(rows),
                }))
        self._label_names = names
        self.raw = {split: datasets.concatenate_datasets(p) for split, p in parts.items()}
        return self.raw


__all__ = ["MultiTaskData", "RoutedClassificationData"]
