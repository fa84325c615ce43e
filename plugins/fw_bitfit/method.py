"""BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models (Ben Zaken, Ravfogel & Goldberg, 2022; arXiv:2106.10199).

Only the bias terms train; every weight matrix stays frozen::

    y = W x + b          W frozen, b trainable

By default every bias of the backbone trains: attention (query, key, value, output),
feed-forward, the LayerNorms' and the embeddings' LayerNorm (the task head trains as the
head, not as part of the method). ``targets`` selects a subset by module name (e.g.
``[query, value, intermediate.dense]``). Nothing is added to the model, so there is nothing
to merge: the trained biases are the model's own parameters (``merge()`` is a no-op), and a
checkpoint stores the biases alone.

Backbones without biases (Llama-family: no bias in any projection or RMSNorm) fail at
attach, rather than train nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.method import ExportNotSupportedError, PeftAdapter, PeftMethod
from framework.peft_compat import fw_targets, peft_targets, refuse_unknown_options
from framework.targeting import fold_indices, head_module_names, matches
from framework.validation import InvalidArgument


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class BitFit(PeftMethod):
    """BitFit: train only the bias terms (all of the backbone's, or those of chosen modules).

    Args:
        targets: module name patterns whose biases train (suffix, glob or ``re:`` regex);
            None trains every bias of the backbone.
    """

    description = "BitFit: train only the bias terms of the backbone (no added parameters)"
    #: PEFT's BEFT trains an additive bias on Linear layers: BitFit of Linear biases, as deltas
    peft_type = "BEFT"

    def __init__(self, targets: list[str] | None = None) -> None:
        if targets == []:
            raise InvalidArgument("targets", "the list is empty; give module name patterns or null for every bias")
        self.targets = targets

    def biases(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(module name, bias) for every bias BitFit trains on this model."""
        heads = head_module_names(model)
        found = [
            (name, module.bias)
            for name, module in model.named_modules()
            if isinstance(getattr(module, "bias", None), nn.Parameter) and not _under(name, heads)
        ]
        if not found:
            raise InvalidArgument(
                "", f"BitFit: {type(model).__name__} has no bias parameters outside its task head "
                "(Llama-family models use none), so BitFit would train nothing. Choose another "
                "method (e.g. lora or ia3) for this backbone."
            )
        if self.targets is None:
            return found
        chosen = []
        for pattern in self.targets:
            hits = [(n, b) for n, b in found if matches(n, pattern)]
            if not hits:
                raise InvalidArgument(
                    "targets", f"pattern '{pattern}' matches no module with a bias. Modules with biases: "
                    f"{', '.join(fold_indices(n for n, _ in found))}"
                )
            chosen += [hit for hit in hits if hit not in chosen]
        return chosen

    def attach(self, model: nn.Module) -> None:
        base = {}
        for name, bias in self.biases(model):
            bias.requires_grad_(True)
            base[name] = bias.detach().clone()  # the base model's bias: PEFT stores the difference
            self.record(name, f"BitFit bias (+{bias.numel():,})")
        self.__dict__["_base_biases"] = base

    # -- Hugging Face PEFT's format: BEFT, ``beft_bias`` (1, out) = trained - base bias --------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        base = self.__dict__.get("_base_biases", {})
        others = sorted(n for n in base if not isinstance(model.get_submodule(n), nn.Linear))
        if others:
            raise ExportNotSupportedError(
                f"BitFit trains biases of modules PEFT's BEFT cannot hold ({', '.join(fold_indices(others)[:4])}: "
                "BEFT adapts nn.Linear biases only); restrict its targets to Linear layers "
                "to export to PEFT"
            )
        stored = self.stored_state_dict(model)
        weights = {f"{n}.beft_bias": (stored[f"{n}.bias"].float() - b.float())[None, :] for n, b in base.items()}
        return PeftAdapter({"peft_type": "BEFT", "target_modules": peft_targets(model, base)}, weights)

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        refuse_unknown_options(config, {"target_modules"}, cls.__name__)
        return {"targets": fw_targets(config.get("target_modules"), "adapter_config.json: target_modules")}

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        base = self.__dict__.get("_base_biases", {})
        out = {}
        for key, delta in weights.items():
            name = key.removesuffix(".beft_bias")
            if name not in base:
                raise KeyError(f"adapter_model.safetensors: '{key}' is not a bias BitFit trains on this model")
            out[f"{name}.bias"] = (base[name].float() + delta.flatten().float()).to(base[name].dtype)
        return out

    def merge(self, model: nn.Module) -> None:
        """Nothing to fold: the trained biases are the model's own parameters."""

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to undo (see :meth:`merge`)."""
