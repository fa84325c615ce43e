"""Train a fixed sparse set of a weight's entries, and only those.

:class:`SparseUpdate` is a ``torch.nn.utils.parametrize`` parametrization: the weight the
module sees is the frozen original with the masked entries replaced by a trainable vector
of exactly those entries. The optimizer only ever sees that vector, so weight decay and
momentum cannot touch the other entries, and optimizer state scales with k, not with the
backbone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class SparseUpdate(nn.Module):
    """``weight = original`` with ``original.flatten()[indices]`` replaced by ``values``."""

    def __init__(self, original: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("indices", indices.to(device=original.device, dtype=torch.long))
        self.values = nn.Parameter(original.detach().flatten()[self.indices].clone())
        # weight decay for the selected entries of matrices, not of biases and norms
        self.values.fw_weight_decay = original.dim() >= 2

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.flatten().index_put((self.indices,), self.values).view_as(original)


def owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_name, _, tensor_name = param_name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), tensor_name


def add_sparse_update(model: nn.Module, param_name: str, indices: torch.Tensor) -> SparseUpdate:
    module, tensor_name = owner(model, param_name)
    original = getattr(module, tensor_name)
    update = SparseUpdate(original, indices)
    parametrize.register_parametrization(module, tensor_name, update, unsafe=True)
    return update


def sparse_updates(model: nn.Module) -> dict[str, SparseUpdate]:
    """Parameter name (as in the plain model) -> its SparseUpdate."""
    found = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, SparseUpdate):
                        found[f"{module_name}.{tensor_name}" if module_name else tensor_name] = p
    return found


def remove_sparse_update(model: nn.Module, param_name: str, keep_values: bool) -> None:
    """Remove the parametrization; ``keep_values`` writes the trained entries into the weight."""
    module, tensor_name = owner(model, param_name)
    requires_grad = module.parametrizations[tensor_name].original.requires_grad
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=keep_values)
    getattr(module, tensor_name).requires_grad_(requires_grad)
