"""FSDP2 helpers: shard a transformers model block by block, and move adapter weights between
full tensors (checkpoints) and per-rank shards (``DTensor``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: the longest ``ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"trainer.strategy (FSDP): found no ModuleList of layers in {type(model).__name__}")
    return list(max(lists, key=len))


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` every transformer block, then the root (embeddings, head, the method's
    top-level modules such as a prefix encoder). Methods that cannot be sharded (4-bit
    weights, scattered sparse updates) are refused before this, by ``supports_sharding``."""
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor; a sharded ``DTensor`` is gathered from every rank (a collective call)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors for ``model``'s parameters, turned into shards where those are sharded."""
    params = dict(model.named_parameters())
    out = {}
    for name, value in state.items():
        target = params.get(name)
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements)
        out[name] = value
    return out
