"""Sequence-to-sequence fine-tuning of encoder-decoders (T5, Flan-T5, mT5, BART, ...).

The encoder reads the source; the decoder is trained by teacher forcing to write the target,
with the loss on target tokens only (padding carries -100). Validation and test report the
teacher-forced token loss and perplexity and, with ``generate_in_eval`` (the default), write
each source's output with ``generate`` and score it against the reference: ROUGE-1/2/L
(F-measure, torchmetrics) and exact match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.text.rouge import ROUGEScore

from framework.tasks.base import Task
from framework.tasks.causal_lm import Perplexity
from framework.tasks.lm_loss import check_loss_options, token_loss
from framework.validation import positive_int


class Rouge(ROUGEScore):
    """ROUGE-1/2/L F-measures only, named ``rouge1``, ``rouge2``, ``rougeL``."""

    def __init__(self) -> None:
        super().__init__(rouge_keys=("rouge1", "rouge2", "rougeL"))

    def compute(self) -> dict[str, torch.Tensor]:
        scores = super().compute()
        return {k.removesuffix("_fmeasure"): v for k, v in scores.items() if k.endswith("_fmeasure")}


class Seq2SeqLM(Task):
    """Encoder-decoder generation: source in, target out (summaries, headlines, translation).

    Args:
        max_new_tokens: how many tokens ``generate`` writes per source (evaluation, predict).
        num_beams: beam search width (1: greedy).
        generate_in_eval: also generate during validation/test and report ROUGE-1/2/L and
            exact match (costs one ``generate`` per batch); off: loss and perplexity only.
        chunked_loss: compute the teacher-forced loss without materialising the
            ``batch x target length x vocab`` logits: the decoder's final hidden states are
            projected onto the vocabulary at the labelled (non-padding) positions only,
            ``loss_chunk_size`` positions at a time (as ``CausalLM``'s, see
            framework/tasks/lm_loss.py). T5, mT5 and BART (whose ``final_logits_bias`` is folded
            into the head); other architectures and heads that are not a plain ``nn.Linear``
            take the standard path. Off: the standard path always.
        loss_chunk_size: positions per chunk of the chunked loss.
    """

    auto_class = "AutoModelForSeq2SeqLM"
    train_head_default = False  # the LM head is tied to the shared embeddings (T5, BART)
    peft_task_type = "SEQ_2_SEQ_LM"
    data_class = "Seq2SeqData"

    def __init__(
        self,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        generate_in_eval: bool = True,
        chunked_loss: bool = True,
        loss_chunk_size: int = 1024,
    ) -> None:
        positive_int(max_new_tokens, "model.task.max_new_tokens")
        positive_int(num_beams, "model.task.num_beams")
        check_loss_options(chunked_loss, loss_chunk_size)
        self.chunked_loss = chunked_loss
        self.loss_chunk_size = loss_chunk_size
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.generate_in_eval = generate_in_eval
        self.tokenizer: Any = None

    def bind_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer  # to decode what evaluation generates

    def metrics(self) -> MetricCollection:
        metrics: dict[str, Any] = {"perplexity": Perplexity(), "token_loss": MeanMetric()}
        if self.generate_in_eval:
            metrics |= {"rouge": Rouge(), "exact_match": MeanMetric()}
        return MetricCollection(metrics)

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        labels = batch["labels"]
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels),
        }
        loss = token_loss(model, inputs, labels, self.loss_chunk_size if self.chunked_loss else None)
        generated = None
        if not model.training and self.generate_in_eval and "reference" in batch:
            generated = self.generate(model, batch["input_ids"], batch["attention_mask"])
        return loss, (loss.detach(), (labels != -100).sum(), generated)

    def update_metrics(self, metrics: MetricCollection, batch: dict[str, Any], outputs: Any) -> None:
        loss, tokens, generated = outputs
        metrics["perplexity"].update(loss, weight=tokens)
        metrics["token_loss"].update(loss, weight=tokens)
        if generated is not None and "rouge" in metrics:
            references = [r.strip() for r in batch["reference"]]
            metrics["rouge"].update(generated, references)
            exact = torch.tensor([float(g == r) for g, r in zip(generated, references)])
            metrics["exact_match"].update(exact)

    @torch.no_grad()
    def generate(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        if self.tokenizer is None:
            raise RuntimeError("Seq2SeqLM.generate: no tokenizer bound (the PeftModule binds the backbone's)")
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def predict(self, model: nn.Module, batch: dict[str, Any], tokenizer: Any) -> list[dict[str, Any]]:
        self.bind_tokenizer(tokenizer)
        generated = self.generate(model, batch["input_ids"], batch["attention_mask"])
        records = []
        for i, text in enumerate(generated):
            record: dict[str, Any] = {"source": batch["source"][i], "generated": text}
            if "reference" in batch:
                record["reference"] = batch["reference"][i]
            records.append(record)
        return records
