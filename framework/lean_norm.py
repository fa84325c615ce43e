"""RMS norms whose output a LoRA layer need not keep (``model.lean_norm``, on by default).

In a Llama-shaped block the attention's q/k/v projections read ``input_layernorm(x)`` and the
MLP's gate/up projections read ``post_attention_layernorm(x)``. A LoRA branch on them keeps
its input for backward (A's gradient is formed from it), so each norm's output, one
hidden-width tensor, is kept per norm, besides what the norm itself keeps: its input ``x``
(float32) and ``rsqrt(mean(x²) + eps)`` (one number per token). The output is
``weight * (x * rsqrt)``: the lean norm computes it with transformers' own operations
(bitwise the same) and marks it with that recipe (:mod:`framework.recompute`), so the LoRA
branches keep ``x`` and the ``rsqrt`` the norm keeps anyway and recompute the output in
backward (one elementwise product per branch): two hidden-width tensors per layer less.

Only modules whose ``forward`` is transformers' ``LlamaRMSNorm.forward`` (the same bytecode:
Mistral, Qwen, SmolLM, ... copy it) change; Gemma's ``1 + weight`` norm, T5's and
LayerNorm stay as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from framework.recompute import has_forward_of, mark, replace_forwards


def rms_scale(x: torch.Tensor, inverse_rms: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * (x * inverse_rms).to(dtype)``: the norm's output from what it keeps."""
    return weight * (x * inverse_rms).to(dtype)


def _lean_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    inverse_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    out = rms_scale(x, inverse_rms, self.weight, input_dtype)
    if x.requires_grad:  # pow and the product keep x and inverse_rms for their backward
        mark(out, functools.partial(rms_scale, dtype=input_dtype), x, inverse_rms, self.weight)
    return out


def _is_llama_rms_norm(module: nn.Module) -> bool:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return has_forward_of(module, LlamaRMSNorm.forward)


def lean_rms_norms(model: nn.Module) -> int:
    """Give every Llama-style RMS norm of ``model`` the lean forward; returns how many changed."""
    return replace_forwards(model, _is_llama_rms_norm, _lean_forward)
