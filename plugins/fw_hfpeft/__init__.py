"""fw_hfpeft: Hugging Face PEFT's own LoRA and IA³ layers as fw methods (entry points
``peft_lora``, ``peft_ia3``), so benchmarks compare fw's and PEFT's implementations in the
same training loop, on the same data, batch and seed. Needs the ``peft`` package."""

from fw_hfpeft.method import PeftIA3, PeftLoRA

__all__ = ["PeftLoRA", "PeftIA3"]
