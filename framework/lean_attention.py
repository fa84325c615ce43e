"""Grouped-query attention without copies of the keys and values (``model.lean_attention``).

A model with fewer key/value heads than query heads (Llama 3, SmolLM2, Mistral, Qwen: GQA)
runs transformers' ``sdpa`` attention; with an attention mask (any padded batch) transformers
repeats each key/value head for its group of query heads (``repeat_kv``) before calling
``scaled_dot_product_attention``, since CUDA's fused kernels cannot take grouped heads and
a mask together. Autograd then keeps the repeated copies for backward: SmolLM2-135M keeps
9 key and 9 value heads per layer where 3 of each carry the information.

PyTorch's CPU flash-attention kernel takes grouped heads with a mask (``enable_gqa``), so on
CPU, while training (gradients on), fw calls it with the 3 heads: two hidden-width
activations per layer become two thirds smaller, and the repeat's copies and their backward
sum are gone. The forward is bitwise the same; the key/value gradients are the same sums
in another order (relative differences about 3e-7 in float32, bfloat16's rounding, 7e-3, in
bfloat16). Everything else (CUDA, no mask, inference, generation) goes to transformers' own
``sdpa`` unchanged. Registered with transformers' ``AttentionInterface`` under :data:`NAME`
and selected per model with ``set_attn_implementation``, so other models keep theirs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: the attention implementation's name in transformers' registries
NAME = "fw_sdpa"


def grouped_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa_attention_forward``, except that a masked CPU training forward of
    grouped heads calls the kernel with ``enable_gqa`` instead of repeating the keys/values."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (
        attention_mask is None  # transformers uses enable_gqa itself then
        or query.device.type != "cpu"
        or not (torch.is_grad_enabled() and query.requires_grad)
        or getattr(module, "num_key_value_groups", 1) == 1
        or key.shape[1] * module.num_key_value_groups != query.shape[1]
        or any(kwargs.get(k) is not None and kwargs.get(k) is not False
               for k in ("position_bias", "softcap", "output_attentions", "is_causal"))
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def lean_grouped_attention(model: nn.Module) -> bool:
    """Switch ``model`` from ``sdpa`` to :data:`NAME` when it has grouped key/value heads;
    returns whether it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not any(
        getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules()
    ):
        return False
    _register()
    model.set_attn_implementation(NAME)
    return True
