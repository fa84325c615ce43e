"""Prompt/response pairs for causal-LM supervised fine-tuning.

The prompt is rendered with the tokenizer's chat template when it has one (and
``chat_template`` is on), else with ``prompt_template``. Labels are -100 on the prompt and
on padding, so the loss covers the response (and its end-of-sequence token) only.
Training batches are right-padded; ``fw predict`` batches hold the prompt alone, left-padded,
for generation.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch

from framework.data.checks import Locate, non_empty, require_columns
from framework.data.text import TextDataModule


class InstructionData(TextDataModule):
    """Instruction-tuning data (see :class:`TextDataModule` for sources and splits).

    Args:
        prompt_column: the instruction (and its input).
        response_column: the answer the model learns to write.
        chat_template: render prompts with the tokenizer's chat template when it has one.
        prompt_template: used otherwise; ``{prompt}`` is replaced by the prompt.
        system_prompt: an optional system message for chat templates.
    """

    def __init__(
        self,
        prompt_column: str = "prompt",
        response_column: str = "response",
        chat_template: bool = True,
        prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n",
        system_prompt: str | None = None,
        max_length: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(max_length=max_length, **kwargs)
        if "{prompt}" not in prompt_template:
            raise ValueError(f"data.prompt_template: must contain '{{prompt}}'; got {prompt_template!r}")
        self.prompt_column = prompt_column
        self.response_column = response_column
        self.chat_template = chat_template
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt

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
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
