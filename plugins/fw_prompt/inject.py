"""Virtual tokens in front of every input: the input transformation of prompt tuning and P-tuning.

:class:`VirtualTokenInjector` installs two hooks on the top-level transformers model, so the
rest of fw (tasks, ``generate``) calls the model exactly as it would without the method:

- before ``forward``: the input ids become input embeddings with the ``P`` virtual-token
  embeddings in front; the attention mask gets ``P`` ones in front, token-type ids ``P``
  zeros, token-level labels ``P`` ``-100``; explicit position ids move right by ``P`` (the
  virtual tokens take positions ``0..P-1``, as in Hugging Face PEFT);
- after ``forward``: the ``P`` virtual positions are dropped from token-level logits, so
  position ``t`` of the logits still belongs to input token ``t`` (the causal-LM loss and
  ``generate`` need no change). Sequence-level logits (classification) are left alone.

During generation only the first (prefill) call carries the virtual tokens; they then live
in the key/value cache, which is marked, and later calls only extend the mask and positions.
"""

from __future__ import annotations

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
        cache = kw.get(cache_keyword(model, kw))
        past = seen_positions(cache)
        if past and getattr(cache, CACHE_MARK, None) != p:
            raise ValueError(
                "the key/value cache passed to the model was not built with this method's virtual tokens; "
                "start generation from the prompt without a cache"
            )
        prefill = past == 0
        if prefill:
            check_length(self.max_positions, p, length, self.field)
            kw = self._prepend_virtual_tokens(model, kw, batch, p)
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

    def _prepend_virtual_tokens(self, model: nn.Module, kw: dict[str, Any], batch: int, p: int) -> dict[str, Any]:
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kw["input_ids"])
        virtual = self.source().to(device=embeds.device, dtype=embeds.dtype)
        kw["inputs_embeds"] = torch.cat([virtual.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        kw["input_ids"] = None
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = prepend(kw["token_type_ids"], p, 0)
        labels = kw.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == embeds.shape[1] and not labels.is_floating_point():
            kw["labels"] = prepend(labels, p, -100)  # token-level labels (causal LM, tagging)
        return kw

    def after_forward(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        added, self._added = self._added, 0
        mark(output_cache(output), CACHE_MARK, self.num_virtual_tokens)
        logits = getattr(output, "logits", None)
        if added and isinstance(logits, torch.Tensor) and logits.dim() >= 3 and logits.shape[1] == self._length:
            output.logits = logits[:, added:]
        return output


def refuse_encoder_decoder(model: nn.Module, method: str) -> None:
    """Virtual-token methods here support decoder-only and encoder-only backbones."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise InvalidArgument(
            "", f"{method} supports decoder-only and encoder-only backbones; "
            f"'{getattr(config, 'model_type', type(model).__name__)}' is an encoder-decoder model"
        )


def add_virtual_tokens(model: nn.Module, source: nn.Module, method: str, field: str = "num_virtual_tokens") -> VirtualTokenInjector:
    """Register ``source`` as ``model.prompt_encoder`` and prepend its output to every input."""
    refuse_encoder_decoder(model, method)
    if hasattr(model, MODULE_NAME):
        raise InvalidArgument("", f"the model already has a '{MODULE_NAME}'; attach one virtual-token method only")
    model.add_module(MODULE_NAME, source)
    injector = VirtualTokenInjector(source, field)
    injector.install(model)
    return injector

