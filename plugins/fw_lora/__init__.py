"""fw_lora: the LoRA method plugin for fw (entry point ``lora`` in the ``fw.methods`` group)."""

from fw_lora.layer import LoRALinear
from fw_lora.method import LoRA

__all__ = ["LoRA", "LoRALinear"]
