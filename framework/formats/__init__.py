"""Adapters that leave fw and come back: fw's own pickle-free format, Hugging Face PEFT's
format, and merged transformers models (``fw export``, ``--adapter``).

- :mod:`framework.formats.fw`      ``adapter.json`` + ``adapter.safetensors``, every method
- :mod:`framework.formats.peft`    ``adapter_config.json`` + ``adapter_model.safetensors``
- :mod:`framework.formats.merged`  ``save_pretrained`` of the merged model + tokenizer
- :mod:`framework.formats.source`  a checkpoint or an adapter folder, applied to a recipe
"""
