"""P-tuning: GPT Understands, Too (Liu et al., 2021, arXiv:2103.10385).

Like prompt tuning, ``P`` virtual tokens go in front of the input embeddings of a frozen
model; unlike it, their embeddings are not trained directly but produced by a small prompt
encoder, which couples the tokens and makes optimisation steadier::

    P trainable inputs ──► bi-LSTM (optional) ──► MLP ──► v1 .. vP ─┐
                                                                     ▼
                             [ v1 .. vP | e(x1) e(x2) ... ]  →  frozen transformer

During training the encoder's weights are what learns (and what a checkpoint keeps, so a
run can resume). After training only its output, ``P × hidden`` numbers, is needed:
``stored_state_dict`` returns that one tensor (``prompt_encoder.prompt_embeddings``), as
Hugging Face PEFT saves it. Attention mask, token-type ids and token-level labels are
extended, and the virtual positions are dropped from token-level logits, exactly as for
prompt tuning (:class:`fw_prompt.VirtualTokenInjector`). On an encoder-decoder (T5, BART,
...) the virtual tokens go in front of the encoder's input only and the encoder mask (also
the cross-attention mask) is widened, as for prompt tuning
(:class:`fw_prompt.EncoderVirtualTokenInjector`). Cannot be merged into the weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from fw_prompt import MODULE_NAME, add_virtual_tokens, virtual_token_peft_weights
from torch import nn

from framework.method import PeftAdapter, PeftMethod, load_stored_output
from framework.peft_compat import VIRTUAL_TOKEN_FIELDS, refuse_unknown_options, virtual_token_adapter
from framework.validation import one_of, optional_positive_int, positive_int, probability
from fw_ptuning.encoder import PromptEncoder

#: the key under which the encoder's output is stored after training
STORED_KEY = f"{MODULE_NAME}.prompt_embeddings"


class PTuning(PeftMethod):
    """Virtual tokens produced by a trainable prompt encoder (MLP or bi-LSTM + MLP).

    Args:
        num_virtual_tokens: length ``P`` of the prompt (> 0).
        encoder: ``mlp`` (two layers, ReLU) or ``lstm`` (bidirectional LSTM, then the MLP).
        encoder_hidden_size: the encoder's width ``h``; None: the backbone's hidden size.
        encoder_num_layers: LSTM layers (``encoder: lstm`` only).
        encoder_dropout: dropout between LSTM layers (``encoder: lstm`` only).
    """

    description = "P-tuning: virtual tokens from a trainable MLP/LSTM prompt encoder; stores only its output"
    peft_type = "P_TUNING"
    stored_key = STORED_KEY

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder: Literal["mlp", "lstm"] = "mlp",
        encoder_hidden_size: int | None = None,
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
    ) -> None:
        positive_int(num_virtual_tokens, "num_virtual_tokens")
        one_of(encoder, ("mlp", "lstm"), "encoder")
        optional_positive_int(encoder_hidden_size, "encoder_hidden_size")
        positive_int(encoder_num_layers, "encoder_num_layers")
        probability(encoder_dropout, "encoder_dropout")
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder = encoder
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_num_layers = encoder_num_layers
        self.encoder_dropout = encoder_dropout

    def attach(self, model: nn.Module) -> None:
        add_virtual_tokens(model, self.virtual_token_source(model), "P-tuning")

    def virtual_token_source(self, model: nn.Module) -> PromptEncoder:
        """The prompt encoder for ``model``, not yet attached (``fw_multi`` holds several)."""
        words = model.get_input_embeddings().weight
        dim = words.shape[1]
        prompt_encoder = PromptEncoder(
            self.num_virtual_tokens, dim, self.encoder_hidden_size or dim, self.encoder,
            self.encoder_num_layers, self.encoder_dropout, device=words.device,
        )
        size = sum(p.numel() for p in prompt_encoder.parameters())
        self.record(
            MODULE_NAME,
            f"P-tuning: {self.num_virtual_tokens} virtual tokens from a {self.encoder} encoder "
            f"(+{size:,} trained, {self.num_virtual_tokens * dim:,} stored)",
        )
        return prompt_encoder

    @staticmethod
    def prompt_encoder(model: nn.Module) -> PromptEncoder:
        return model.get_submodule(MODULE_NAME)

    def stored_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The encoder's output (``P × hidden``) instead of the encoder, plus the trainable head."""
        encoder = self.prompt_encoder(model)
        stored = {n: t for n, t in self.trainable_state_dict(model).items() if not n.startswith(MODULE_NAME + ".")}
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            stored[STORED_KEY] = encoder().detach().clone()
        encoder.train(was_training)
        return stored

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load what :meth:`stored_state_dict` returned, for inference: the encoder is bypassed
        (and frozen) and serves the stored embeddings."""
        load_stored_output(self, model, state_dict, strict, STORED_KEY, self.prompt_encoder(model))

    # -- Hugging Face PEFT's format: the encoder's output as prompt_embeddings -----------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        return virtual_token_adapter(self, model, {
            "peft_type": self.peft_type, "encoder_reparameterization_type": self.encoder.upper(),
            "encoder_hidden_size": self.encoder_hidden_size or model.get_input_embeddings().weight.shape[1],
            "encoder_num_layers": self.encoder_num_layers, "encoder_dropout": self.encoder_dropout,
        })

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        encoder_fields = {"encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"}
        refuse_unknown_options(config, VIRTUAL_TOKEN_FIELDS | encoder_fields, cls.__name__)
        kind = str(config.get("encoder_reparameterization_type", "MLP")).lower()
        return {
            "num_virtual_tokens": int(config["num_virtual_tokens"]), "encoder": "lstm" if kind == "lstm" else "mlp",
            "encoder_hidden_size": config.get("encoder_hidden_size"),
            "encoder_num_layers": int(config.get("encoder_num_layers") or 2),
            "encoder_dropout": float(config.get("encoder_dropout") or 0.0),
        }

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return virtual_token_peft_weights(self, model, weights)


__all__ = ["PTuning", "STORED_KEY"]
