"""Causal-LM supervised fine-tuning on prompt/response pairs; loss on response tokens only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from framework.tasks.base import Task
from framework.tasks.lm_loss import check_loss_options, token_loss


class Perplexity(MeanMetric):
    """exp of the token-weighted mean NLL (torchmetrics' MeanMetric does the aggregation)."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


class CausalLM(Task):
    """Supervised fine-tuning of a decoder: the labels mask the prompt (and padding) with -100.

    Args:
        max_new_tokens: how many tokens ``fw predict`` generates per prompt.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus sampling threshold (with ``do_sample``).
        chunked_loss: compute the training and evaluation loss without materialising the
            ``batch x length x vocab`` logits: the backbone runs without its LM head, the head
            is applied to the labelled (response) positions only and the cross-entropy is
            computed ``loss_chunk_size`` positions at a time, its backward recomputing each
            chunk's logits (framework/tasks/lm_loss.py). Same loss and gradients as the
            standard path (to float rounding). Architectures that transform the logits after
            the head (softcapping, scaling: Gemma 2/3, Cohere, Granite, ...), model types not
            known to have a plain head, and heads that are not a plain ``nn.Linear``
            (an adapter on the head, quantised or sharded) take the standard path. Off: the
            standard path always.
        loss_chunk_size: positions per chunk of the chunked loss (peak extra memory about
            ``2 x loss_chunk_size x vocab`` float32 numbers).
    """

    auto_class = "AutoModelForCausalLM"
    train_head_default = False  # the LM head is usually tied to the input embeddings
    peft_task_type = "CAUSAL_LM"
    data_class = "InstructionData"

    def __init__(
        self,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        chunked_loss: bool = True,
        loss_chunk_size: int = 1024,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"model.task.max_new_tokens: expected >= 1, got {max_new_tokens}")
        check_loss_options(chunked_loss, loss_chunk_size)
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.chunked_loss = chunked_loss
        self.loss_chunk_size = loss_chunk_size

    def metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity(), "token_loss": MeanMetric()})

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if "position_ids" in batch:  # packed examples (data.pack): transformers separates them only without a cache
            inputs["use_cache"] = False
        # next-token prediction: position t predicts token t+1; prompt and padding carry -100
        labels = batch["labels"][:, 1:]
        loss = token_loss(model, inputs, labels, self.loss_chunk_size if self.chunked_loss else None, shift=True)
        return loss, (loss.detach(), (labels != -100).sum())

    def update_metrics(self, metrics: MetricCollection, batch: dict[str, torch.Tensor], outputs: Any) -> None:
        loss, tokens = outputs
        metrics.update(loss, weight=tokens)

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        generated = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature if self.do_sample else None,
            top_p=self.top_p if self.do_sample else None,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = generated[:, prompt_ids.shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        records = []
        for i, text in enumerate(texts):
            record: dict[str, Any] = {"generated": text.strip()}
            if "reference" in batch:
                record["reference"] = batch["reference"][i]
            records.append(record)
        return records
