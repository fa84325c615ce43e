"""Prompt/response pairs for causal-LM supervised fine-tuning.

The prompt is rendered with the tokenizer's chat template when it has one (and
``chat_template`` is on), else with ``prompt_template``. Labels are -100 on the prompt and
on padding, so the loss covers the response (and its end-of-sequence token) only.
Training batches are right-padded (or packed into one row, ``pack``); ``fw predict`` batches
hold the prompt alone, left-padded, for generation.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import datasets
import torch
from torch import nn

from framework.data.checks import Locate, non_empty, require_columns
from framework.data.text import TextDataModule, right_pad
from framework.errors import FieldError

#: transformers' mask builders that keep packed examples apart from ``position_ids`` alone
PACKED_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


class InstructionData(TextDataModule):
    """Instruction-tuning data (see :class:`TextDataModule` for sources and splits).

    Args:
        prompt_column: the instruction (and its input).
        response_column: the answer the model learns to write.
        chat_template: render prompts with the tokenizer's chat template when it has one.
        prompt_template: used otherwise; ``{prompt}`` is replaced by the prompt.
        system_prompt: an optional system message for chat templates.
        pack: padding-free training batches: the batch's examples are concatenated into ONE
            row (batch dimension 1, no pad tokens, no ``attention_mask``) with ``position_ids``
            restarting at 0 for each example and the label of each example's first token -100
            (no example predicts across a boundary). transformers keeps the examples apart
            from the ``position_ids`` alone (``masking_utils.find_packed_sequence_indices`` in
            ``create_causal_mask``, for the ``sdpa``, ``eager`` and ``flex_attention``
            implementations; ``flash_attention_2/3`` read the same ``position_ids`` as
            varlen boundaries), provided the call has no cache: the task passes
            ``use_cache=False``. Architectures whose modeling code builds its mask with
            ``create_causal_mask`` (Llama, Mistral, Qwen2, GPT-2, ... in transformers 5) qualify;
            others, and methods that prepend virtual positions (prompt tuning, P-tuning, prefix
            tuning, MAM, UniPELT), are refused at setup. Each example's loss is unchanged;
            the loss of a step is the token-weighted mean over the batch, as with padding.
            Validation, test and predict batches stay padded. Cost: ``sdpa`` and ``eager``
            attend through a dense block-diagonal mask over the whole packed row, so attention
            work grows with the square of the row (batch x mean length) while the linear layers
            save the padding; only flash-attention's varlen kernels skip the cross-example blocks.
    """

    def __init__(
        self,
        prompt_column: str = "prompt",
        response_column: str = "response",
        chat_template: bool = True,
        prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n",
        system_prompt: str | None = None,
        max_length: int = 256,
        pack: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_length, **kwargs)
        if not isinstance(pack, bool):
            raise ValueError(f"data.pack: expected true or false, got {pack!r}")
        if "{prompt}" not in prompt_template:
            raise ValueError(f"data.prompt_template: must contain '{{prompt}}'; got {prompt_template!r}")
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.chat_template = chat_template
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.pack = pack

    def _uses_chat_template(self) -> bool:
        return self.chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def render_prompt(self, prompt: str) -> str:
        if self._uses_chat_template():
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            messages.append({"role": "user", "content": prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.prompt_template.format(prompt=prompt)

    def check_rows(self, data: datasets.Dataset, where: str, locate: Locate) -> None:
        require_columns(data, (self.prompt_column, self.response_column), where, "data.prompt_column / data.response_column")
        non_empty(data, self.prompt_column, "prompt", where, locate)
        non_empty(data, self.response_column, "response", where, locate)

    def encode(self, split: str, data: datasets.Dataset) -> datasets.Dataset:
        require_columns(data, (self.prompt_column, self.response_column), f"data: the {split} split",
                        "data.prompt_column / data.response_column")
        tok = self.tokenizer
        special = not self._uses_chat_template()  # a chat template already writes BOS
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []

        def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
            prompts = [self.render_prompt(p) for p in batch[self.prompt_column]]
            prompt_ids = tok(prompts, add_special_tokens=special)["input_ids"]
            response_ids = tok(batch[self.response_column], add_special_tokens=False)["input_ids"]
            out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "prompt_input_ids": [], "reference": []}
            for p, r, ref in zip(prompt_ids, response_ids, batch[self.response_column]):
                p = p[-(self.max_length - 1) :]  # keep at least one response token
                ids = (p + r + eos)[: self.max_length]
                out["input_ids"].append(ids)
                out["labels"].append([-100] * len(p) + ids[len(p) :])
                out["prompt_input_ids"].append(p)
                out["reference"].append(ref)
            return out

        return self.tokenized(split, data, tokenize)

    def collate(self, split: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        if split == "predict":
            width = max(len(r["prompt_input_ids"]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):  # left padding: generation continues from the right edge
                n = len(r["prompt_input_ids"])
                ids[i, width - n :] = torch.as_tensor(r["prompt_input_ids"])
                mask[i, width - n :] = 1
            return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "reference": [r["reference"] for r in rows]}
        if split == "train" and self.pack:
            return packed(rows)
        return {"input_ids": right_pad([r["input_ids"] for r in rows], pad),
                "attention_mask": right_pad([[1] * len(r["input_ids"]) for r in rows], 0),
                "labels": right_pad([r["labels"] for r in rows], -100)}

    def check_packing(self, model: nn.Module, method: Any) -> None:
        """Refuse ``pack`` where the packed examples would not stay apart (called at setup)."""
        if not self.pack:
            return
        if prepends_positions(method):
            raise FieldError(
                f"data.pack: {type(method).__name__} prepends virtual positions (prompt / prefix "
                "tokens) that packed examples would share; set data.pack: false"
            )
        if not separates_packed(model):
            base = unwrapped(model)
            kind = getattr(getattr(base, "config", None), "model_type", "?")
            raise FieldError(
                f"data.pack: {type(base).__name__} ({kind}) does not build its attention mask "
                "with transformers' create_causal_mask, so packed examples would attend to each other; "
                "set data.pack: false"
            )


def packed(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The rows concatenated into one row (batch dimension 1) without padding: ``position_ids``
    restart at 0 for each example and the first label of each example is -100, so (labels
    being shifted: position t predicts label t + 1) no position predicts the next example's
    first token. No ``attention_mask``: transformers finds the boundaries in ``position_ids``."""
    labels = [torch.as_tensor(r["labels"]).clone() for r in rows]
    for lab in labels:
        lab[0] = -100  # an example's first token is never predicted (even with an empty prompt)
    return {
        "input_ids": torch.cat([torch.as_tensor(r["input_ids"]) for r in rows])[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat([torch.arange(len(r["input_ids"])) for r in rows])[None],
    }


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def separates_packed(model: nn.Module) -> bool:
    """Whether the model takes ``position_ids`` and its modeling code builds the causal mask
    with transformers' mask builders (which detect packed examples in ``position_ids``)."""
    base = unwrapped(model)
    module = sys.modules.get(type(base).__module__)
    takes_positions = "position_ids" in inspect.signature(base.forward).parameters
    return takes_positions and any(hasattr(module, name) for name in PACKED_MASK_BUILDERS)


def prepends_positions(method: Any) -> bool:
    """Whether the method (or a part of a composed one) puts virtual positions in front of
    the input: prompt tokens (``num_virtual_tokens``) or a key/value prefix (``prefix_length``)."""
    if method is None:
        return False
    if any(getattr(method, name, 0) for name in ("num_virtual_tokens", "prefix_length")):
        return True
    return any(prepends_positions(part) for part in getattr(method, "methods", None) or ())
