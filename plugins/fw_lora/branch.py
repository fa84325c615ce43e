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
tensor, so it is stored once), the rank-r ``h`` and what gives back the dropout mask:

- on CPU, the mask as bits (1/32 of ``x``'s float32 bytes). The forward draws it with
  ``F.dropout``'s own steps there (``empty_like(x).bernoulli_(1 - p)``, divided by ``1 - p``,
  times ``x``), so outputs, masks and the global random stream are the plain layer's bit for
  bit; the backward unpacks it. Drawing a mask is the expensive part of dropout on CPU
  (a Mersenne-twister draw per element: 2.5 ms for 8 × 136 × 576), packing and unpacking
  cost a fifth of that each;
- elsewhere (CUDA's fused dropout draws from a counter-based generator, cheaply), the state
  the generator had before the mask was drawn: the forward calls ``F.dropout`` as
  ``nn.Dropout`` would, and the backward draws it again inside ``torch.random.fork_rng`` with
  that state (what ``torch.utils.checkpoint`` does to replay dropout), leaving the global
  stream where it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from framework.recompute import recompute_recipe


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
        ctx.rng, bits = None, None
        if p > 0 and x.device.type == "cpu":  # F.dropout's steps on CPU, keeping the mask as bits
            noise = torch.empty_like(x).bernoulli_(1 - p)
            bits = pack_bits(noise)
            dropped = noise.div_(1 - p).mul_(x)  # x * mask / (1 - p) in the mask's buffer
        elif p > 0:
            ctx.rng = rng_state(x.device)
            dropped = F.dropout(x, p, training=True)
        else:
            dropped = x
        h = F.linear(dropped.to(lora_a.dtype), lora_a) * scaling
        recipe = recompute_recipe(x)  # x made by a lean layer: keep what it keeps anyway
        ctx.recompute, inputs = recipe if recipe is not None else (None, (x,))
        ctx.save_for_backward(lora_a, lora_b, h, bits, *inputs)
        return F.linear(h, lora_b)

    @staticmethod
    @once_differentiable  # a second derivative (create_graph=True) raises instead of being wrong
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        lora_a, lora_b, h, bits, *inputs = ctx.saved_tensors
        x = ctx.recompute(*inputs) if ctx.recompute is not None else inputs[0]
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            grad_b = _rows(grad).t().mm(_rows(h)).to(lora_b.dtype) if need_b else None
            grad_h = torch.matmul(grad, lora_b) * ctx.scaling if need_a or need_x else None
            x_cast, to_grad_x = _input_and_its_vjp(ctx, x, bits, lora_a.dtype, need_x)
            grad_a = _rows(grad_h).t().mm(_rows(x_cast)).to(lora_a.dtype) if need_a else None
            grad_x = to_grad_x(torch.matmul(grad_h, lora_a).to(x_cast.dtype)) if need_x else None
        return grad_x, grad_a, grad_b, None, None


def _input_and_its_vjp(
    ctx: Any, x: torch.Tensor, bits: torch.Tensor | None, dtype: torch.dtype, need_x: bool
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``dropout(x).to(dtype)`` with the forward's mask (unpacked from ``bits``, or drawn again
    from the saved generator state), and the map from its gradient to ``x``'s (the same ops'
    backward, mask included)."""
    if ctx.p == 0:
        return x.to(dtype), lambda grad: grad.to(x.dtype)
    if bits is not None:
        noise = unpack_bits(bits, x.shape).to(x.dtype).div_(1 - ctx.p)
        return (x * noise).to(dtype), lambda grad: grad.to(x.dtype) * noise
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(need_x)
        with replayed_rng(x.device, ctx.rng):
            x_cast = F.dropout(x_in, ctx.p, training=True).to(dtype)
    return x_cast.detach(), lambda grad: torch.autograd.grad(x_cast, x_in, grad)[0]


#: the value of each bit in a byte of a packed mask
_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """The non-zero entries of ``mask`` as bits, 8 per byte (flat; zero-padded to a multiple of 8)."""
    flat = mask.reshape(-1) != 0
    flat = F.pad(flat, (0, -flat.numel() % 8)) if flat.numel() % 8 else flat
    return (flat.view(-1, 8).view(torch.uint8) * _BIT_VALUES.to(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool mask of ``shape`` that :func:`pack_bits` packed."""
    flat = ((bits[:, None] & _BIT_VALUES.to(bits.device)) != 0).reshape(-1)
    return flat[: shape.numel()].view(shape)


def lora_branch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """The LoRA update of ``x`` (dropout ``p`` on its input; 0 in eval mode), in the adapters'
    dtype (the autocast dtype under autocast), as :class:`LoRABranch` computes it."""
    return LoRABranch.apply(x, lora_a, lora_b, scaling, p)


def plain_lora_branch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
    """The same update as plain ops, autograd saving what they save (fw's branch before
    :class:`LoRABranch`): the reference ``tools/compare_step.py --plain-lora-branch`` measures."""
    dropped = F.dropout(x, p, training=True) if p > 0 else x
    return F.linear(F.linear(dropped.to(lora_a.dtype), lora_a) * scaling, lora_b)


__all__ = ["LoRABranch", "autocast_state", "lora_branch", "pack_bits", "plain_lora_branch", "replayed_rng", "rng_state",
           "unpack_bits"]
