"""fw_hfpeft: Hugging Face PEFT's own implementations as fw methods, so benchmarks compare fw's
and PEFT's in the same training loop, on the same data, batch and seed. LoRA-family and IA³
layers are injected in place (``peft_lora``, ``peft_dora``, ``peft_vera``, ``peft_ia3``;
``peft_adalora`` keeps PEFT's allocator); prompt tuning, P-tuning and prefix tuning run through
PEFT's ``PeftModel`` (``peft_prompt``, ``peft_ptuning``, ``peft_prefix``). Needs the ``peft``
package."""

from fw_hfpeft.method import PeftAdaLoRA, PeftDoRA, PeftIA3, PeftLoRA, PeftVeRA
from fw_hfpeft.prompt_learning import PeftPrefixTuning, PeftPromptTuning, PeftPTuning

__all__ = ["PeftLoRA", "PeftDoRA", "PeftIA3", "PeftAdaLoRA", "PeftVeRA", "PeftPromptTuning", "PeftPTuning", "PeftPrefixTuning"]
