"""The architecture-specific part of prefix tuning: which attention blocks get a prefix, and
how wide their keys and values are.

A prefix is ``P`` extra key and value vectors per attention block, shaped like the block's
own: ``(num_kv_heads, head_dim)`` per position. Grouped-query attention (Llama-family with
fewer key/value heads than query heads) and multi-query attention have narrower keys and
values than the hidden size; the prefix follows them.

Decoder-only and encoder-only backbones have one attention block per layer. An
encoder-decoder (T5, BART) has up to three kinds, in this order in the flat prefix
(:class:`Seq2SeqLayout`): the encoder's self-attention (one per encoder layer), then per
decoder layer its self-attention and its cross-attention.

Prefixes reach the decoder layers (and every layer of decoder-only models and BERT-family
encoders) through transformers' key/value cache, so the architecture's attention must read
the cache (every decoder-only model of transformers 5 and the BERT-family encoders do; the
encoders in :data:`NO_CACHE` do not). An encoder-decoder's encoder attention is handed a cache
by :mod:`fw_prefix.inject` (its own stack passes none): its attention modules must carry their
``layer_idx`` and accept a ``cache`` argument, as T5's and BART's do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from framework.validation import InvalidArgument

#: encoder families whose attention ignores ``past_key_values``: a prefix cannot reach them
NO_CACHE = {"distilbert", "deberta-v2", "deberta", "albert", "mpnet"}


@dataclass(frozen=True)
class KVShape:
    """Key/value geometry of the attention blocks that get a prefix.

    ``num_layers`` counts those blocks: the layers of a decoder-only or encoder-only model,
    the :attr:`Seq2SeqLayout.num_blocks` of an encoder-decoder.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """Width of one key (or value) vector: ``num_kv_heads · head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def flat_width(self) -> int:
        """Width of one prefix position, all blocks' keys and values: ``blocks · 2 · kv_width``."""
        return self.num_layers * 2 * self.kv_width


@dataclass(frozen=True)
class Seq2SeqLayout:
    """Which attention blocks of an encoder-decoder get a prefix, in the flat prefix's order::

        [ encoder layer 0 .. E-1 self-attention ]            if encoder
        [ decoder layer 0: self-attention (, cross-attention) ] ... [ decoder layer D-1: ... ]

    Each block is a key then a value (``2 · kv_width`` columns), so a decoder layer with a
    cross prefix is ``self k, self v, cross k, cross v``.
    """

    encoder_layers: int
    decoder_layers: int
    encoder: bool = True
    cross: bool = True

    @property
    def blocks(self) -> list[tuple[str, int]]:
        """``(kind, layer)`` of every block in flat order; kind is encoder, self or cross."""
        out = [("encoder", i) for i in range(self.encoder_layers)] if self.encoder else []
        for i in range(self.decoder_layers):
            out += [("self", i), ("cross", i)] if self.cross else [("self", i)]
        return out

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def describe(self) -> str:
        parts = [f"encoder {self.encoder_layers}"] if self.encoder else []
        parts.append(f"decoder self {self.decoder_layers}")
        if self.cross:
            parts.append(f"cross {self.decoder_layers}")
        return " + ".join(parts)


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def kv_shape(model: nn.Module) -> KVShape:
    """The key/value geometry of a decoder-only or encoder-only ``model`` (a transformers
    model), read from its config."""
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


def attention_modules(stack: nn.Module) -> list[nn.Module]:
    """The attention modules of an encoder or decoder stack: the modules that carry their
    ``layer_idx`` (their key/value cache slot), in module order."""
    return [m for m in stack.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def cache_parameter(module: nn.Module) -> str | None:
    """The keyword under which ``module.forward`` takes a key/value cache, if any."""
    parameters = inspect.signature(type(module).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def seq2seq_geometry(model: nn.Module, encoder: bool, cross: bool) -> tuple[KVShape, Seq2SeqLayout]:
    """The prefix geometry of an encoder-decoder: the blocks (:class:`Seq2SeqLayout`, read from
    the encoder's and decoder's attention modules) and their key/value shape (from the config).
    T5 and BART have neither grouped-query attention nor different key/value widths per block."""
    config = model.config
    encoder_attention = attention_modules(model.get_encoder())
    decoder_attention = attention_modules(model.get_decoder())
    decoder_layers = len({m.layer_idx for m in decoder_attention})
    if not encoder_attention or len(decoder_attention) != 2 * decoder_layers or any(
        cache_parameter(m) is None for m in encoder_attention + decoder_attention
    ):
        raise InvalidArgument(
            "", f"prefix tuning on '{model_type(model)}': expected attention modules with a layer_idx and a cache "
            "argument (a self- and a cross-attention per decoder layer), as T5 and BART have"
        )
    layout = Seq2SeqLayout(len(encoder_attention), decoder_layers, encoder, cross)
    encoder_heads = config.num_attention_heads  # T5: num_heads; BART: encoder_attention_heads
    decoder_heads = getattr(config, "decoder_attention_heads", None) or encoder_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // decoder_heads  # T5: d_kv
    if encoder and encoder_heads != decoder_heads:
        raise InvalidArgument(
            "encoder_prefix", f"the encoder has {encoder_heads} attention heads and the decoder {decoder_heads}; "
            "one flat prefix needs one head layout (set encoder_prefix: false)"
        )
    return KVShape(layout.num_blocks, decoder_heads, head_dim), layout


def block_attention(model: nn.Module, layout: Seq2SeqLayout) -> list[str]:
    """The name of each block's attention module, in flat order (a decoder layer registers its
    self-attention before its cross-attention, as T5's and BART's do)."""
    names = {id(m): n for n, m in model.named_modules()}
    encoder = {m.layer_idx: m for m in attention_modules(model.get_encoder())}
    decoder: dict[int, list[nn.Module]] = {}
    for m in attention_modules(model.get_decoder()):
        decoder.setdefault(m.layer_idx, []).append(m)
    return [
        names[id(encoder[layer] if kind == "encoder" else decoder[layer][kind == "cross"])]
        for kind, layer in layout.blocks
    ]


def check_supported(model: nn.Module) -> None:
    """Refuse backbones a cache-borne prefix cannot reach (before anything is trained)."""
    if model_type(model) in NO_CACHE:
        raise InvalidArgument(
            "", f"'{model_type(model)}' attention does not read past_key_values, so a prefix cannot "
            "reach it; use a BERT/RoBERTa-family encoder, a decoder-only model or an encoder-decoder (T5, BART)"
        )
