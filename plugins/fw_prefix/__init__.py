"""fw_prefix: prefix tuning for fw (entry point ``prefix`` in the ``fw.methods`` group).

The pieces are importable on their own, for hybrids such as MAM (prefix + parallel adapter)
and UniPELT (gated LoRA + adapter + prefix)::

    from fw_prefix import add_prefix
    encoder = add_prefix(model, prefix_length=30, bottleneck=512)   # prefix_encoder + hooks

On encoder-decoders (T5, BART) ``add_prefix(model, ..., encoder_prefix=True,
cross_prefix=True)`` prefixes the encoder's self-attention and the decoder's self- and
cross-attention (:class:`Seq2SeqLayout` names the blocks, in the flat prefix's order).

During a forward call, ``encoder.injector.prefix_slot(block)`` is the cache layer just
filled with that block's prefix: a hook inside the model may rescale it there before the
block reads it (UniPELT's input-dependent prefix gate, in ``fw_unipelt``). A different
prefix source (any object with ``prefix_length`` and ``key_values(batch_size, dtype,
device)``) can be fed with ``PrefixInjector(source).install(model)`` (or
``Seq2SeqPrefixInjector(source, layout)``).

- :mod:`fw_prefix.shapes`   per-architecture key/value geometry (:func:`kv_shape`, :class:`Seq2SeqLayout`), supported backbones
- :mod:`fw_prefix.encoder`  :class:`PrefixEncoder`: embedding (+ MLP) -> flat prefix -> per-block (k, v)
- :mod:`fw_prefix.inject`   :class:`PrefixInjector`, :class:`Seq2SeqPrefixInjector` (cache, masks, positions; hooks), :func:`add_prefix`
- :mod:`fw_prefix.method`   :class:`PrefixTuning`, the method plugin (and PEFT's seq2seq layout)
"""

from fw_prefix.encoder import PrefixEncoder
from fw_prefix.inject import MODULE_NAME, PrefixInjector, Seq2SeqPrefixInjector, add_prefix
from fw_prefix.method import STORED_KEY, PrefixTuning
from fw_prefix.shapes import KVShape, Seq2SeqLayout, kv_shape

__all__ = [
    "PrefixTuning", "PrefixEncoder", "PrefixInjector", "Seq2SeqPrefixInjector", "add_prefix", "KVShape",
    "Seq2SeqLayout", "kv_shape", "MODULE_NAME", "STORED_KEY",
]
