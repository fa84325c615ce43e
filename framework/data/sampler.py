"""The training order as a function of (seed, epoch) alone, able to start part-way through an
epoch: what an exact resume needs.

A ``DataLoader(shuffle=True, generator=g)`` draws each epoch's order from a generator that
advances epoch after epoch, and always starts an epoch at its first batch; a run resumed from
a checkpoint therefore sees other batches than the run it continues. :class:`EpochSampler` is
torch's ``DistributedSampler`` (epoch ``e`` is ``randperm`` under ``seed + e``; rank ``r`` of
``w`` takes positions ``r, r + w, ...``), which Lightning keeps as it is under DDP and tells
the epoch (``set_epoch``), plus :meth:`skip`: the next epoch it serves begins that many
examples in. Epoch 0's order equals ``DataLoader(shuffle=True, generator=manual_seed(seed))``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` over ``dataset`` that can :meth:`skip` into its next epoch."""

    def __init__(self, dataset: Sized, shuffle: bool, seed: int, world_size: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        self._skip = 0

    def skip(self, examples: int) -> None:
        """Leave out the first ``examples`` of this rank's next epoch (a resumed run's done part)."""
        self._skip = examples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])
