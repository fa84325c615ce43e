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

Encoder-decoders (T5, BART). Li & Liang put a prefix on every attention of the model: here
every encoder layer's self-attention (``encoder_prefix``), every decoder layer's
self-attention, and every decoder layer's cross-attention (``cross_prefix``), each with its
own ``P`` keys and values. A cross prefix is ``P`` extra positions in front of the encoder
output's keys and values, so the cross-attention mask gets ``P`` ones in front; the encoder
output itself stays as long as the source (how the hooks do it: :mod:`fw_prefix.inject`).
The flat prefix's columns, per position, in this order::

    encoder layer 0 .. E-1:   k, v                    E · 2 · kv_width    (encoder_prefix)
    decoder layer 0 .. D-1:   self k, self v,         D · 2 · kv_width
                              cross k, cross v      + D · 2 · kv_width    (cross_prefix)

so ``stored = P · (E · 2 + D · 4) · kv_width`` with both on, and the MLP's output width is
that per-position width. On T5-small (E = D = 6, kv_width 512) with ``P = 30`` and a 512
bottleneck: 18,432 columns, 552,960 stored, 9,733,632 trained (embedding 30·512 +
Linear(512 → 512) 262,656 + Linear(512 → 18,432) 9,455,616).

Hugging Face PEFT 0.21.2's ``SEQ_2_SEQ_LM`` prefix reaches decoder self-attention only: the
encoder reads no cache, and PEFT empties the cross-attention cache it builds. With
``encoder_prefix: false`` and ``cross_prefix: false`` fw computes exactly that (``D · 2 ·
kv_width`` columns), and the PEFT export and import translate the layout (see
:func:`to_peft_seq2seq` and :func:`from_peft_seq2seq`); with either on there is no PEFT form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.method import ExportNotSupportedError, PeftAdapter, PeftMethod, load_stored_output
from framework.peft_compat import VIRTUAL_TOKEN_FIELDS, refuse_unknown_options, virtual_token_adapter, virtual_token_weights
from framework.validation import positive_int
from fw_prefix.encoder import PrefixEncoder
from fw_prefix.inject import MODULE_NAME, add_prefix, check_block_flags
from fw_prefix.shapes import Seq2SeqLayout

#: the key under which the flat prefix is stored after training
STORED_KEY = f"{MODULE_NAME}.prompt_embeddings"


class PrefixTuning(PeftMethod):
    """Trainable key/value prefixes in every attention layer (Li & Liang 2021).

    Args:
        prefix_length: number ``P`` of prefix positions per layer (> 0).
        reparameterize: train the prefix through an embedding + MLP (recommended); false
            trains the flat prefix directly (then trained = stored).
        bottleneck: hidden width of the reparameterization MLP.
        encoder_prefix: on encoder-decoders, also prefix every encoder layer's self-attention
            (Li & Liang); false leaves the encoder as it is, as Hugging Face PEFT does.
        cross_prefix: on encoder-decoders, also prefix every decoder layer's cross-attention;
            false: decoder self-attention only. Both false is PEFT's ``SEQ_2_SEQ_LM`` prefix
            (the only layout with a PEFT form). Decoder-only and encoder-only backbones take
            neither (leave them true).
    """

    description = "Prefix tuning: trainable key/value prefixes in every layer (MLP-reparameterized); stores the flat prefix"
    peft_type = "PREFIX_TUNING"
    stored_key = STORED_KEY

    def __init__(
        self,
        prefix_length: int = 30,
        reparameterize: bool = True,
        bottleneck: int = 512,
        encoder_prefix: bool = True,
        cross_prefix: bool = True,
    ) -> None:
        positive_int(prefix_length, "prefix_length")
        positive_int(bottleneck, "bottleneck")
        check_block_flags(encoder_prefix, cross_prefix)
        self.prefix_length = prefix_length
        self.reparameterize = reparameterize
        self.bottleneck = bottleneck
        self.encoder_prefix = encoder_prefix
        self.cross_prefix = cross_prefix

    def attach(self, model: nn.Module) -> None:
        encoder = add_prefix(
            model, self.prefix_length, self.bottleneck if self.reparameterize else None,
            encoder_prefix=self.encoder_prefix, cross_prefix=self.cross_prefix,
        )
        s = encoder.shape
        trained = sum(p.numel() for p in encoder.parameters())
        stored = self.prefix_length * s.flat_width
        how = f"MLP bottleneck {self.bottleneck}" if self.reparameterize else "no reparameterization"
        blocks = f"{s.num_layers} layers" if encoder.layout is None else f"{s.num_layers} attention blocks ({encoder.layout.describe()})"
        self.record(
            MODULE_NAME,
            f"prefix tuning: {self.prefix_length} positions x {blocks} x 2 x {s.kv_width} "
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
        encoder = self.prefix_encoder(model)
        s, layout = encoder.shape, encoder.layout
        config = {
            "peft_type": self.peft_type, "token_dim": s.kv_width, "num_attention_heads": s.num_kv_heads,
            "num_layers": s.num_layers, "prefix_projection": self.reparameterize, "encoder_hidden_size": self.bottleneck,
        }
        if layout is None:
            return virtual_token_adapter(self, model, config)
        if layout.encoder or layout.cross:
            raise ExportNotSupportedError(
                "prefix tuning: Hugging Face PEFT's SEQ_2_SEQ_LM prefix reaches decoder self-attention only (its "
                "encoder reads no cache and it empties the cross-attention cache), so this prefix "
                f"({layout.describe()}) has no PEFT form; train with encoder_prefix: false and cross_prefix: false "
                "for a PEFT export, or export with --format fw"
            )
        adapter = virtual_token_adapter(self, model, {**config, "num_layers": 2 * layout.decoder_layers,
                                                      "num_transformer_submodules": 2})
        adapter.weights["prompt_embeddings"] = to_peft_seq2seq(adapter.weights["prompt_embeddings"], layout, s.kv_width)
        return adapter

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unknown_options(config, VIRTUAL_TOKEN_FIELDS | {"prefix_projection", "encoder_hidden_size"}, cls.__name__)
        args: dict[str, Any] = {
            "prefix_length": int(config["num_virtual_tokens"]),
            "reparameterize": bool(config.get("prefix_projection", False)),
            "bottleneck": int(config.get("encoder_hidden_size") or 512),
        }
        if config.get("num_transformer_submodules") == 2:  # SEQ_2_SEQ_LM: decoder self-attention only
            args |= {"encoder_prefix": False, "cross_prefix": False}
        return args

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stored = virtual_token_weights(self, weights)
        encoder = self.prefix_encoder(model)
        if encoder.layout is not None and STORED_KEY in stored:
            stored[STORED_KEY] = from_peft_seq2seq(stored[STORED_KEY], encoder.layout, encoder.shape.kv_width)
        return stored


# -- Hugging Face PEFT's SEQ_2_SEQ_LM layout ---------------------------------------------------
#
# PEFT 0.21.2 views its prompt_embeddings (P, N · 2 · kv_width) as 2N blocks of kv_width
# (N = its config's num_layers), concatenates the blocks with themselves (its
# num_transformer_submodules = 2), and gives decoder layer i the blocks 4i .. 4i+3 of that
# doubled list: self-attention key, value, then cross-attention key, value, of which it drops
# the cross-attention pair. With its default N (the config's num_hidden_layers: T5's and
# BART's encoder layers, usually D) decoder layers i and i + N/2 read the same blocks and half
# the blocks are never read; fw exports with N = 2D, where every decoder layer reads its own.


def to_peft_seq2seq(flat: torch.Tensor, layout: Seq2SeqLayout, kv_width: int) -> torch.Tensor:
    """fw's decoder self-attention prefix ``(P, D · 2 · kv_width)`` as PEFT's prompt_embeddings
    for ``num_layers = 2D``: per decoder layer ``self k, self v`` and two zero blocks (the
    cross-attention pair PEFT drops)."""
    blocks = flat.reshape(flat.shape[0], layout.decoder_layers, 2, kv_width)
    return torch.cat([blocks, torch.zeros_like(blocks)], dim=2).reshape(flat.shape[0], -1)


def from_peft_seq2seq(table: torch.Tensor, layout: Seq2SeqLayout, kv_width: int) -> torch.Tensor:
    """PEFT's prompt_embeddings ``(P, N · 2 · kv_width)`` as fw's decoder self-attention prefix
    ``(P, D · 2 · kv_width)``: the blocks PEFT's decoder layers read."""
    if layout.encoder or layout.cross:
        raise ValueError(f"a PEFT SEQ_2_SEQ_LM prefix has no {layout.describe()} layout (encoder_prefix and cross_prefix are false)")
    if table.shape[1] % (2 * kv_width):
        raise ValueError(f"prompt_embeddings has {table.shape[1]} columns, not a multiple of 2 x {kv_width}")
    blocks = table.reshape(table.shape[0], -1, kv_width)
    if blocks.shape[1] // 2 < layout.decoder_layers:  # 2N blocks fill N cache layers
        raise ValueError(f"prompt_embeddings has {blocks.shape[1] // 2} layers for {layout.decoder_layers} decoder layers")
    doubled = torch.cat([blocks, blocks], dim=1)
    read = [doubled[:, 4 * i: 4 * i + 2] for i in range(layout.decoder_layers)]
    return torch.cat(read, dim=1).reshape(table.shape[0], -1)


__all__ = ["PrefixTuning", "STORED_KEY", "to_peft_seq2seq", "from_peft_seq2seq"]
