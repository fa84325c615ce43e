"""fw_prompt: prompt tuning for fw (entry point ``prompt`` in the ``fw.methods`` group).

Also home of the input transformation that P-tuning (``fw_ptuning``) reuses:
:class:`VirtualTokenInjector` prepends any module's ``(P, hidden)`` output to a model's
input embeddings, :class:`EncoderVirtualTokenInjector` to an encoder-decoder's encoder input
(:func:`add_virtual_tokens` picks the one that fits; the forward-argument helpers they share
with prefix tuning are :mod:`framework.virtual_inputs`).
"""

from fw_prompt.embedding import PromptEmbedding
from fw_prompt.inject import MODULE_NAME, EncoderVirtualTokenInjector, VirtualTokenInjector, add_virtual_tokens
from fw_prompt.method import PromptTuning, virtual_token_peft_weights

__all__ = [
    "PromptTuning", "PromptEmbedding", "VirtualTokenInjector", "EncoderVirtualTokenInjector", "add_virtual_tokens",
    "virtual_token_peft_weights", "MODULE_NAME",
]
