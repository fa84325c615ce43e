"""What plugins share to read and write Hugging Face PEFT's adapter configs.

A plugin that has a PEFT form implements :meth:`framework.method.PeftMethod.to_peft` (its
config fields and tensors in PEFT's names), :meth:`~framework.method.PeftMethod.from_peft`
(its ``__init__`` arguments from an ``adapter_config.json``) and
:meth:`~framework.method.PeftMethod.from_peft_weights`; the helpers below translate module
targets both ways and refuse PEFT options that have no fw equivalent, so that an adapter
is never loaded into a model that computes something else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from framework.method import ExportNotSupportedError, PeftAdapter
from framework.targeting import matches

#: fields of every PEFT config that do not change what the adapter computes
NEUTRAL_FIELDS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "auto_mapping", "modules_to_save", "init_lora_weights", "init_ia3_weights", "prompt_tuning_init",
    "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs", "megatron_config",
    "megatron_core", "qalora_group_size", "runtime_config", "num_transformer_submodules",
}


def peft_targets(model: nn.Module, names: Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` for exactly the modules ``names``: their last name components
    when no other module of ``model`` has one of them (``[query, value]``), else the full
    names (PEFT matches a list entry as a name suffix)."""
    chosen = sorted(set(names))
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    reached = {n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if reached == set(chosen) else chosen


def fw_targets(value: Any, field: str) -> list[str]:
    """PEFT's ``target_modules`` (a list of name suffixes, a regular expression PEFT
    full-matches, or ``all-linear``) as fw target patterns."""
    if isinstance(value, str):
        return [value] if value == "all-linear" else [f"re:{value}"]
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) for v in value):
        return sorted(value)
    raise ExportNotSupportedError(f"{field}: expected a list of module names or a regular expression, got {value!r}")


def without(targets: list[str], excluded: list[str]) -> list[str]:
    """``targets`` minus the modules ``excluded`` (both fw patterns): a regex when needed."""
    if all(not t.startswith("re:") for t in targets + excluded):
        return [t for t in targets if t not in excluded]
    def regex(p: str) -> str:
        return p[3:] if p.startswith("re:") else rf"(?:.*\.)?{re.escape(p)}"
    keep = "|".join(f"(?:{regex(t)})" for t in targets)
    drop = "|".join(f"(?:{regex(t)})" for t in excluded)
    return [f"re:(?!(?:{drop})$)(?:{keep})"]


def names_matching(model: nn.Module, patterns: list[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if n and any(matches(n, p) for p in patterns)]


def refuse_unknown_options(config: dict[str, Any], understood: set[str], method: str) -> None:
    """Every field of ``config`` that fw does not read must be at PEFT's default: an option fw
    cannot reproduce (weight decomposition, per-module ranks, trained biases, ...) is an error, not a silent
    change of what the adapter computes."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = str(config.get("peft_type"))
    defaults = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]().to_dict() if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING else {}
    differing = []
    for key, value in config.items():
        if key in understood or key in NEUTRAL_FIELDS:
            continue
        default = defaults.get(key)
        if value != default and not (value in (None, [], {}, False) and default in (None, [], {}, False)):
            differing.append(f"{key}={value!r}")
    if differing:
        raise ExportNotSupportedError(
            f"adapter_config.json: PEFT {peft_type} options {', '.join(sorted(differing))} have no equivalent in "
            f"fw's {method}; fw would compute something else than this adapter"
        )


#: the PEFT config fields every virtual-token method writes (geometry, read back from the model)
VIRTUAL_TOKEN_FIELDS = {"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers"}


def virtual_token_adapter(method: Any, model: nn.Module, config: dict[str, Any]) -> PeftAdapter:
    """A virtual-token method in PEFT's terms: its ``(P, hidden)`` stored tensor as
    ``prompt_embeddings`` and the backbone's geometry (what ``PeftModel`` fills in itself)."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    table = method.stored_state_dict(model)[method.stored_key]
    config = {
        "num_virtual_tokens": table.shape[0], "token_dim": table.shape[1], "num_transformer_submodules": 1,
        "num_attention_heads": text.num_attention_heads, "num_layers": text.num_hidden_layers, **config,
    }
    return PeftAdapter(config, {"prompt_embeddings": table})



def virtual_token_weights(method: Any, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's ``prompt_embeddings`` (and the head) as a virtual-token method's stored form."""
    return {method.stored_key if key == "prompt_embeddings" else key: value for key, value in weights.items()}
