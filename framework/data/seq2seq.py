"""Source/target pairs for encoder-decoder fine-tuning (summaries, headlines, translation).

The source (with an optional ``source_prefix`` such as T5's ``"summarize: "``) is cut to
``max_source_length`` tokens, the target to ``max_target_length`` (both with the tokenizer's
own special tokens: T5 ends with ``</s>``, BART wraps in ``<s> ... </s>``). Batches are
padded to their longest source and target; padded target positions carry -100, so the loss
covers target tokens only. The decoder's inputs are the labels shifted right, made by the
model (``prepare_decoder_input_ids_from_labels``). Evaluation and ``fw predict`` batches
also carry the source and reference texts.

The default columns are ``prompt`` and ``response``: the packaged ``bbc_headlines`` corpus
(story opening -> headline) works as it is.
"""

from __future__ import annotations

from typing import Any

import datasets

from framework.data.checks import Locate, non_empty, require_columns
from framework.data.text import TextDataModule, right_pad

COLUMNS_FIELD = "data.source_column / data.target_column"


class Seq2SeqData(TextDataModule):
    """Encoder-decoder data (see :class:`TextDataModule` for sources and splits).

    Args:
        source_column: what the encoder reads.
        target_column: what the decoder learns to write.
        source_prefix: text put before every source (T5-style task prefix), e.g. ``"summarize: "``.
        max_source_length: source tokens kept (longer sources are cut).
        max_target_length: target tokens kept.
    """

    def __init__(
        self,
        source_column: str = "prompt",
        target_column: str = "response",
        source_prefix: str = "",
        max_source_length: int = 256,
        max_target_length: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_source_length, **kwargs)
        for name, value in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ValueError(f"data.{name}: expected an integer >= 2, got {value!r}")
        self.source_column = source_column
        self.target_column = target_column
        self.source_prefix = source_prefix
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length

    def check_rows(self, data: datasets.Dataset, where: str, locate: Locate) -> None:
        require_columns(data, (self.source_column, self.target_column), where, COLUMNS_FIELD)
        non_empty(data, self.source_column, "source", where, locate)
        non_empty(data, self.target_column, "target", where, locate)

    def encode(self, split: str, data: datasets.Dataset) -> datasets.Dataset:
        require_columns(data, (self.source_column, self.target_column), f"data: the {split} split", COLUMNS_FIELD)
        tok = self.tokenizer

        def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
            sources = [self.source_prefix + s for s in batch[self.source_column]]
            encoded = tok(sources, max_length=self.max_source_length, truncation=True)
            targets = tok(text_target=batch[self.target_column], max_length=self.max_target_length, truncation=True)
            return {"input_ids": encoded["input_ids"], "labels": targets["input_ids"],
                    "source": list(batch[self.source_column]), "reference": list(batch[self.target_column])}

        return self.tokenized(split, data, tokenize)

    def collate(self, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = right_pad([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
        mask = right_pad([[1] * len(r["input_ids"]) for r in rows], 0)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                 "labels": right_pad([r["labels"] for r in rows], -100)}
        if split != "train":  # evaluation scores generated text; predict writes both texts
            batch["reference"] = [r["reference"] for r in rows]
            batch["source"] = [r["source"] for r in rows]
        return batch
