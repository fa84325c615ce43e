"""Prefix tuning: Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021,
arXiv:2101.00190).

Every attention layer of the frozen model gets ``P`` trainable key and value vectors in
front of the ones its tokens produce; the tokens attend to them as to an invisible prefix::

    layer l:   keys    [ Pk_l (P) | W_k h(x1) ... W_k h(xn) ]
               values  [ Pv_l (P) | W_v h(x1) ... W_v h(xn) ]      queries: the tokens only

Optimising the prefix directly is unstable, so during training it is reparameterized by an
MLP over a small embedding (Li & Liang)::

    P × hidden ─► Linear(hidden, bottleneck) ─► tanh ─► Linear(bottleneck, layers · 2 · kv_width)
                                                               │
                            flat prefix (P, layers · 2 · kv_width) ─► split into Pk_l, Pv_l

After training only the flat prefix is needed: ``stored_state_dict`` returns that one tensor
(``prefix_encoder.prompt_embeddings``, Hugging Face PEFT's layout), which is what
``stored_params`` counts; ``method_params`` counts what trains (embedding + MLP). On BERT-base
with ``P = 30`` and a 512 bottleneck: 9,872,384 trained, 552,960 stored. ``kv_width`` is the
key/value width (smaller than the hidden size under grouped-query attention).

The prefix reaches the layers through transformers' key/value cache (architecture-specific
shapes in :mod:`fw_prefix.shapes`); decoders generate with it, BERT-family encoders classify
with it. Gradient checkpointing is refused, and the method cannot be merged into the weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.method import PeftAdapter, PeftMethod, load_stored_output
from framework.peft_compat import VIRTUAL_TOKEN_FIELDS, refuse_unknown_options, virtual_token_adapter, virtual_token_weights
from framework.validation import positive_int
from fw_prefix.encoder import PrefixEncoder
from fw_prefix.inject import MODULE_NAME, add_prefix

#: the key under which the flat prefix is stored after training
STORED_KEY = f"{MODULE_NAME}.prompt_embeddings"


class PrefixTuning(PeftMethod):
    """Trainable key/value prefixes in every attention layer (Li & Liang 2021).

    Args:
        prefix_length: number ``P`` of prefix positions per layer (> 0).
        reparameterize: train the prefix through an embedding + MLP (recommended); false
            trains the flat prefix directly (then trained = stored).
        bottleneck: hidden width of the reparameterization MLP.
    """

    description = "Prefix tuning: trainable key/value prefixes in every layer (MLP-reparameterized); stores the flat prefix"
    peft_type = "PREFIX_TUNING"
    stored_key = STORED_KEY

    def __init__(self, prefix_length: int = 30, reparameterize: bool = True, bottleneck: int = 512) -> None:
        positive_int(prefix_length, "prefix_length")
        positive_int(bottleneck, "bottleneck")
        self.prefix_length = prefix_length
        self.reparameterize = reparameterize
        self.bottleneck = bottleneck

    def attach(self, model: nn.Module) -> None:
        encoder = add_prefix(model, self.prefix_length, self.bottleneck if self.reparameterize else None)
        s = encoder.shape
        trained = sum(p.numel() for p in encoder.parameters())
        stored = self.prefix_length * s.flat_width
        how = f"MLP bottleneck {self.bottleneck}" if self.reparameterize else "no reparameterization"
        self.record(
            MODULE_NAME,
            f"prefix tuning: {self.prefix_length} positions x {s.num_layers} layers x 2 x {s.kv_width} "
            f"({how}; +{trained:,} trained, {stored:,} stored)",
        )

    @staticmethod
    def prefix_encoder(model: nn.Module) -> PrefixEncoder:
        return model.get_submodule(MODULE_NAME)

    def stored_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The flat prefix ``(P, layers · 2 · kv_width)`` instead of its encoder, plus the trainable head."""
        stored = {n: t for n, t in self.trainable_state_dict(model).items() if not n.startswith(MODULE_NAME + ".")}
        with torch.no_grad():
            stored[STORED_KEY] = self.prefix_encoder(model).flat().detach().clone()
        return stored

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load what :meth:`stored_state_dict` returned, for inference: the encoder is bypassed
        (and frozen) and serves the stored prefix."""
        load_stored_output(self, model, state_dict, strict, STORED_KEY, self.prefix_encoder(model))

    # -- Hugging Face PEFT's format: the flat prefix as prompt_embeddings ----------------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        s = self.prefix_encoder(model).shape
        return virtual_token_adapter(self, model, {
            "peft_type": self.peft_type, "token_dim": s.kv_width, "num_attention_heads": s.num_kv_heads,
            "num_layers": s.num_layers, "prefix_projection": self.reparameterize, "encoder_hidden_size": self.bottleneck,
        })

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unknown_options(config, VIRTUAL_TOKEN_FIELDS | {"prefix_projection", "encoder_hidden_size"}, cls.__name__)
        return {
            "prefix_length": int(config["num_virtual_tokens"]),
            "reparameterize": bool(config.get("prefix_projection", False)),
            "bottleneck": int(config.get("encoder_hidden_size") or 512),
        }

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return virtual_token_weights(self, weights)


__all__ = ["PrefixTuning", "STORED_KEY"]
