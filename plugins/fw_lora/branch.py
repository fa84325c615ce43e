"""The LoRA branch ``(dropout(x) @ Aᵀ) · scaling @ Bᵀ`` as one autograd Function that saves
only what its backward needs.

Written as plain ops, the branch makes autograd keep, per adapted layer, a dropped-out copy
of the layer's input (``dropout(x)``, for A's gradient) and the dropout mask (a full-size
noise tensor on CPU, a bool mask on CUDA) beside the small rank-r activations; with a
float32 A on a bfloat16 base also an upcast copy of ``x``. A frozen base layer does not keep
``x`` (``F.linear`` saves its input only for the weight's gradient), so on a Llama block
with all seven projections adapted those copies are about half again the block's own
saved activations.

:class:`LoRABranch` keeps ``x`` itself (the q/k/v and the gate/up projections read the same
tensor, so it is stored once), the rank-r ``h`` and the state the random generator had
before the mask was drawn. Its backward replays that state and draws the mask again:

- the forward calls ``F.dropout`` on the default generator of ``x``'s device exactly as
  ``nn.Dropout`` would, so the masks and the global random stream (what a training run
  consumes, what ``tests/test_resume.py``'s exact resume relies on) are the ones the plain
  layer had, bit for bit, on every device;
- the backward draws the same ``F.dropout(x)`` again inside ``torch.random.fork_rng`` with
  the saved state (what ``torch.utils.checkpoint`` does to replay dropout), so the
  backward mask is the forward mask and the global stream is left where it was.

The cost is one extra elementwise dropout of ``x`` per layer in backward, and the saved
generator state (16 bytes on CUDA; 5,056 bytes for the CPU Mersenne twister, per call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of ``device``'s default random generator (what ``F.dropout`` draws from)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


@contextmanager
def replayed_rng(device: torch.device, state: torch.Tensor) -> Iterator[None]:
    """Run the block with ``device``'s default generator at ``state``; afterwards every
    generator is where it was before (nothing of the global stream is consumed)."""
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        if device.type == "cpu":
            torch.set_rng_state(state)
        else:
            torch.get_device_module(device.type).set_rng_state(state, device)
        yield


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device_type``, and its dtype (the backward replays it)."""
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D (tokens, features) matrix, as ``F.linear``'s ``mm`` sees it."""
    return t.reshape(-1, t.shape[-1])


class LoRABranch(torch.autograd.Function):
    """``F.linear(F.linear(dropout(x).to(A.dtype), A) * scaling, B)``; saves ``x``, ``h`` and
    the generator state (A and B are parameters: no copy). Apply with :func:`lora_branch`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float
    ) -> torch.Tensor:
        ctx.scaling, ctx.p = scaling, p
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = rng_state(x.device) if p > 0 else None
        dropped = F.dropout(x, p, training=True) if p > 0 else x
        h = F.linear(dropped.to(lora_a.dtype), lora_a) * scaling
        ctx.save_for_backward(x, lora_a, lora_b, h)
        return F.linear(h, lora_b)

    @staticmethod
    @once_differentiable  # a second derivative (create_graph=True) raises instead of being wrong
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, lora_a, lora_b, h = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            grad_b = _rows(grad).t().mm(_rows(h)).to(lora_b.dtype) if need_b else None
            grad_h = torch.matmul(grad, lora_b) * ctx.scaling if need_a or need_x else None
            x_cast, to_grad_x = _input_and_its_vjp(ctx, x, lora_a.dtype, need_x)
            grad_a = _rows(grad_h).t().mm(_rows(x_cast)).to(lora_a.dtype) if need_a else None
            grad_x = to_grad_x(torch.matmul(grad_h, lora_a).to(x_cast.dtype)) if need_x else None
        return grad_x, grad_a, grad_b, None, None


def _input_and_its_vjp(
    ctx: Any, x: torch.Tensor, dtype: torch.dtype, need_x: bool
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``dropout(x).to(dtype)`` with the forward's mask (drawn again from the saved generator
    state), and the map from its gradient to ``x``'s (the same ops' backward, mask included)."""
    if ctx.p == 0:
        return x.to(dtype), lambda grad: grad.to(x.dtype)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(need_x)
        with replayed_rng(x.device, ctx.rng):
            x_cast = F.dropout(x_in, ctx.p, training=True).to(dtype)
    return x_cast.detach(), lambda grad: torch.autograd.grad(x_cast, x_in, grad)[0]


def lora_branch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """The LoRA update of ``x`` (dropout ``p`` on its input; 0 in eval mode), in the adapters'
    dtype (the autocast dtype under autocast), as :class:`LoRABranch` computes it."""
    return LoRABranch.apply(x, lora_a, lora_b, scaling, p)


def plain_lora_branch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """The same update as plain ops, autograd saving what they save (fw's branch before
    :class:`LoRABranch`): the reference ``tools/compare_step.py --plain-lora-branch`` measures."""
    dropped = F.dropout(x, p, training=True) if p > 0 else x
    return F.linear(F.linear(dropped.to(lora_a.dtype), lora_a) * scaling, lora_b)


__all__ = ["LoRABranch", "autocast_state", "lora_branch", "plain_lora_branch", "replayed_rng", "rng_state"]
