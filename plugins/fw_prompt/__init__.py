"""fw_prompt: prompt tuning for fw (entry point ``prompt`` in the ``fw.methods`` group).

Also home of the input transformation that P-tuning (``fw_ptuning``) reuses:
:class:`VirtualTokenInjector` prepends any module's ``(P, hidden)`` output to a model's
input embeddings (the forward-argument helpers it shares with prefix tuning are
:mod:`framework.virtual_inputs`).
"""

from fw_prompt.embedding import PromptEmbedding
from fw_prompt.inject import MODULE_NAME, VirtualTokenInjector, add_virtual_tokens
from fw_prompt.method import PromptTuning

__all__ = ["PromptTuning", "PromptEmbedding", "VirtualTokenInjector", "add_virtual_tokens", "MODULE_NAME"]
