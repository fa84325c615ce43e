"""fw_prefix: prefix tuning for fw (entry point ``prefix`` in the ``fw.methods`` group).

The pieces are importable on their own, for hybrids such as MAM (prefix + parallel adapter)
and UniPELT (gated LoRA + adapter + prefix)::

    from fw_prefix import add_prefix
    encoder = add_prefix(model, prefix_length=30, bottleneck=512)   # prefix_encoder + hooks

During a forward call, ``encoder.injector.filling`` is the key/value cache just filled
with the prefix: a hook inside the model may rescale one layer's prefix there before the
layer reads it (UniPELT's input-dependent prefix gate, in ``fw_unipelt``). A different
prefix source (any object with ``prefix_length`` and ``key_values(batch_size, dtype,
device)``) can be fed with ``PrefixInjector(source).install(model)``.

- :mod:`fw_prefix.shapes`   per-architecture key/value geometry (:func:`kv_shape`), supported backbones
- :mod:`fw_prefix.encoder`  :class:`PrefixEncoder`: embedding (+ MLP) -> flat prefix -> per-layer (k, v)
- :mod:`fw_prefix.inject`   :class:`PrefixInjector` (cache, mask, positions; hooks), :func:`add_prefix`
- :mod:`fw_prefix.method`   :class:`PrefixTuning`, the method plugin
"""

from fw_prefix.encoder import PrefixEncoder
from fw_prefix.inject import MODULE_NAME, PrefixInjector, add_prefix
from fw_prefix.method import STORED_KEY, PrefixTuning
from fw_prefix.shapes import KVShape, kv_shape

__all__ = ["PrefixTuning", "PrefixEncoder", "PrefixInjector", "add_prefix", "KVShape", "kv_shape", "MODULE_NAME", "STORED_KEY"]
