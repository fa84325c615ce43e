"""Masked mean pooling for encoder classifiers whose head reads the first token.

BERT-family classification heads read the first position (``[CLS]``, through BERT's pooler
or RoBERTa's head). Sentence-embedding models such as all-MiniLM-L6-v2 were trained with
*mean* pooling, and their first token carries little of the sentence. :func:`install`
makes the first position of the encoder's output the masked mean of all tokens, so the
model's own head (and its pretrained pooler) read the mean instead; names and head stay
those of the transformers model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework import forward_context
from framework.forward_context import ForwardContext


class MeanPooling:
    """A hook on the encoder: its first position becomes the masked mean of its output, over
    the positions the forward context marks as real (virtual tokens included, padding not)."""

    def __init__(self, context: ForwardContext) -> None:
        self.context = context

    def pool(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        hidden = output[0]
        mask = self.context.mask_for(hidden.shape[1], hidden.shape[0])
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device)
        weights = mask.to(hidden.dtype)[..., None]
        mean = (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        pooled = torch.cat([mean, hidden[:, 1:]], dim=1)
        if isinstance(output, tuple):
            return (pooled, *output[1:])
        output["last_hidden_state"] = pooled
        return output


def install(model: nn.Module) -> None:
    """Make ``model``'s first-token head read the masked mean of the encoder's output."""
    base = getattr(model, "base_model", model)
    encoder = getattr(base, "encoder", None) or getattr(base, "transformer", None)
    if encoder is None or getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"model.task.pooling: mean pooling needs an encoder whose head reads the first token "
            f"(BERT/RoBERTa-family); {type(model).__name__} has none. Use pooling: cls"
        )
    encoder.register_forward_hook(MeanPooling(forward_context.install(model)).pool)
