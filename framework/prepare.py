"""What a method sees of the run when it prepares for training (:meth:`PeftMethod.prepare`).

A plugin gets this small context, not the LightningModule: the model, the tokenizer, a loss
function, the training batches, the device, whether the run resumes, and the world it runs
in. That keeps plugins off Lightning's internals (strategy classes, ``trainer.ckpt_path``)
and the core free to change them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class PrepareContext:
    """The run, as a method preparing for it needs it.

    Attributes:
        model: the transformers model with the method attached.
        tokenizer: a callable returning the backbone's tokenizer (loaded on first use).
        loss: the task's training loss of one batch (a dict of tensors) on ``model``.
        train_batches: a callable returning the training batches, the same on every rank
            (None when the recipe has no data).
        device: where the model trains.
        resuming: the run continues from a checkpoint (which restores what prepare would make).
        world_size: how many processes train together.
        broadcast: sends rank 0's object to every rank (the identity on one process).
        sharded: the model's weights are sharded over the ranks (FSDP).
        progress: this process may print progress (rank 0).
        total_steps: a callable returning the optimizer steps the run will take (Lightning's
            estimate from the epochs or ``max_steps``, the data and gradient accumulation; it
            loads the training data when called first); None outside a trainer.
    """

    model: nn.Module
    tokenizer: Callable[[], Any]
    loss: Callable[[dict[str, Any]], torch.Tensor]
    train_batches: Callable[[], Iterable[dict[str, Any]]] | None
    device: torch.device
    resuming: bool = False
    world_size: int = 1
    broadcast: Callable[[Any], Any] = lambda obj: obj
    sharded: bool = False
    progress: bool = True
    total_steps: Callable[[], int] | None = None


def unsharded_batches(datamodule: Any) -> Iterable[dict[str, Any]]:
    """The datamodule's training batches as one process sees them alone: under DDP its loader
    gives each rank a share, so a calibration that must be the same on every rank reads the
    examples in file order instead."""
    from torch.utils.data import DataLoader, DistributedSampler

    loader = datamodule.train_dataloader()
    if isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas > 1:
        loader = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
    return loader
