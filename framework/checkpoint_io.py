"""Checkpoint writes that a kill cannot corrupt.

Lightning writes a checkpoint through an fsspec transaction whose temporary file lives in
``$TMPDIR``; when that is another filesystem (a tmpfs ``/tmp``) the final move is a copy over
the target, and a kill during the copy leaves the previous ``last.ckpt`` truncated. fw writes
the new file beside the target (:mod:`framework.atomic_save`) and renames it over the target.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer

from framework.atomic_save import save_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing local files with :func:`save_atomically`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Plain data only, whatever the caller asks: fw's checkpoints hold no pickled objects."""
        return super().load_checkpoint(path, map_location=lambda storage, loc: storage, weights_only=True)


class SafeCheckpoints(Callback):
    """Puts :class:`AtomicCheckpointIO` in place of the strategy's default checkpoint IO."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
