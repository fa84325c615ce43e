"""The architecture-specific part of prefix tuning: how wide each layer's keys and values are.

A prefix is ``P`` extra key and value vectors per attention layer, shaped like the layer's
own: ``(num_kv_heads, head_dim)`` per position. Grouped-query attention (Llama-family with
fewer key/value heads than query heads) and multi-query attention have narrower keys and
values than the hidden size; the prefix follows them.

Prefixes reach the layers through transformers' key/value cache, so the architecture's
attention must read ``past_key_values`` (every decoder-only model of transformers 5 and the
BERT-family encoders do; the encoders in :data:`NO_CACHE` do not).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from framework.validation import InvalidArgument

#: encoder families whose attention ignores ``past_key_values``: a prefix cannot reach them
NO_CACHE = {"distilbert", "deberta-v2", "deberta", "albert", "mpnet"}


@dataclass(frozen=True)
class KVShape:
    """Per-layer key/value geometry of a backbone."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """Width of one key (or value) vector: ``num_kv_heads · head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def flat_width(self) -> int:
        """Width of one prefix position, all layers' keys and values: ``layers · 2 · kv_width``."""
        return self.num_layers * 2 * self.kv_width


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__


def kv_shape(model: nn.Module) -> KVShape:
    """The key/value geometry of ``model`` (a transformers model), read from its config."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    mtype = getattr(config, "model_type", "")
    if mtype == "falcon":  # multi-query unless the new decoder architecture (grouped kv heads)
        kv_heads = config.num_kv_heads if (config.new_decoder_architecture or not config.multi_query) else 1
    elif mtype == "gpt_bigcode" and getattr(config, "multi_query", False):
        kv_heads = 1
    return KVShape(num_layers=config.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim)


def check_supported(model: nn.Module) -> None:
    """Refuse backbones a cache-borne prefix cannot reach (before anything is trained)."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidArgument(
            "", "prefix tuning in fw supports decoder-only and encoder-only backbones; "
            f"'{model_type(model)}' is an encoder-decoder model"
        )
    if model_type(model) in NO_CACHE:
        raise InvalidArgument(
            "", f"'{model_type(model)}' attention does not read past_key_values, so a prefix cannot "
            "reach it; use a BERT/RoBERTa-family encoder or a decoder-only model"
        )
