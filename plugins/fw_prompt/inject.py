"""Virtual tokens in front of every input: the input transformation of prompt tuning and P-tuning.

Decoder-only and encoder-only backbones: :class:`VirtualTokenInjector` installs two hooks on
the top-level transformers model, so the rest of fw (tasks, ``generate``) calls the model
exactly as it would without the method:

- before ``forward``: the input ids become input embeddings with the ``P`` virtual-token
  embeddings in front; the attention mask gets ``P`` ones in front, token-type ids ``P``
  zeros, token-level labels ``P`` ``-100``; explicit position ids move right by ``P`` (the
  virtual tokens take positions ``0..P-1``, as in Hugging Face PEFT);
- after ``forward``: the ``P`` virtual positions are dropped from token-level logits, so
  position ``t`` of the logits still belongs to input token ``t`` (the causal-LM loss and
  ``generate`` need no change). Sequence-level logits (classification) are left alone.

During generation only the first (prefill) call carries the virtual tokens; they then live
in the key/value cache, which is marked, and later calls only extend the mask and positions.

Encoder-decoders (T5, BART, ...): :class:`EncoderVirtualTokenInjector` puts the virtual
tokens in front of the *encoder's* input only, as Lester et al. do on T5 and Hugging Face
PEFT does for ``SEQ_2_SEQ_LM``. The decoder input, the labels and the logits (the
decoder's) are untouched. The encoder's attention mask, which the decoder also reads as its
cross-attention mask, gets ``P`` ones in front wherever it describes the encoder's input:

- a pre-hook on the encoder (``model.get_encoder()``) prepends the virtual-token embeddings
  and widens a mask that still covers only the ``L`` real tokens. ``generate`` calls the
  encoder directly, once, before decoding; a training forward reaches it through the model;
- a pre-hook on the top-level model widens the caller's ``L``-column mask to ``L + P``:
  before a forward that runs the encoder (the encoder's hook then finds the mask already
  widened and only prepends the embeddings), and on every decoding step of ``generate``,
  which passes the ``encoder_outputs`` (``L + P`` positions) with the caller's mask.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from framework.forward_context import widened
from framework.validation import InvalidArgument
from framework.virtual_inputs import (
    cache_keyword,
    check_length,
    extend_positions,
    forward_kwargs,
    input_size,
    mark,
    output_cache,
    position_limit,
    prepend,
    seen_positions,
)

#: attribute set on a transformers Cache that already holds the virtual tokens
CACHE_MARK = "_fw_virtual_tokens"
#: where the virtual-token module lives in the model (its parameters are ``prompt_encoder.*``)
MODULE_NAME = "prompt_encoder"


def virtual_token_cache(model: nn.Module, kw: dict[str, Any], p: int) -> tuple[Any, int]:
    """The call's key/value cache and how many positions it holds; a cache that holds positions
    but not these ``p`` virtual tokens (built without the method) is an error."""
    cache = kw.get(cache_keyword(model, kw))
    past = seen_positions(cache)
    if past and getattr(cache, CACHE_MARK, None) != p:
        raise ValueError(
            "the key/value cache passed to the model was not built with this method's virtual tokens; "
            "start generation from the prompt without a cache"
        )
    return cache, past


class VirtualTokenInjector:
    """Prepends ``source()`` (a ``(P, hidden)`` tensor) to the input embeddings of ``model``.

    ``source`` is an ``nn.Module`` with a ``num_virtual_tokens`` attribute whose ``forward()``
    returns the virtual-token embeddings (a prompt-tuning table, a P-tuning encoder, ...).
    A plain object rather than a closure, so a deep copy of the model copies it consistently.
    """

    def __init__(self, source: nn.Module, field: str = "num_virtual_tokens") -> None:
        self.source = source
        self.field = field
        self.max_positions: int | None = None
        self._added = 0  # virtual positions prepended by the current call (0 on decode steps)
        self._length = 0  # sequence length the model sees in the current call

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.source.num_virtual_tokens)

    def install(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` (the top-level transformers model)."""
        self.max_positions = position_limit(model)
        model.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        model.register_forward_hook(self.after_forward, with_kwargs=True)

    # -- hooks ----------------------------------------------------------------------------

    def before_forward(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        kw = forward_kwargs(model, args, kwargs)
        batch, length, _ = input_size(kw)
        p = self.num_virtual_tokens
        cache, past = virtual_token_cache(model, kw, p)
        prefill = past == 0
        if prefill:
            check_length(self.max_positions, p, length, self.field)
            kw = prepend_virtual_tokens(self.source, model.get_input_embeddings(), kw, batch, p)
            mark(cache, CACHE_MARK, p)
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = prepend(kw["attention_mask"], p, 1)
            widened(model, kw["attention_mask"])
        if kw.get("position_ids") is not None:
            kw["position_ids"] = extend_positions(kw["position_ids"], p, p if prefill else 0)
        if kw.get("cache_position") is not None:  # older/remote-code models
            new = length + (p if prefill else 0)
            kw["cache_position"] = torch.arange(past, past + new, device=kw["cache_position"].device)
        self._added = p if prefill else 0
        self._length = length + self._added
        return (), kw

    def after_forward(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        added, self._added = self._added, 0
        mark(output_cache(output), CACHE_MARK, self.num_virtual_tokens)
        logits = getattr(output, "logits", None)
        if added and isinstance(logits, torch.Tensor) and logits.dim() >= 3 and logits.shape[1] == self._length:
            output.logits = logits[:, added:]
        return output


def prepend_virtual_tokens(
    source: nn.Module, word_embeddings: nn.Module, kw: dict[str, Any], batch: int, p: int
) -> dict[str, Any]:
    """The call ``kw`` with ``source()`` in front of its input embeddings (``input_ids``
    embedded by ``word_embeddings``), ``P`` zeros in front of token-type ids and ``P``
    ``-100`` in front of token-level labels. The attention mask is the caller's business.
    ``source()`` is ``(P, hidden)`` (every row alike) or ``(batch, P, hidden)`` (one per row)."""
    embeds = kw.get("inputs_embeds")
    if embeds is None:
        embeds = word_embeddings(kw["input_ids"])
    virtual = source().to(device=embeds.device, dtype=embeds.dtype)
    if virtual.dim() == 2:
        virtual = virtual.unsqueeze(0).expand(batch, -1, -1)
    kw["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    kw["input_ids"] = None
    if kw.get("token_type_ids") is not None:
        kw["token_type_ids"] = prepend(kw["token_type_ids"], p, 0)
    labels = kw.get("labels")
    if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1] and not labels.is_floating_point():
        kw["labels"] = prepend(labels, p, -100)  # token-level labels (causal LM, tagging)
    return kw


class EncoderVirtualTokenInjector:
    """Prepends ``source()`` (a ``(P, hidden)`` tensor) to the encoder input of an
    encoder-decoder ``model`` and widens the encoder's attention mask wherever it is read
    (the module docstring tells where). ``source`` is as for :class:`VirtualTokenInjector`.
    """

    def __init__(self, source: nn.Module, field: str = "num_virtual_tokens") -> None:
        self.source = source
        self.field = field
        self.max_positions: int | None = None
        self.model: nn.Module | None = None  # the top-level model (its forward context)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.source.num_virtual_tokens)

    def install(self, model: nn.Module) -> None:
        """Register the hooks on ``model.get_encoder()`` and on ``model``."""
        encoder = model.get_encoder()
        self.model = model
        self.max_positions = encoder_position_limit(model)
        encoder.register_forward_pre_hook(self.before_encoder, with_kwargs=True)
        model.register_forward_pre_hook(self.before_forward, with_kwargs=True)

    # -- hooks ----------------------------------------------------------------------------

    def before_encoder(
        self, encoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The encoder's call: virtual tokens in front; an ``L``-column mask gets ``P`` ones."""
        kw = forward_kwargs(encoder, args, kwargs)
        batch, length, _ = input_size(kw)
        p = self.num_virtual_tokens
        check_length(self.max_positions, p, length, self.field)
        kw = prepend_virtual_tokens(self.source, self._word_embeddings(encoder), kw, batch, p)
        self._widen_mask(kw, length)
        return (), kw

    def before_forward(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The top-level call: the encoder mask (also the cross-attention mask) gets ``P`` ones
        when it covers only the real tokens."""
        kw = forward_kwargs(model, args, kwargs)
        if kw.get("attention_mask") is None:
            return None
        self._widen_mask(kw, self._real_length(kw))
        return (), kw

    # -- helpers --------------------------------------------------------------------------

    def _word_embeddings(self, encoder: nn.Module) -> nn.Module:
        """What the encoder embeds its ``input_ids`` with (the shared table on T5 and BART)."""
        getter = getattr(encoder, "get_input_embeddings", None)
        embeddings = getter() if getter is not None else None
        if embeddings is None and self.model is not None:
            embeddings = self.model.get_input_embeddings()
        return embeddings

    def _real_length(self, kw: dict[str, Any]) -> int:
        """How many real (non-virtual) positions the encoder reads in the call ``kw``."""
        encoder_outputs = kw.get("encoder_outputs")
        if encoder_outputs is not None:  # computed by the hooked encoder: virtual tokens included
            return int(encoder_outputs[0].shape[1]) - self.num_virtual_tokens
        return input_size(kw)[1]

    def _widen_mask(self, kw: dict[str, Any], length: int) -> None:
        """``P`` ones in front of ``kw``'s attention mask if it has ``length`` columns (a mask
        that already has ``length + P`` is left as it is); tell the forward context."""
        mask = kw.get("attention_mask")
        if mask is None:
            return
        if mask.shape[-1] == length:  # prepend refuses anything but a 2-D mask
            kw["attention_mask"] = mask = prepend(mask, self.num_virtual_tokens, 1)
        if self.model is not None:
            widened(self.model, mask)


def encoder_position_limit(model: nn.Module) -> int | None:
    """:func:`~framework.virtual_inputs.position_limit`, also for learned position tables kept
    ``offset`` rows longer than ``max_position_embeddings`` (BART, mBART, ...); None for
    relative positions (T5)."""
    limit = position_limit(model)
    if limit is not None:
        return limit
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    tables = (m for m in model.get_encoder().modules() if isinstance(m, nn.Embedding))
    return limit if any(t.num_embeddings - getattr(t, "offset", 0) == limit for t in tables) else None


def check_encoder_decoder(model: nn.Module, method: str) -> None:
    """An encoder-decoder must have an encoder that takes ``inputs_embeds`` (text encoders:
    T5, BART, ...; not speech or vision encoders, whose inputs are not token embeddings)."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    if encoder is None or "inputs_embeds" not in inspect.signature(type(encoder).forward).parameters:
        config = getattr(model, "config", None)
        raise InvalidArgument(
            "", f"{method} on an encoder-decoder needs a text encoder that takes inputs_embeds; "
            f"'{getattr(config, 'model_type', type(model).__name__)}' has none"
        )


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def add_virtual_tokens(
    model: nn.Module, source: nn.Module, method: str, field: str = "num_virtual_tokens"
) -> VirtualTokenInjector | EncoderVirtualTokenInjector:
    """Register ``source`` as ``model.prompt_encoder`` and prepend its output to every input
    (to the encoder's input on an encoder-decoder)."""
    injector: VirtualTokenInjector | EncoderVirtualTokenInjector
    if is_encoder_decoder(model):
        check_encoder_decoder(model, method)
        injector = EncoderVirtualTokenInjector(source, field)
    else:
        injector = VirtualTokenInjector(source, field)
    if hasattr(model, MODULE_NAME):
        raise InvalidArgument("", f"the model already has a '{MODULE_NAME}'; attach one virtual-token method only")
    model.add_module(MODULE_NAME, source)
    injector.install(model)
    return injector

