"""The shared part of fw's DataModules: load, split, subsample, tokenize, batch.

Data comes from one of

- ``data_files``: local csv/tsv/json/jsonl/parquet files per split
  (``{train: a.csv, validation: b.csv, test: c.csv}``);
- ``dataset``: a packaged corpus (``rotten_tomatoes``, ``bbc_news``, ``bbc_headlines``; see
  :mod:`framework.data.packaged`), a local folder ``datasets`` can load, or a hub id.

Splits the source lacks are cut from ``train``: grouped by ``group_column`` when one is
named (no group straddles two splits, e.g. no movie's reviews leak into the test set), else
at random, with ``seed``. The tokenizer is the backbone's; the PeftModule hands it over.
"""

from __future__ import annotations

import uuid
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from framework.data.checks import Locate, check_file, locator, same_columns
from framework.data.packaged import PACKAGED
from framework.data.sampler import EpochSampler
from framework.errors import FieldError

SPLITS = ("train", "validation", "test")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def grouped_split(
    data: datasets.Dataset, fractions: dict[str, float], group_column: str | None, seed: int
) -> dict[str, datasets.Dataset]:
    """Cut ``data`` into splits holding about ``fractions`` of its rows, whole groups at a time.

    Groups (or single rows, without ``group_column``) are visited in a seeded random order;
    each fills the first split still short of its share, and ``train`` takes the rest.
    """
    if group_column is None:
        keys = np.arange(len(data))
    else:
        if group_column not in data.column_names:
            raise FieldError(f"data.group_column: no column '{group_column}'; columns: {data.column_names}")
        keys = np.asarray(data[group_column])
    groups, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    targets = {name: share * len(data) for name, share in fractions.items() if name != "train"}
    filled = dict.fromkeys(targets, 0)
    split_of_group = np.full(len(groups), "train", dtype=object)
    for group in np.random.default_rng(seed).permutation(len(groups)):
        for name, target in targets.items():
            if filled[name] < target:
                split_of_group[group] = name
                filled[name] += counts[group]
                break
    assignment = split_of_group[inverse]
    return {name: data.select(np.flatnonzero(assignment == name)) for name in ["train", *targets]}


def right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids into one (batch, longest) tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class TextDataModule(LightningDataModule):
    """Base DataModule for text tasks; subclasses say how an example is encoded.

    ``group_by_length``: form training batches of examples of similar token length (fewer pad
    tokens, faster steps): mega-batches of 50 batches of the epoch's shuffled order are sorted
    by length and cut into batches, whose order is shuffled (the longest first). The order
    still depends on (seed, epoch) alone, so runs resume exactly; under DDP every rank's batch
    at a step comes from the same sorted run. Validation and test batches are not regrouped.
    """

    def __init__(
        self,
        dataset: str | None = None,
        data_files: dict[str, str] | None = None,
        group_column: str | None = None,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.2,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        shuffle: bool = True,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        if (dataset is None) == (data_files is None):
            raise ValueError(
                "data: give exactly one of `dataset` (a packaged corpus: "
                f"{', '.join(PACKAGED)}; a local folder; or a hub id) or `data_files` (local files per split)"
            )
        if data_files is not None:
            unknown = sorted(set(data_files) - set(SPLITS))
            if unknown or "train" not in data_files and len(data_files) < len(SPLITS):
                raise ValueError(
                    f"data.data_files: keys must be among {list(SPLITS)} and include train "
                    f"(or all of validation/test); got {sorted(data_files)}"
                )
            for split, path in data_files.items():
                if not Path(path).is_file():
                    raise FileNotFoundError(f"data.data_files.{split}: missing data file '{path}'")
                if Path(path).suffix not in FILE_FORMATS:
                    raise ValueError(
                        f"data.data_files.{split}: '{path}' is not one of {sorted(FILE_FORMATS)}"
                    )
        for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"data.{name}: expected a fraction in [0, 1), got {value}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("max_length", max_length)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name}: expected >= 1, got {value}")
        for name, value in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name}: expected >= 1 or null, got {value}")
        if not isinstance(group_by_length, bool):
            raise ValueError(f"data.group_by_length: expected true or false, got {group_by_length!r}")
        self.dataset = dataset
        self.data_files = data_files
        self.group_column = group_column
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.tokenizer: Any = None  # set by the PeftModule (or by hand) before setup
        self.raw: dict[str, datasets.Dataset] | None = None
        self.encoded: dict[str, datasets.Dataset] | None = None

    # -- loading --------------------------------------------------------------------------

    def load_raw(self) -> dict[str, datasets.Dataset]:
        """The train/validation/test splits as raw rows (cut and subsampled, not tokenized)."""
        if self.raw is not None:
            return self.raw
        if self.data_files is not None:
            same_columns({split: check_file(path, f"data.data_files.{split}") for split, path in self.data_files.items()},
                         self.data_files)
            fmt = FILE_FORMATS[Path(next(iter(self.data_files.values()))).suffix]
            kwargs = {"delimiter": "\t"} if fmt == "csv" and any(p.endswith(".tsv") for p in self.data_files.values()) else {}
            source = datasets.load_dataset(fmt, data_files=dict(self.data_files), **kwargs)
            for split, path in self.data_files.items():
                self.check_rows(source[split], f"data.data_files.{split}: {path}", locator(path))
        elif self.dataset in PACKAGED:
            source = PACKAGED[self.dataset]()
        else:
            try:
                source = datasets.load_dataset(self.dataset)
            except Exception as err:
                raise FieldError(
                    f"data.dataset: '{self.dataset}' is not a packaged corpus ({', '.join(PACKAGED)}), "
                    f"and datasets could not load it as a folder or hub id: {err}"
                ) from err
        splits = {name: source[name] for name in SPLITS if name in source}
        if "validation" not in splits and "valid" in source:
            splits["validation"] = source["valid"]
        missing = [s for s in ("validation", "test") if s not in splits]
        if missing:
            if "train" not in splits:
                raise FieldError(f"data: the source has no train split to cut {missing} from")
            fractions = {"validation": self.validation_fraction, "test": self.test_fraction}
            cut = grouped_split(splits["train"], {s: fractions[s] for s in missing}, self.group_column, self.seed)
            splits.update(cut)
        splits = {k: self._subsample(k, v) for k, v in splits.items()}
        self.raw = splits
        return splits

    def _subsample(self, split: str, data: datasets.Dataset) -> datasets.Dataset:
        limit = self.max_train_examples if split == "train" else self.max_eval_examples
        if limit is not None and len(data) > limit:
            data = data.shuffle(seed=self.seed).select(range(limit))
        return data

    # -- encoding -------------------------------------------------------------------------

    def check_rows(self, data: datasets.Dataset, where: str, locate: Locate) -> None:
        """Check one loaded data file's columns and rows (``where``: the field and file;
        ``locate(i)``: row ``i`` as the user finds it). Subclasses check what they read."""

    @staticmethod
    def tokenized(split: str, data: datasets.Dataset, tokenize: Callable[[dict[str, list[Any]]], dict[str, Any]]) -> datasets.Dataset:
        """``data.map(tokenize)`` over batches, kept in memory and out of datasets' cache.

        datasets names a map's result by hashing ``tokenize`` with dill unless it is given a
        fingerprint, and a closure over a DataModule reaches its trainer and the whole model:
        that hash pickled (and printed) every weight, seconds and twice the model's size in
        memory for a large backbone. The result is never read back from a cache file, so a
        fresh fingerprint is correct.
        """
        return data.map(tokenize, batched=True, remove_columns=data.column_names, desc=f"tokenizing {split}",
                        keep_in_memory=True, load_from_cache_file=False, new_fingerprint=uuid.uuid4().hex)

    @abstractmethod
    def encode(self, split: str, data: datasets.Dataset) -> datasets.Dataset:
        """Tokenize one split (columns the collator turns into tensors)."""

    @abstractmethod
    def collate(self, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad a list of encoded rows into a batch."""

    def setup(self, stage: str | None = None) -> None:
        if self.encoded is not None:
            return
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError("data: no tokenizer; the PeftModule hands over the backbone's before setup")
        raw = self.load_raw()
        self.encoded = {split: self.encode(split, data) for split, data in raw.items()}

    # -- loaders --------------------------------------------------------------------------

    def _loader(self, split: str, batch_size: int, collate_split: str | None = None,
                sampler: EpochSampler | None = None) -> DataLoader:
        assert self.encoded is not None, "call setup() first"
        return DataLoader(
            self.encoded[split],
            batch_size=batch_size,
            sampler=sampler,
            # its own generator: starting an iterator (every epoch, every validation) would
            # otherwise draw from torch's global RNG, which dropout then sees shifted
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            collate_fn=lambda rows: self.collate(collate_split or split, rows),
        )

    def lengths(self, split: str) -> list[int]:
        """The token length of every encoded example of ``split`` (its ``input_ids``), read
        from the Arrow column without decoding the rows."""
        assert self.encoded is not None, "call setup() first"
        return pc.list_value_length(self.encoded[split].with_format("arrow")["input_ids"]).to_pylist()

    def train_dataloader(self) -> DataLoader:
        """Training batches in an order that depends on (seed, epoch) alone and can resume
        mid-epoch (:class:`EpochSampler`); under DDP rank r reads positions r, r + world, ...
        (Lightning keeps this sampler rather than shuffling with its own). With
        ``group_by_length`` a batch holds examples of similar length (less padding), and at
        each step the ranks' batches are cut from one sorted run."""
        assert self.encoded is not None, "call setup() first"
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        lengths = self.lengths("train") if self.group_by_length else None
        sampler = EpochSampler(self.encoded["train"], self.shuffle, self.seed, world, rank,
                               lengths=lengths, batch_size=self.batch_size)
        return self._loader("train", self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, collate_split="predict")

    def split_sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.load_raw().items()}
