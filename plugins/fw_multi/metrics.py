"""Validation and test metrics per named adapter (a Lightning callback)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.classification import MulticlassAccuracy

from fw_multi.layer import BASE


class AdapterMetrics(Callback):
    """Accuracy of each adapter's examples (``val/<adapter>/accuracy``, ``test/<adapter>/accuracy``),
    beside the run's metrics over all examples. The logits are the model's own outputs of the
    step (caught by a forward hook; no second forward pass); rows are grouped by the batch's
    routing column.

    Args:
        column: the routing column (the ``multi`` method's ``column``).
    """

    def __init__(self, column: str = "adapter") -> None:
        self.column = column
        self._logits: torch.Tensor | None = None
        self._metrics: dict[tuple[str, str], MulticlassAccuracy] = {}
        self._hooked = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hooked:
            return

        def keep(module: Any, args: Any, output: Any) -> None:
            logits = getattr(output, "logits", None)
            self._logits = logits.detach() if isinstance(logits, torch.Tensor) else None

        pl_module.model.register_forward_hook(keep)
        self._hooked = True

    def _update(self, stage: str, pl_module: LightningModule, batch: dict[str, Any]) -> None:
        routes, logits = batch.get(self.column), self._logits
        if routes is None or logits is None or "labels" not in batch or logits.dim() != 2:
            return
        if isinstance(routes, torch.Tensor):
            names = pl_module.method.names if hasattr(pl_module.method, "names") else []
            routes = [BASE if int(r) < 0 else names[int(r)] for r in routes.tolist()]
        labels = batch["labels"]
        for name in sorted(set(routes)):
            rows = torch.tensor([i for i, r in enumerate(routes) if r == name], device=logits.device)
            key = (stage, name)
            if key not in self._metrics:
                self._metrics[key] = MulticlassAccuracy(logits.shape[-1], average="micro").to(logits.device)
            self._metrics[key].update(logits[rows], labels[rows])

    def _log(self, stage: str, pl_module: LightningModule) -> None:
        for (where, name), metric in sorted(self._metrics.items()):
            if where == stage:
                pl_module.log(f"{stage}/{name}/accuracy", metric.compute())
                metric.reset()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update("val", pl_module, batch)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update("test", pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("val", pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log("test", pl_module)


__all__ = ["AdapterMetrics"]
