"""Prefix key/values into every layer, through transformers' key/value cache.

:class:`PrefixInjector` installs two hooks on the top-level transformers model:

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

The prefix comes from any *source* with a ``prefix_length`` attribute and a
``key_values(batch_size, dtype, device)`` method (a :class:`fw_prefix.PrefixEncoder`, or a
wrapper around one, e.g. a gate that scales its values).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

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
from fw_prefix.shapes import check_supported, kv_shape

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

    def install(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` and refuse gradient checkpointing from now on."""
        if is_checkpointing(model):
            raise ValueError(GRADIENT_CHECKPOINTING_ERROR)
        self.max_positions = position_limit(model)
        model.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        model.register_forward_hook(self.after_forward, with_kwargs=True)
        for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable"):
            if hasattr(model, name):
                setattr(model, name, RefuseGradientCheckpointing())

    # -- hooks ----------------------------------------------------------------------------

    def before_forward(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if model.training and is_checkpointing(model):  # switched on behind the guard's back
            raise ValueError(GRADIENT_CHECKPOINTING_ERROR)
        kw = forward_kwargs(model, args, kwargs)
        batch, length, device = input_size(kw)
        p = self.prefix_length
        key = cache_keyword(model, kw)
        cache = kw.get(key)
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
        embeds = kw.get("inputs_embeds")
        dtype = embeds.dtype if embeds is not None else model.get_input_embeddings().weight.dtype
        if torch.is_autocast_enabled(device.type):  # keys/values come out in the autocast dtype
            dtype = torch.get_autocast_dtype(device.type)
        for layer, (key, value) in enumerate(self.source.key_values(batch, dtype, device)):
            cache.update(key, value, layer)
        mark(cache, CACHE_MARK, self.prefix_length)
        self._filled = cache
        return cache

    def after_forward(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        cache, self._filled = self._filled, None
        if cache is not None:
            idle = [i for i in range(len(cache.layers)) if cache.layers[i].get_seq_length() <= self.prefix_length]
            if idle:
                raise RuntimeError(
                    f"prefix tuning: {type(model).__name__} did not read the prefix in layers {idle}; its "
                    "attention ignores past_key_values in this mode, so the prefix would have no effect"
                )
        return output


def add_prefix(
    model: nn.Module,
    prefix_length: int,
    bottleneck: int | None = 512,
    field: str = "prefix_length",
) -> PrefixEncoder:
    """Attach a trainable prefix to ``model``: a :class:`PrefixEncoder` registered as
    ``model.prefix_encoder`` and a :class:`PrefixInjector` feeding it to every layer.

    ``bottleneck=None`` trains the flat prefix directly (no reparameterization). Returns
    the encoder, whose ``injector`` attribute is the :class:`PrefixInjector` feeding it.
    """
    check_supported(model)
    if hasattr(model, MODULE_NAME):
        raise InvalidArgument("", f"the model already has a '{MODULE_NAME}'; attach one prefix only")
    words = model.get_input_embeddings().weight
    encoder = PrefixEncoder(kv_shape(model), prefix_length, words.shape[1], bottleneck, device=words.device)
    model.add_module(MODULE_NAME, encoder)
    encoder.injector = PrefixInjector(encoder, field)
    encoder.injector.install(model)
    return encoder
