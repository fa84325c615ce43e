"""The empirical Fisher information of a model's parameters, and its global top-k."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

Batch = dict[str, Any]


def _examples(batch: Batch) -> Iterable[Batch]:
    """Split a padded batch into single examples, each cut to its own tokens."""
    size = len(batch["input_ids"])
    mask = batch.get("attention_mask")
    for i in range(size):
        keep = mask[i].bool() if mask is not None else None
        example = {}
        for key, value in batch.items():
            if not torch.is_tensor(value):
                continue
            row = value[i : i + 1]
            if keep is not None and row.dim() == 2 and row.shape[1] == keep.shape[0]:
                row = row[:, keep]
            example[key] = row
        yield example


def empirical_fisher(
    params: dict[str, nn.Parameter],
    loss_fn: Callable[[Batch], torch.Tensor],
    batches: Iterable[Batch],
    num_samples: int,
    per_example: bool = True,
    device: torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over ``num_samples`` examples of the squared gradient of the loss, per entry.

    ``per_example=True`` is the empirical Fisher of Sung et al. (one backward per example,
    the true label's loss). ``per_example=False`` squares each *batch*-mean gradient instead
    (scaled by the batch size): one backward per batch, a cheaper approximation that
    under-weights directions where examples disagree.

    Returns the scores (fp32, shaped like each parameter) and the number of examples used.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    scores = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    seen = 0
    bar = tqdm(total=num_samples, desc="Fisher calibration", unit="ex", disable=not progress)
    for batch in batches:
        if device is not None:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        units = _examples(batch) if per_example else [batch]
        for unit in units:
            n = len(unit["input_ids"])
            n = min(n, num_samples - seen)
            if n < len(unit["input_ids"]):
                unit = {k: v[:n] for k, v in unit.items()}
            grads = torch.autograd.grad(loss_fn(unit), tensors, allow_unused=True)
            for score, grad in zip(scores, grads):
                if grad is not None:
                    score.add_(grad.float().square(), alpha=float(n) if not per_example else 1.0)
            seen += n
            bar.update(n)
            if seen >= num_samples:
                bar.close()
                return dict(zip(names, scores)), seen
    bar.close()
    return dict(zip(names, scores)), seen


def top_k_indices(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Flat indices of the ``k`` largest entries across all tensors (exactly k in total)."""
    total = sum(s.numel() for s in scores.values())
    if not 0 < k <= total:
        raise ValueError(f"top-k: k must be in [1, {total}], got {k}")
    flat = torch.cat([s.flatten() for s in scores.values()])
    chosen = torch.topk(flat, k, sorted=False).indices
    out: dict[str, torch.Tensor] = {}
    start = 0
    for name, score in scores.items():
        end = start + score.numel()
        inside = chosen[(chosen >= start) & (chosen < end)] - start
        if inside.numel():
            out[name] = torch.sort(inside).values
        start = end
    return out
