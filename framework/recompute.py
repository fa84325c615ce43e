"""Tensors that can be made again from tensors autograd keeps anyway.

A lean layer (:mod:`framework.lean_mlp`, :mod:`framework.lean_norm`) marks its output with a
recipe ``(function, inputs)``: ``function(*inputs)`` gives the output again, bit for bit, and
``inputs`` are tensors the layer's own backward keeps. A method's layer that would save that
output for its backward (fw's LoRA branch saves its input to form A's gradient) saves the
inputs instead, which costs nothing more, and recomputes the output in backward. A tensor
changed in place after it was marked has no recipe any more (its version counter moved).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

#: the attribute holding a tensor's recipe
RECOMPUTE = "fw_recompute"

Recipe = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


def mark(t: torch.Tensor, function: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """Record that ``function(*inputs)`` gives ``t`` (as it is now) again; returns ``t``."""
    setattr(t, RECOMPUTE, (function, inputs, t._version))
    return t


def recompute_recipe(t: torch.Tensor) -> Recipe | None:
    """``(function, inputs)`` giving ``t`` again from tensors autograd keeps anyway, when a
    lean layer made ``t`` and nothing changed it in place since; None otherwise."""
    marked = getattr(t, RECOMPUTE, None)
    if marked is None or marked[2] != t._version:
        return None
    return marked[0], marked[1]


def has_forward_of(module: torch.nn.Module, reference: Callable[..., Any]) -> bool:
    """Whether ``module``'s class runs ``reference``'s code (the same bytecode and names: one of
    the many transformers classes copied from it) and no hooks wrap its forward."""
    code = getattr(type(module).forward, "__code__", None)
    return (
        code is not None
        and code.co_code == reference.__code__.co_code
        and code.co_names == reference.__code__.co_names
        and not module._forward_hooks and not module._forward_pre_hooks
    )


def replace_forwards(
    model: torch.nn.Module, is_target: Callable[[torch.nn.Module], bool], forward: Callable[..., Any]
) -> int:
    """Give each module of ``model`` for which ``is_target`` holds the ``forward`` (bound to it);
    returns how many were changed (a module changed before is not changed again)."""
    changed = 0
    for module in model.modules():
        if "forward" not in module.__dict__ and is_target(module):
            module.forward = types.MethodType(forward, module)
            changed += 1
    return changed
