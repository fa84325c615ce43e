"""Prefix key/values into every attention block, through transformers' key/value cache.

Decoder-only and encoder-only backbones: :class:`PrefixInjector` installs two hooks on the
top-level transformers model:

- before ``forward``: a ``DynamicCache`` is filled with each layer's ``P`` prefix keys and
  values (or the empty cache ``generate`` passes is), so every attention layer attends to
  ``[prefix | tokens]``. The attention mask gets ``P`` ones in front, explicit position ids
  move right by ``P`` (the prefix takes positions ``0..P-1``, as in Hugging Face PEFT);
  later decoding steps find the prefix already in the (marked) cache.
- after ``forward``: a check that every layer really read the cache (an architecture or a
  mode that ignores ``past_key_values`` would otherwise silently drop the prefix).

Gradient checkpointing is refused (``gradient_checkpointing_enable`` raises once the hooks
are installed): transformers does not pass the cache to checkpointed layers (GPT-2 drops
it), and recomputation would append the keys a second time.

Encoder-decoders (T5, BART): :class:`Seq2SeqPrefixInjector` hooks the encoder and decoder
stacks (``model.get_encoder()``, ``model.get_decoder()``), which ``generate`` also calls
(the encoder once, directly; the decoder through the model at every step):

- decoder, before ``forward``: an ``EncoderDecoderCache`` (or the empty one ``generate``
  passes) gets each decoder layer's self-attention prefix in its self-attention cache (as
  Hugging Face PEFT builds it for ``SEQ_2_SEQ_LM``) and, with a cross prefix, each layer's
  cross-attention prefix in its cross-attention cache (which PEFT empties), marked not yet
  updated so that the layer appends the encoder output's keys and values behind the prefix
  on this first call (later decoding steps reuse ``[prefix | encoder]`` from the cache). The decoder's own mask
  gets ``P`` ones in front (the decoder positions then start at ``P``: BART's learned
  positions and T5's relative ones count the prefix, as under PEFT); with a cross prefix the
  encoder mask the decoder reads for cross-attention gets ``P`` ones in front too, on every
  call, since the cached cross keys are ``P + L`` long. The encoder's output stays ``L`` long:
  a prefix adds keys and values, never queries or hidden states.
- encoder, before ``forward`` (with an encoder prefix): T5's and BART's encoder stacks pass
  no cache to their attention, so the hook fills a fresh ``DynamicCache`` with each encoder
  layer's prefix and a pre-hook on every encoder attention module hands it over as the
  ``cache`` argument. The attention appends its keys and values behind the prefix, exactly
  as a decoder's would; the encoder mask gets ``P`` ones in front. T5's relative position
  bias reads the cache length, so the tokens sit at ``P .. P+L-1`` behind the prefix at
  ``0 .. P-1``: token-to-token distances are unchanged, and the prefix lies to the left of
  every token.
- after either ``forward``: the check that every block read its prefix.

A decoder call with ``use_cache=False`` (decoder-only or encoder-decoder) always gets a fresh
cache holding only the prefix: the model returns the cache it was handed even then, and
``generate(use_cache=False)`` passes it back with the whole input, which must not be appended
to it a second time.

The forward context (:mod:`framework.forward_context`) is left alone on encoder-decoders: the
prefix adds no hidden positions, so the mask a stack was called with still describes what
its layers see (UniPELT records each stack's mask there).

The prefix comes from any *source* with a ``prefix_length`` attribute and a
``key_values(batch_size, dtype, device)`` method (a :class:`fw_prefix.PrefixEncoder`, or a
wrapper around one, e.g. a gate that scales its values). During the call that fills it,
``injector.prefix_slot(block)`` is the cache layer holding block ``block``'s prefix: a hook
inside the model may rescale it before the block reads it (UniPELT's prefix gate).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from framework.forward_context import widened
from framework.validation import InvalidArgument
from framework.virtual_inputs import (
    cache_keyword,
    check_length,
    extend_positions,
    forward_kwargs,
    input_size,
    mark,
    position_limit,
    prepend,
    seen_positions,
)
from fw_prefix.encoder import PrefixEncoder
from fw_prefix.shapes import (
    KVShape,
    Seq2SeqLayout,
    attention_modules,
    cache_parameter,
    check_supported,
    is_encoder_decoder,
    kv_shape,
    model_type,
    seq2seq_geometry,
)

#: attribute set on a transformers Cache that already holds the prefix
CACHE_MARK = "_fw_prefix_length"
#: where the prefix encoder lives in the model (its parameters are ``prefix_encoder.*``)
MODULE_NAME = "prefix_encoder"
GRADIENT_CHECKPOINTING_ERROR = (
    "model.gradient_checkpointing: prefix tuning reaches every layer through the key/value cache, which "
    "transformers does not hand to checkpointed layers (and recomputation would add the prefix twice); "
    "set model.gradient_checkpointing: false"
)


class RefuseGradientCheckpointing:
    """Stands in for the model's ``gradient_checkpointing_enable`` (and its successor
    ``activation_checkpointing_enable``) once a prefix is attached."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(GRADIENT_CHECKPOINTING_ERROR)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether any submodule already has gradient (activation) checkpointing on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def refuse_gradient_checkpointing(model: nn.Module) -> None:
    """Refuse checkpointing now, and from now on (``gradient_checkpointing_enable`` raises)."""
    if is_checkpointing(model):
        raise ValueError(GRADIENT_CHECKPOINTING_ERROR)
    for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable"):
        if hasattr(model, name):
            setattr(model, name, RefuseGradientCheckpointing())


def check_not_checkpointing(module: nn.Module) -> None:
    """Checkpointing switched on behind the guard's back is refused at the first training call."""
    if module.training and is_checkpointing(module):
        raise ValueError(GRADIENT_CHECKPOINTING_ERROR)


def prefix_dtype(words: nn.Module, kw: dict[str, Any], device: torch.device) -> torch.dtype:
    """The dtype the layers' keys and values come out in: the input embeddings' (the
    autocast dtype under autocast)."""
    embeds = kw.get("inputs_embeds")
    dtype = embeds.dtype if embeds is not None else words.weight.dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    return dtype


def unread_layers(cache: Any, prefix_length: int) -> list[int]:
    """The layers of a filled cache whose attention did not append keys behind the prefix."""
    return [i for i, layer in enumerate(cache.layers) if layer.get_seq_length() <= prefix_length]


def refuse_unread(model: nn.Module, where: str, idle: list[int]) -> None:
    if idle:
        raise RuntimeError(
            f"prefix tuning: {type(model).__name__} did not read the prefix in {where}layers {idle}; its "
            "attention ignores past_key_values in this mode, so the prefix would have no effect"
        )


class PrefixInjector:
    """Feeds ``source``'s per-layer prefix to ``model`` on every forward call."""

    def __init__(self, source: Any, field: str = "prefix_length") -> None:
        self.source = source
        self.field = field
        self.max_positions: int | None = None
        self._filled: Any = None  # the cache this call filled, checked after forward

    @property
    def prefix_length(self) -> int:
        return int(self.source.prefix_length)

    @property
    def filling(self) -> Any:
        """The cache this forward call filled with the prefix (None between calls and on
        later decoding steps, whose cache already holds it). Hooks inside the model may
        rescale a layer's prefix there before the layer reads it (UniPELT's prefix gate)."""
        return self._filled

    def prefix_slot(self, block: int) -> Any:
        """The cache layer holding layer ``block``'s prefix during the call that filled it, else None."""
        return None if self._filled is None else self._filled.layers[block]

    def install(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` and refuse gradient checkpointing from now on."""
        refuse_gradient_checkpointing(model)
        self.max_positions = position_limit(model)
        model.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        model.register_forward_hook(self.after_forward, with_kwargs=True)

    # -- hooks ----------------------------------------------------------------------------

    def before_forward(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        check_not_checkpointing(model)
        kw = forward_kwargs(model, args, kwargs)
        batch, length, device = input_size(kw)
        p = self.prefix_length
        key = cache_keyword(model, kw)
        cache = kw.get(key) if kw.get("use_cache") is not False else None  # use_cache=False: see the module docstring
        past = seen_positions(cache)
        if past == 0:
            check_length(self.max_positions, p, length, self.field)
            cache = self._fill(model, kw, cache, batch, device)
            kw[key] = cache
            past = p
        elif getattr(cache, CACHE_MARK, None) != p:
            raise ValueError(
                "the key/value cache passed to the model does not hold this method's prefix; "
                "start generation from the prompt without a cache"
            )
        mask = kw.get("attention_mask")
        if mask is not None:
            kw["attention_mask"] = prepend(mask, p, 1)
        else:  # encoders size their mask from it: make the prefix visible explicitly
            kw["attention_mask"] = torch.ones(batch, past + length, dtype=torch.long, device=device)
        widened(model, kw["attention_mask"])
        if kw.get("position_ids") is not None:
            kw["position_ids"] = extend_positions(kw["position_ids"], p, 0)
        if kw.get("cache_position") is not None:  # older/remote-code models
            kw["cache_position"] = torch.arange(past, past + length, device=device)
        return (), kw

    def _fill(self, model: nn.Module, kw: dict[str, Any], cache: Any, batch: int, device: torch.device) -> Any:
        if cache is None:
            cache = DynamicCache(config=model.config)
        elif not isinstance(cache, DynamicCache):
            raise ValueError(
                f"prefix tuning puts its prefix into a DynamicCache; got a {type(cache).__name__} "
                "(leave generation's cache_implementation at its default)"
            )
        dtype = prefix_dtype(model.get_input_embeddings(), kw, device)
        for layer, (key, value) in enumerate(self.source.key_values(batch, dtype, device)):
            cache.update(key, value, layer)
        mark(cache, CACHE_MARK, self.prefix_length)
        self._filled = cache
        return cache

    def after_forward(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        cache, self._filled = self._filled, None
        if cache is not None:
            refuse_unread(model, "", unread_layers(cache, self.prefix_length))
        return output


class Seq2SeqPrefixInjector:
    """Feeds ``source``'s prefix to the attention blocks ``layout`` names of an encoder-decoder
    (the module docstring tells how)."""

    def __init__(self, source: Any, layout: Seq2SeqLayout, field: str = "prefix_length") -> None:
        self.source = source
        self.layout = layout
        self.field = field
        self._words: nn.Module | None = None  # the input embeddings, whose dtype the prefix takes
        self._encoder_cache: DynamicCache | None = None  # the encoder call's prefix, between its hooks
        self._filled: EncoderDecoderCache | None = None  # the decoder cache this call filled

    @property
    def prefix_length(self) -> int:
        return int(self.source.prefix_length)

    def prefix_slot(self, block: int) -> Any:
        """The cache layer holding block ``block``'s prefix (flat order) during the encoder or
        decoder call that filled it, else None."""
        kind, layer = self.layout.blocks[block]
        if kind == "encoder":
            cache = self._encoder_cache
        elif self._filled is None:
            return None
        else:
            cache = self._filled.self_attention_cache if kind == "self" else self._filled.cross_attention_cache
        return None if cache is None else cache.layers[layer]

    def install(self, model: nn.Module) -> None:
        """Register the hooks on the encoder and decoder stacks (and the encoder's attention
        modules); refuse gradient checkpointing from now on."""
        refuse_gradient_checkpointing(model)
        self._words = model.get_input_embeddings()
        encoder, decoder = model.get_encoder(), model.get_decoder()
        if self.layout.encoder:
            encoder.register_forward_pre_hook(self.before_encoder, with_kwargs=True)
            encoder.register_forward_hook(self.after_encoder, with_kwargs=True)
            for attention in attention_modules(encoder):
                hand_over = partial(self.hand_over_cache, cache_parameter(attention) or "cache")
                attention.register_forward_pre_hook(hand_over, with_kwargs=True)
        decoder.register_forward_pre_hook(self.before_decoder, with_kwargs=True)
        decoder.register_forward_hook(self.after_decoder, with_kwargs=True)

    def _blocks(self, kinds: set[str], batch: int, kw: dict[str, Any], device: torch.device) -> list[tuple[str, int, Any, Any]]:
        """``(kind, layer, keys, values)`` of the blocks of ``kinds`` (encoder, self, cross)."""
        key_values = self.source.key_values(batch, prefix_dtype(self._words, kw, device), device)
        return [(kind, layer, k, v) for (kind, layer), (k, v) in zip(self.layout.blocks, key_values) if kind in kinds]

    # -- encoder --------------------------------------------------------------------------

    def before_encoder(
        self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A fresh cache holding the encoder layers' prefix; the mask gets ``P`` ones in front."""
        check_not_checkpointing(encoder)
        kw = forward_kwargs(encoder, args, kwargs)
        batch, length, device = input_size(kw)
        p = self.prefix_length
        cache = DynamicCache()
        for _, layer, key, value in self._blocks({"encoder"}, batch, kw, device):
            cache.update(key, value, layer)
        self._encoder_cache = cache
        mask = kw.get("attention_mask")
        kw["attention_mask"] = (
            prepend(mask, p, 1) if mask is not None else torch.ones(batch, p + length, dtype=torch.long, device=device)
        )
        return (), kw

    def hand_over_cache(
        self, keyword: str, attention: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Pre-hook on an encoder attention module: the encoder call's prefix cache as its cache."""
        if self._encoder_cache is not None:
            kwargs = {**kwargs, keyword: self._encoder_cache}
        return args, kwargs

    def after_encoder(self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        cache, self._encoder_cache = self._encoder_cache, None
        if cache is not None and not drops_layers(encoder):
            refuse_unread(encoder, "encoder ", unread_layers(cache, self.prefix_length))
        return output

    # -- decoder --------------------------------------------------------------------------

    def before_decoder(
        self, decoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        check_not_checkpointing(decoder)
        kw = forward_kwargs(decoder, args, kwargs)
        batch, length, device = input_size(kw)
        p = self.prefix_length
        key = cache_keyword(decoder, kw)
        cache = kw.get(key) if kw.get("use_cache") is not False else None  # use_cache=False: see the module docstring
        past = seen_positions(cache)
        if past == 0:
            kw[key] = self._fill(cache, batch, kw, device)
            past = p
        elif getattr(cache, CACHE_MARK, None) != p:
            raise ValueError(
                "the key/value cache passed to the model does not hold this method's prefix; "
                "start generation from the prompt without a cache"
            )
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = prepend(kw["attention_mask"], p, 1)
        if self.layout.cross:
            kw["encoder_attention_mask"] = self._cross_mask(kw, batch, device)
        if kw.get("position_ids") is not None:
            kw["position_ids"] = extend_positions(kw["position_ids"], p, 0)
        if kw.get("cache_position") is not None:  # older/remote-code models
            kw["cache_position"] = torch.arange(past, past + length, device=device)
        return (), kw

    def _fill(self, cache: Any, batch: int, kw: dict[str, Any], device: torch.device) -> EncoderDecoderCache:
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        elif not (isinstance(cache, EncoderDecoderCache) and isinstance(cache.self_attention_cache, DynamicCache)
                  and isinstance(cache.cross_attention_cache, DynamicCache)):
            raise ValueError(
                "prefix tuning puts its prefix into an EncoderDecoderCache of two DynamicCaches; got a "
                f"{type(cache).__name__} (leave generation's cache_implementation at its default)"
            )
        elif cache.cross_attention_cache.get_seq_length() > 0:
            raise ValueError("prefix tuning: the cross-attention cache already holds encoder keys; pass an empty cache")
        for kind, layer, key, value in self._blocks({"self", "cross"}, batch, kw, device):
            if kind == "self":
                cache.self_attention_cache.update(key, value, layer)
            else:
                cache.cross_attention_cache.update(key, value, layer)
                cache.is_updated[layer] = False  # this call appends the encoder's keys behind the prefix
        mark(cache, CACHE_MARK, self.prefix_length)
        self._filled = cache
        return cache

    def _cross_mask(self, kw: dict[str, Any], batch: int, device: torch.device) -> torch.Tensor | None:
        """The cross-attention mask over ``[prefix | encoder output]``."""
        mask = kw.get("encoder_attention_mask")
        if mask is not None:
            return prepend(mask, self.prefix_length, 1)
        states = kw.get("encoder_hidden_states")
        if states is None:
            return None
        return torch.ones(batch, self.prefix_length + states.shape[1], dtype=torch.long, device=device)

    def after_decoder(self, decoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        cache, self._filled = self._filled, None
        if cache is not None and not drops_layers(decoder):
            p = self.prefix_length
            refuse_unread(decoder, "decoder self-attention ", unread_layers(cache.self_attention_cache, p))
            if self.layout.cross:
                refuse_unread(decoder, "cross-attention ", unread_layers(cache.cross_attention_cache, p))
        return output


def drops_layers(stack: nn.Module) -> bool:
    """Whether a stack may skip layers in this call (LayerDrop in training): a skipped layer
    leaves its prefix unread by design."""
    return stack.training and float(getattr(stack, "layerdrop", 0.0) or 0.0) > 0


def check_block_flags(encoder_prefix: Any, cross_prefix: Any) -> None:
    """``encoder_prefix`` and ``cross_prefix`` are booleans."""
    for argument, value in (("encoder_prefix", encoder_prefix), ("cross_prefix", cross_prefix)):
        if not isinstance(value, bool):
            raise InvalidArgument(argument, f"expected true or false, got {value!r}")


def refuse_seq2seq_options(model: nn.Module, encoder_prefix: bool, cross_prefix: bool) -> None:
    """``encoder_prefix`` and ``cross_prefix`` choose blocks of an encoder-decoder only."""
    check_block_flags(encoder_prefix, cross_prefix)
    for argument, value in (("encoder_prefix", encoder_prefix), ("cross_prefix", cross_prefix)):
        if not value and not is_encoder_decoder(model):
            raise InvalidArgument(
                argument, f"chooses blocks of encoder-decoder backbones (T5, BART); '{model_type(model)}' has no "
                "separate encoder and cross-attention, so leave it true"
            )


def add_prefix(
    model: nn.Module,
    prefix_length: int,
    bottleneck: int | None = 512,
    field: str = "prefix_length",
    encoder_prefix: bool = True,
    cross_prefix: bool = True,
) -> PrefixEncoder:
    """Attach a trainable prefix to ``model``: a :class:`PrefixEncoder` registered as
    ``model.prefix_encoder`` and an injector feeding it to every attention block
    (:class:`PrefixInjector`; :class:`Seq2SeqPrefixInjector` on encoder-decoders, whose
    encoder self-attention and decoder cross-attention get a prefix unless
    ``encoder_prefix`` / ``cross_prefix`` are false).

    ``bottleneck=None`` trains the flat prefix directly (no reparameterization). Returns
    the encoder, whose ``injector`` attribute is the injector feeding it.
    """
    check_supported(model)
    refuse_seq2seq_options(model, encoder_prefix, cross_prefix)
    if hasattr(model, MODULE_NAME):
        raise InvalidArgument("", f"the model already has a '{MODULE_NAME}'; attach one prefix only")
    layout: Seq2SeqLayout | None = None
    shape: KVShape
    if is_encoder_decoder(model):
        shape, layout = seq2seq_geometry(model, encoder_prefix, cross_prefix)
    else:
        shape = kv_shape(model)
    words = model.get_input_embeddings().weight
    encoder = PrefixEncoder(shape, prefix_length, words.shape[1], bottleneck, device=words.device, layout=layout)
    model.add_module(MODULE_NAME, encoder)
    encoder.injector = PrefixInjector(encoder, field) if layout is None else Seq2SeqPrefixInjector(encoder, layout, field)
    encoder.injector.install(model)
    return encoder
