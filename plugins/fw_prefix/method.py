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

import torch
from torch import nn

from framework.method import PeftMethod, copy_parameters
from fw_prefix.encoder import PrefixEncoder
from fw_prefix.inject import MODULE_NAME, add_prefix

FIELD = "model.method.init_args"
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

    def __init__(self, prefix_length: int = 30, reparameterize: bool = True, bottleneck: int = 512) -> None:
        if not isinstance(prefix_length, int) or prefix_length <= 0:
            raise ValueError(f"{FIELD}.prefix_length: expected a positive integer, got {prefix_length!r}")
        if not isinstance(bottleneck, int) or bottleneck <= 0:
            raise ValueError(f"{FIELD}.bottleneck: expected a positive integer, got {bottleneck!r}")
        self.prefix_length = prefix_length
        self.reparameterize = reparameterize
        self.bottleneck = bottleneck

    def attach(self, model: nn.Module) -> None:
        encoder = add_prefix(model, self.prefix_length, self.bottleneck if self.reparameterize else None, FIELD)
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

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`stored_state_dict` returned, for inference: the encoder is bypassed
        (and frozen) and serves the stored prefix."""
        state = dict(state_dict)
        if STORED_KEY not in state:
            raise KeyError(f"PrefixTuning: '{STORED_KEY}' is missing from the stored weights")
        encoder = self.prefix_encoder(model)
        encoder.use_stored(state.pop(STORED_KEY))
        encoder.requires_grad_(False)
        copy_parameters(model, state, type(self).__name__)


__all__ = ["PrefixTuning", "STORED_KEY"]
