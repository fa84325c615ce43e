"""fw: plugin-based parameter-efficient fine-tuning of transformers models on Lightning."""

__version__ = "0.1.0"
