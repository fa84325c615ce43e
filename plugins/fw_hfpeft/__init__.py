"""fw_hfpeft: Hugging Face PEFT's own implementations as fw methods, so benchmarks compare fw's
and PEFT's in the same training loop, on the same data, batch and seed. LoRA and IA³ layers
are injected in place (``peft_lora``, ``peft_ia3``); prompt tuning, P-tuning and prefix tuning
run through PEFT's ``PeftModel`` (``peft_prompt``, ``peft_ptuning``, ``peft_prefix``). Needs
the ``peft`` package."""

from fw_hfpeft.method import PeftIA3, PeftLoRA
from fw_hfpeft.prompt_learning import PeftPrefixTuning, PeftPromptTuning, PeftPTuning

__all__ = ["PeftLoRA", "PeftIA3", "PeftPromptTuning", "PeftPTuning", "PeftPrefixTuning"]
