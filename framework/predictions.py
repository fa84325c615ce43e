"""``fw predict`` output: one JSON line per example in ``predictions.jsonl`` in the log dir."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Writes every prediction record; where labels are known, prints the accuracy they give."""

    def __init__(self, filename: str = "predictions.jsonl", show: int = 3) -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.show = show
        self.path: Path | None = None
        self.accuracy: float | None = None

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        records = [record for batch in predictions for record in batch]  # one predict dataloader
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.path = directory / (self.filename + suffix)
        with self.path.open("w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        labelled = [r for r in records if "label" in r and "prediction" in r]
        if labelled:
            self.accuracy = sum(r["label"] == r["prediction"] for r in labelled) / len(labelled)
        if trainer.is_global_zero:
            for record in records[: self.show]:
                print(json.dumps(record)[:300])
            line = f"{len(records)} predictions written to {self.path}"
            if self.accuracy is not None:
                line += f"; accuracy against the labels: {self.accuracy:.4f}"
            print(line)
