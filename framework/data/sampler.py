"""The training order as a function of (seed, epoch) alone, able to start part-way through an
epoch: what an exact resume needs.

A ``DataLoader(shuffle=True, generator=g)`` draws each epoch's order from a generator that
advances epoch after epoch, and always starts an epoch at its first batch; a run resumed from
a checkpoint therefore sees other batches than the run it continues. :class:`EpochSampler` is
torch's ``DistributedSampler`` (epoch ``e`` is ``randperm`` under ``seed + e``; rank ``r`` of
``w`` takes positions ``r, r + w, ...``), which Lightning keeps as it is under DDP and tells
the epoch (``set_epoch``), plus :meth:`skip`: the next epoch it serves begins that many
examples in. Epoch 0's order equals ``DataLoader(shuffle=True, generator=manual_seed(seed))``'s.

Given the examples' ``lengths`` (and the loader's ``batch_size``), it groups by length
instead, the "mega-batch" way (Hugging Face's ``LengthGroupedSampler``), for less padding:
the epoch's permutation (the same ``randperm``; file order without ``shuffle``) is cut into
mega-batches of ``MEGA_BATCHES`` global batches (``batch_size * world`` examples), each
mega-batch is sorted by length, longest first, and cut into global batches; their order is
shuffled with the same generator, the batch holding the longest example first (a run that
runs out of memory does so at its first step). Rank ``r`` takes the ``r``-th of the ``world``
consecutive slices of each global batch, so at every step the ranks' batches come from one
sorted run (they pad alike) and every rank has as many batches. The order is still a
function of (seed, epoch), read per rank, so :meth:`skip` resumes it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence, Sized

import torch
from torch.utils.data import DistributedSampler

#: global batches per mega-batch (the span sorted by length): HF Trainer's default
MEGA_BATCHES = 50


def padded(order: list[int], total: int) -> list[int]:
    """``order`` repeated from its start up to ``total`` positions (``DistributedSampler``'s
    padding, so every rank gets as many examples)."""
    if not order:
        return order
    return (order * math.ceil(total / len(order)))[:total]


def length_grouped_batches(
    order: list[int], lengths: Sequence[int], size: int, mega_batches: int, generator: torch.Generator | None
) -> list[list[int]]:
    """``order`` cut into batches of ``size`` examples of similar length.

    Mega-batches of ``size * mega_batches`` consecutive examples of ``order`` are sorted by
    length (longest first, stable) and cut into batches. The full batches are shuffled with
    ``generator`` (kept in order without one), the one holding the longest example is put
    first, and a final short batch (only the last mega-batch can leave one) stays last.
    """
    span = size * mega_batches
    run = [i for start in range(0, len(order), span)
           for i in sorted(order[start : start + span], key=lambda i: -lengths[i])]
    batches = [run[start : start + size] for start in range(0, len(run), size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < size else []
    if generator is not None and batches:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    if batches:
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
    return batches + tail


def rank_slice(batch: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of a global batch: the ``rank``-th of ``world`` consecutive slices."""
    share = len(batch) // world
    return batch[rank * share : (rank + 1) * share]


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` over ``dataset`` that can :meth:`skip` into its next epoch; with
    ``lengths`` (one per example) it forms batches of ``batch_size`` of similar length."""

    def __init__(
        self,
        dataset: Sized,
        shuffle: bool,
        seed: int,
        world_size: int = 1,
        rank: int = 0,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        mega_batches: int = MEGA_BATCHES,
    ) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"EpochSampler: {len(lengths)} lengths for {len(dataset)} examples")
        self.lengths = lengths
        self.batch_size = batch_size
        self.mega_batches = mega_batches
        self._skip = 0

    def skip(self, examples: int) -> None:
        """Leave out the first ``examples`` of this rank's next epoch (a resumed run's done part)."""
        self._skip = examples

    def grouped(self) -> list[int]:
        """This rank's examples for the epoch, in batches of similar length (see the module)."""
        assert self.lengths is not None
        n = len(self.dataset)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed + self.epoch) if self.shuffle else None
        order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
        size = self.batch_size * self.num_replicas
        batches = length_grouped_batches(padded(order, self.total_size), self.lengths, size, self.mega_batches, generator)
        return [i for batch in batches for i in rank_slice(batch, self.rank, self.num_replicas)]

    def __iter__(self) -> Iterator[int]:
        indices = self.grouped() if self.lengths is not None else list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])
