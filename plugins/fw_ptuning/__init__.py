"""fw_ptuning: P-tuning for fw (entry point ``ptuning`` in the ``fw.methods`` group).

The input transformation is prompt tuning's (:mod:`fw_prompt`); this package adds the
prompt encoder and stores only the encoder's output after training.
"""

from fw_ptuning.encoder import PromptEncoder
from fw_ptuning.method import STORED_KEY, PTuning

__all__ = ["PTuning", "PromptEncoder", "STORED_KEY"]
