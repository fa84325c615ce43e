"""fw_unipelt: UniPELT (entry point ``unipelt``), built from fw_lora, fw_prefix and fw_adapters."""

from fw_unipelt.gated import GatedLoRA, GatedLoRALinear, GatedPfeiffer, GatedPrefixTuning
from fw_unipelt.method import UniPELT

__all__ = ["UniPELT", "GatedLoRA", "GatedLoRALinear", "GatedPrefixTuning", "GatedPfeiffer"]
