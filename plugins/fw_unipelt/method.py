"""UniPELT: Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language
Model Tuning" (arXiv:2110.07577).

Three methods in every layer, each switched on or off per example by a learned gate
``G = mean over the sequence of sigmoid(Linear(x))`` computed from that part's input::

    attention:  q, v = W x + G_L · (alpha / r) · B A x          LoRA r=8, alpha=2    (fw_lora)
                keys/values [ G_P · prefix (10) | tokens ]      prefix, MLP 512      (fw_prefix)
    FFN:        y = FFN(x);  y + G_A · adapter(y)               Pfeiffer, factor 16  (fw_adapters)

The parts are the other plugins' classes with a gate added (:mod:`fw_unipelt.gated`),
composed by :class:`fw_compose.Compose`; the gates (:class:`fw_adapters.SequenceGate`)
average over real tokens only, so padding does not change a sequence's outputs. As in the
authors' code, each LoRA-adapted Linear has its own gate (query and value: two per layer).

UniPELT was defined for encoders. On a model trained for next-token prediction (a causal LM
that generates) a sequence mean would let position ``t`` see later tokens in training but
not while generating, so there the LoRA and adapter gates act per token
(``sigmoid(Linear(x_t))``) and the prefix gate reads the first real token of the example.

On a random-init BERT-base (12 layers, hidden 768) the trained method parameters decompose as:

    LoRA       12 × 2 × 8 · (768 + 768)                                  =    294,912
    LoRA gates 12 × 2 × (768 + 1)                                        =     18,456
    prefix     embedding 10·768 7,680 + Linear(768 → 512) 393,728
               + Linear(512 → 12·2·768) 9,455,616                        =  9,857,024
    prefix gates 12 × (768 + 1)                                          =      9,228
    adapters   12 × (768·48 + 48 + 48·768 + 768)                         =    894,528
    adapter gates 12 × (768 + 1)                                         =      9,228
    total trained                                                        = 11,083,376

A finished run stores the flat prefix (10 × 18,432 = 184,320) instead of its MLP: 1,410,672.
The gates make every part input-dependent, so nothing can be merged into the weights.

On an encoder-decoder (T5, BART) the prefix is fw_prefix's full layout (encoder
self-attention, decoder self- and cross-attention, one gate per block), and each stack's
gates read that stack's mask: the encoder's (also when ``generate`` calls the encoder
directly) and the decoder's own (none: every decoder position is real).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fw_compose import Compose
from torch import nn

from framework import forward_context
from framework.forward_context import ForwardContext
from framework.gates import SequenceGate
from framework.virtual_inputs import forward_kwargs
from fw_unipelt.gated import PREFIX_GATES, GatedLoRA, GatedPfeiffer, GatedPrefixTuning


class UniPELT(Compose):
    """UniPELT: gated LoRA + gated prefix tuning + gated Pfeiffer adapter in every layer.

    Args:
        r: LoRA rank.
        alpha: LoRA scale numerator (the update is multiplied by alpha / r).
        lora_targets: LoRA's module patterns (None: the query and value projections).
        prefix_length: prefix positions per layer.
        prefix_bottleneck: width of the prefix's reparameterization MLP.
        reduction_factor: adapter bottleneck = hidden / reduction_factor.
    """

    description = "UniPELT (Mao et al. 2022): gated LoRA + gated prefix tuning + gated Pfeiffer adapter"

    def __init__(
        self,
        r: int = 8,
        alpha: float = 2.0,
        lora_targets: list[str] | None = None,
        prefix_length: int = 10,
        prefix_bottleneck: int = 512,
        reduction_factor: float = 16.0,
    ) -> None:
        super().__init__([  # the prefix first: its gates hook the plain query projections
            GatedPrefixTuning(prefix_length=prefix_length, bottleneck=prefix_bottleneck),
            GatedLoRA(r=r, alpha=alpha, targets=lora_targets),
            GatedPfeiffer(reduction_factor=reduction_factor),
        ])
        self.r = r
        self.alpha = alpha
        self.lora_targets = lora_targets
        self.prefix_length = prefix_length
        self.prefix_bottleneck = prefix_bottleneck
        self.reduction_factor = reduction_factor

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        padding = forward_context.install(model)  # the prefix's hook writes its widened mask there
        if getattr(model.config, "is_encoder_decoder", False):
            record_stack_masks(model, padding)
        causal = next_token_model(model)
        prefix_gates = set(model.get_submodule(PREFIX_GATES).modules())
        for module in model.modules():
            if isinstance(module, SequenceGate):
                module.padding = padding
                if causal:
                    module.pooling = "first" if module in prefix_gates else "token"


def next_token_model(model: nn.Module) -> bool:
    """Whether ``model`` is trained to predict the next token (its gates must not see the future)."""
    return bool(getattr(model, "can_generate", lambda: False)())


def record_stack_masks(model: nn.Module, context: ForwardContext) -> None:
    """On an encoder-decoder, record each stack's mask in the forward context as the stack
    starts (before the stack's other pre-hooks), so its gates pool over its own positions."""
    for stack in (model.get_encoder(), model.get_decoder()):
        stack.register_forward_pre_hook(partial(_record_mask, context), with_kwargs=True, prepend=True)


def _record_mask(context: ForwardContext, stack: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    context.set_mask(forward_kwargs(stack, args, kwargs).get("attention_mask"))


__all__ = ["UniPELT"]
