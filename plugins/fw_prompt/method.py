"""Prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021,
arXiv:2104.08691).

The whole backbone stays frozen; ``P`` trainable "virtual token" embeddings are put in front
of the input embeddings of every sequence::

      input ids      x1   x2   x3  ...               (frozen word embeddings)
                      │    │    │
    ┌────┬────┬────┐ ┌▼───┬▼───┬▼───┐
    │ v1 │ .. │ vP │ │ e1 │ e2 │ e3 │ ...   →  frozen transformer  →  outputs at x1 x2 x3 ...
    └────┴────┴────┘ └────┴────┴────┘
      P × hidden, trainable            mask: P ones in front; the P virtual positions
      (all that is trained and stored) are dropped from token-level logits
                                       (encoder-decoders: the encoder's input, see below)

On an encoder-decoder (T5, BART, ...) the virtual tokens go in front of the *encoder's*
input only, as in Lester et al.'s T5 experiments and PEFT's ``SEQ_2_SEQ_LM``: the encoder
mask (also the decoder's cross-attention mask) gets the ``P`` ones, the decoder input, the
labels and the decoder's logits are unchanged (:class:`fw_prompt.EncoderVirtualTokenInjector`).

The method trains (and stores) ``P · hidden`` parameters: 15,360 for 20 tokens on BERT-base.
Lester et al. initialise the prompt from sampled vocabulary embeddings or from the
embeddings of words related to the task; both are offered (``init: vocab`` / ``text``), as
is a random start. Prompt tuning needs a higher learning rate than LoRA (around 1e-2 to
3e-1 in the paper) and cannot be merged into the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from framework.method import PeftAdapter, PeftMethod
from framework.peft_compat import VIRTUAL_TOKEN_FIELDS, refuse_unknown_options, virtual_token_adapter, virtual_token_weights
from framework.validation import InvalidArgument, one_of, positive_int
from fw_prompt.embedding import PromptEmbedding
from fw_prompt.inject import MODULE_NAME, add_virtual_tokens, is_encoder_decoder

if TYPE_CHECKING:  # pragma: no cover
    from framework.prepare import PrepareContext


class PromptTuning(PeftMethod):
    """Trainable virtual-token embeddings in front of the input (Lester et al. 2021).

    Args:
        num_virtual_tokens: length ``P`` of the soft prompt (> 0).
        init: ``vocab`` (embeddings of sampled vocabulary tokens), ``text`` (embeddings of
            ``init_text``'s tokens, repeated or cut to ``P``) or ``random`` (normal, at the
            scale of the vocabulary embeddings).
        init_text: the text for ``init: text`` (e.g. a task description); tokenized with the
            backbone's tokenizer when fitting starts.
    """

    description = "Prompt tuning: trainable virtual-token embeddings prepended to the input"
    peft_type = "PROMPT_TUNING"
    #: where the (P, hidden) table is in this method's stored state dict
    stored_key = f"{MODULE_NAME}.embedding.weight"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init: Literal["vocab", "text", "random"] = "vocab",
        init_text: str | None = None,
    ) -> None:
        positive_int(num_virtual_tokens, "num_virtual_tokens")
        one_of(init, ("vocab", "text", "random"), "init")
        if init == "text" and not init_text:
            raise InvalidArgument("init_text", "required with init: text (e.g. 'Classify the sentiment of this review')")
        self.num_virtual_tokens = num_virtual_tokens
        self.init = init
        self.init_text = init_text

    def attach(self, model: nn.Module) -> None:
        add_virtual_tokens(model, self.virtual_token_source(model), "prompt tuning")

    def virtual_token_source(self, model: nn.Module) -> PromptEmbedding:
        """The ``(P, hidden)`` table for ``model``, not yet attached (``fw_multi`` holds several)."""
        table = PromptEmbedding(self.num_virtual_tokens, model.get_input_embeddings(), self.init)
        size = table.embedding.weight.numel()
        self.record(MODULE_NAME, f"prompt tuning: {self.num_virtual_tokens} virtual tokens (+{size:,})")
        return table

    def prepare(self, context: PrepareContext) -> None:
        """``init: text``: copy the embeddings of the text's tokens (once, before the first fit)."""
        table = context.model.get_submodule(MODULE_NAME)
        if self.init != "text" or getattr(table, "initialised_from_text", False):
            return
        ids = context.tokenizer()(self.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidArgument("init_text", f"{self.init_text!r} has no tokens")
        table.init_from_token_ids(list(ids), context.model.get_input_embeddings())
        table.initialised_from_text = True

    # -- Hugging Face PEFT's format: one (P, hidden) tensor, prompt_embeddings ----------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        return virtual_token_adapter(self, model, {"peft_type": self.peft_type})

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unknown_options(config, VIRTUAL_TOKEN_FIELDS, cls.__name__)
        return {"num_virtual_tokens": int(config["num_virtual_tokens"]), "init": "random"}

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return virtual_token_peft_weights(self, model, weights)


def virtual_token_peft_weights(method: Any, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's tensors as a virtual-token method's stored form (prompt tuning, P-tuning).

    PEFT builds its ``SEQ_2_SEQ_LM`` prompt with ``num_transformer_submodules`` (2 unless set)
    times ``P`` rows and feeds only the first ``P`` to the encoder; for prompt tuning and
    P-tuning the decoder's rows are never read. On an encoder-decoder fw keeps those first ``P``
    rows (fw's own export writes ``num_transformer_submodules: 1`` and exactly ``P`` rows).
    """
    table = weights.get("prompt_embeddings")
    p = int(method.num_virtual_tokens)
    if (
        table is not None and is_encoder_decoder(model) and table.dim() == 2
        and table.shape[0] > p and table.shape[0] % p == 0
    ):
        weights = {**weights, "prompt_embeddings": table[:p]}
    return virtual_token_weights(method, weights)


__all__ = ["PromptTuning", "virtual_token_peft_weights"]
