"""fw_qlora: the QLoRA method plugin for fw (entry point ``qlora`` in the ``fw.methods`` group).

LoRA (fw_lora's layer) on a backbone whose Linear layers bitsandbytes stores as 4-bit NF4.
"""

from fw_qlora.method import COMPUTE_DTYPES, QLoRA, QLoRALinear, merged_model, resolve_compute_dtype
from fw_qlora.quant import QuantizationError, dequantize_weight, is_4bit, quantize_linear, to_plain

__all__ = [
    "COMPUTE_DTYPES",
    "QLoRA",
    "QLoRALinear",
    "QuantizationError",
    "dequantize_weight",
    "is_4bit",
    "merged_model",
    "quantize_linear",
    "resolve_compute_dtype",
    "to_plain",
]
