"""Prompt tuning and P-tuning adapters inside ``multi``: per-example virtual tokens.

Every virtual-token adapter keeps its own source (a prompt table, a P-tuning encoder) in one
``nn.ModuleDict`` at the backbone's ``prompt_encoder`` (``prompt_encoder.<adapter>.*``), and
one pair of hooks on the top-level model (:class:`RoutedVirtualTokens`) puts the right
tokens in front of each example, as :class:`fw_prompt.VirtualTokenInjector` does for one:

- every example alike (no routing, or one adapter for the whole batch): that adapter's
  tokens, exactly as the method alone; no prompt adapter: nothing is added;
- a mixed batch: each distinct prompt adapter present runs its source once (a P-tuning
  encoder included), the ``(adapters, P, hidden)`` stack is gathered per example by index
  (``table[group_of_row]``, no loop over examples) and put in front of the embeddings.

A batch has one sequence length, so all prompt adapters of one ``multi`` have the same
``num_virtual_tokens`` ``P``. Rows routed to the base model or to a layer-wrapping adapter
(LoRA, IA³, ...) in a batch with prompt rows get ``P`` *filler* positions in front, which
leave their outputs what they are without them:

- the filler is masked out (attention mask 0), so no real token attends to it, and the
  real tokens keep their own positions (explicit ``position_ids``: ``0..L-1`` on such rows,
  ``P..P+L-1`` behind the virtual tokens, as the method alone puts them);
- each filler position is a copy of the row's first token (its embedding, position and
  token type), so a first-token pooler (BERT's ``[CLS]``) that reads position 0 reads a
  position computed exactly as the first token is: the same query over the same unmasked
  keys, layer by layer. A last-token pooler and token-level logits read real positions;
- generation: decoding steps extend the mask with ``P`` zeros on such rows (ones on prompt
  rows) and give them their unshifted positions.

Backbones whose default positions are not ``0..L-1`` (RoBERTa's padding offset: a position
table with a padding index) or that take no ``position_ids`` refuse such batches.
"""

from __future__ import annotations

from typing import Any

import torch
from fw_prompt.inject import CACHE_MARK, prepend_virtual_tokens, virtual_token_cache
from torch import nn

from framework.errors import FieldError
from framework.forward_context import widened
from framework.virtual_inputs import (
    check_length,
    extend_positions,
    forward_kwargs,
    input_size,
    mark,
    output_cache,
    position_limit,
    prepend,
)
from fw_multi.layer import BASE, Router


class RoutedVirtualTokens:
    """Puts each example's adapter's virtual tokens in front of its input embeddings.

    ``sources``: adapter name -> its source module (``forward()`` -> ``(P, hidden)``), the
    ``nn.ModuleDict`` registered in the model. A plain object, not a closure (deep copies)."""

    def __init__(self, sources: nn.ModuleDict, router: Router) -> None:
        self.sources = sources
        self.router = router
        self.max_positions: int | None = None
        self.filler_refusal: str | None = None  # why rows without virtual tokens cannot share a batch
        self._added = 0  # virtual positions prepended by the current call (0 on decode steps)
        self._length = 0
        self._p = 0  # the virtual positions the current call's cache holds

    @property
    def num_virtual_tokens(self) -> int:
        return int(next(iter(self.sources.values())).num_virtual_tokens)

    def install(self, model: nn.Module) -> None:
        self.max_positions = position_limit(model)
        self.filler_refusal = filler_refusal(model)
        model.register_forward_pre_hook(self.before_forward, with_kwargs=True)
        model.register_forward_hook(self.after_forward, with_kwargs=True)

    # -- which tokens each row gets -----------------------------------------------------------

    def virtual(self) -> tuple[Any, torch.Tensor | None]:
        """``(None, None)``: no row gets virtual tokens; else a callable returning ``(P, hidden)``
        (every row alike) or ``(batch, P, hidden)`` (gathered per row; zeros on rows without
        a prompt adapter), and which rows have a prompt adapter (None: all)."""
        router = self.router
        uniform = router.uniform()
        if uniform is not None:
            prompts = [n for n in uniform if n in self.sources]
            if len(prompts) > 1:
                raise FieldError(
                    f"multi: prompt adapters {', '.join(prompts)} are active together, but an example takes the virtual "
                    "tokens of one prompt adapter only; activate one of them"
                )
            return (self.sources[prompts[0]] if prompts else None), None
        assert router.groups is not None and router.group_of_row is not None
        names = [name for name, _ in router.groups]
        prompts = [n for n in names if n in self.sources]
        if not prompts:
            return None, None
        group_of_row = router.group_of_row
        if len(prompts) == len(names):
            return (lambda: torch.stack([self.sources[n]() for n in prompts])[group_of_row]), None
        if self.filler_refusal:
            other = next(BASE if n is None else n for n in names if n not in self.sources)
            raise FieldError(
                f"multi: the batch routes rows to prompt adapter {prompts[0]!r} and rows to {other!r}, which has no "
                f"virtual tokens, but {self.filler_refusal}; route prompt-adapter rows and other rows in separate batches"
            )
        # table row 0: zeros for the rows without a prompt adapter (replaced by filler)
        lookup = torch.zeros(len(names), dtype=torch.long, device=group_of_row.device)
        present = [g for g, n in enumerate(names) if n in self.sources]
        lookup[torch.tensor(present, device=lookup.device)] = torch.arange(1, len(present) + 1, device=lookup.device)
        row_index = lookup[group_of_row]

        def gathered() -> torch.Tensor:
            tables = [self.sources[n]() for n in prompts]
            return torch.stack([tables[0].new_zeros(tables[0].shape), *tables])[row_index]

        return gathered, row_index > 0

    # -- hooks (fw_prompt.VirtualTokenInjector's, with the tokens chosen per row) ---------------

    def before_forward(
        self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._added = 0
        source, prompted = self.virtual()
        if source is None:
            return None
        kw = forward_kwargs(model, args, kwargs)
        if prompted is not None:
            return (), self._with_filler(model, kw, source, prompted)
        batch, length, _ = input_size(kw)
        p = self.num_virtual_tokens
        cache, past = virtual_token_cache(model, kw, p)
        prefill = past == 0
        if prefill:
            check_length(self.max_positions, p, length, "num_virtual_tokens")
            kw = prepend_virtual_tokens(source, model.get_input_embeddings(), kw, batch, p)
            mark(cache, CACHE_MARK, p)
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = prepend(kw["attention_mask"], p, 1)
            widened(model, kw["attention_mask"])
        if kw.get("position_ids") is not None:
            kw["position_ids"] = extend_positions(kw["position_ids"], p, p if prefill else 0)
        self._advance(kw, past, length, p, prefill)
        return (), kw

    def _with_filler(self, model: nn.Module, kw: dict[str, Any], source: Any, prompted: torch.Tensor) -> dict[str, Any]:
        """:meth:`before_forward` for a batch whose rows without a prompt adapter get filler."""
        batch, length, device = input_size(kw)
        p = self.num_virtual_tokens
        cache, past = virtual_token_cache(model, kw, p)
        prefill = past == 0
        real_past = past - p if past else 0  # positions of real tokens already in the cache
        positions = kw.get("position_ids")
        if positions is None:
            positions = torch.arange(real_past, real_past + length, device=device)[None]
        positions = positions.expand(batch, -1)
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, real_past + length, dtype=torch.long, device=device)
        row = prompted[:, None]
        kw["attention_mask"] = torch.cat([row.to(mask.dtype).expand(-1, p), mask], dim=1)
        widened(model, kw["attention_mask"])
        if prefill:
            check_length(self.max_positions, p, length, "num_virtual_tokens")
            embeds = kw.get("inputs_embeds")
            if embeds is None:
                embeds = model.get_input_embeddings()(kw["input_ids"])
            virtual = source().to(device=embeds.device, dtype=embeds.dtype)
            front = torch.where(row[..., None], virtual, embeds[:, :1].expand(-1, p, -1))  # filler: the first token
            kw["inputs_embeds"] = torch.cat([front, embeds], dim=1)
            kw["input_ids"] = None
            types = kw.get("token_type_ids")
            if types is not None:
                kw["token_type_ids"] = torch.cat([torch.where(row, 0, types[:, :1]).expand(-1, p), types], dim=1)
            labels = kw.get("labels")
            if labels is not None and labels.dim() == 2 and labels.shape[1] == length and not labels.is_floating_point():
                kw["labels"] = prepend(labels, p, -100)
            front_positions = torch.where(row, torch.arange(p, device=device)[None], positions[:, :1])
            kw["position_ids"] = torch.cat([front_positions.to(positions.dtype), torch.where(row, positions + p, positions)], 1)
            mark(cache, CACHE_MARK, p)
        else:
            kw["position_ids"] = torch.where(row, positions + p, positions)
        self._advance(kw, past, length, p, prefill)
        return kw

    def _advance(self, kw: dict[str, Any], past: int, length: int, p: int, prefill: bool) -> None:
        """The call's ``cache_position`` (the prompt's ``p`` positions first on prefill), and
        what :meth:`after_forward` takes off the output again."""
        added = p if prefill else 0
        if kw.get("cache_position") is not None:
            kw["cache_position"] = torch.arange(past, past + length + added, device=kw["cache_position"].device)
        self._added, self._p, self._length = added, p, length + added

    def after_forward(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        added, self._added = self._added, 0
        if self._p:
            mark(output_cache(output), CACHE_MARK, self._p)
        self._p = 0
        logits = getattr(output, "logits", None)
        if added and isinstance(logits, torch.Tensor) and logits.dim() >= 3 and logits.shape[1] == self._length:
            output.logits = logits[:, added:]
        return output


def filler_refusal(model: nn.Module) -> str | None:
    """Why rows without virtual tokens cannot get filler positions on ``model`` (None: they can)."""
    import inspect

    if "position_ids" not in inspect.signature(type(model).forward).parameters:
        return f"{type(model).__name__} takes no position_ids to keep their tokens' positions"
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == limit and module.padding_idx is not None:
            return f"{name}'s positions start past a padding index (RoBERTa-style), so filler would shift them"
    return None


__all__ = ["RoutedVirtualTokens", "filler_refusal"]
