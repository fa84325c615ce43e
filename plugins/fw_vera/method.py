"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024, arXiv:2310.11454).

One pair of frozen random matrices is shared by every adapted layer; each layer trains only
two vectors that scale them::

    y = W x + λ_b ⊙ (B (λ_d ⊙ (A x)))       A: r × in, B: out × r  (random, frozen, shared)
                                             λ_d: r (starts at d_initial), λ_b: out (starts at 0)

As in Hugging Face PEFT, A and B are sized to the largest input and output dimensions among
the targets and sliced per layer, and are drawn (kaiming-uniform) from a CPU generator seeded
with ``projection_prng_key``: the same key gives PEFT's matrices exactly. fw keeps them as
non-persistent buffers and stores only the key (in the recipe): the stored state is the
vectors (and the head). Each adapted layer adds ``r + out`` parameters: BERT-base with r=256
on query and value, 12 × 2 × (256 + 768) = 24,576. ``merge()`` adds
``diag(λ_b) B diag(λ_d) A`` to W.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from framework.layers import WeightDType, linear_dims, weight_dtype
from framework.method import ExportNotSupportedError, MergeableLayers, PeftAdapter, PeftMethod
from framework.peft_compat import fw_targets, peft_targets, refuse_unknown_options
from framework.targeting import set_submodule, targets_or_roles
from framework.validation import InvalidArgument, positive_int, probability
from fw_vera.layer import VeRALinear, projections


class VeRA(MergeableLayers, PeftMethod):
    """VeRA: shared frozen random matrices scaled by trained vectors (mergeable).

    Args:
        r: rank of the shared random matrices (> 0; PEFT's default 256).
        targets: module name patterns (suffix, glob or ``re:`` regex, or ``all-linear``);
            None picks the architecture's query and value projections.
        dropout: dropout on the VeRA branch's input.
        d_initial: initial value of every λ_d entry (λ_b starts at zero).
        projection_prng_key: seed of the shared matrices (PEFT's ``projection_prng_key``).
        dtype: dtype of the vectors (``base``: the base weight's dtype).
    """

    description = "VeRA: shared frozen random matrices scaled by trained vectors per layer (mergeable)"
    layer_type = VeRALinear
    peft_type = "VERA"

    def __init__(
        self,
        r: int = 256,
        targets: list[str] | None = None,
        dropout: float = 0.0,
        d_initial: float = 0.1,
        projection_prng_key: int = 0,
        dtype: WeightDType = "float32",
    ) -> None:
        positive_int(r, "r", "a positive integer rank")
        probability(dropout, "dropout")
        if not isinstance(d_initial, (int, float)) or isinstance(d_initial, bool):
            raise InvalidArgument("d_initial", f"expected a number, got {d_initial!r}")
        if not isinstance(projection_prng_key, int) or isinstance(projection_prng_key, bool):
            raise InvalidArgument("projection_prng_key", f"expected an integer seed, got {projection_prng_key!r}")
        self.r = r
        self.targets = targets
        self.dropout = dropout
        self.d_initial = d_initial
        self.projection_prng_key = projection_prng_key
        self.dtype = dtype

    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return targets_or_roles(model, self.targets, ["query", "value"], field="targets")

    def attach(self, model: nn.Module) -> None:
        found = self.target_modules(model)  # find_modules: Linear-like, at least one
        dims = [linear_dims(layer) for _, layer in found]
        in_max, out_max = max(d[0] for d in dims), max(d[1] for d in dims)
        vera_a, vera_b = projections(self.r, in_max, out_max, self.projection_prng_key)
        device = found[0][1].weight.device
        vera_a, vera_b = vera_a.to(device), vera_b.to(device)
        for name, layer in found:
            wrapped = VeRALinear(layer, vera_a, vera_b, self.dropout, self.d_initial, weight_dtype(self.dtype, layer.weight))
            set_submodule(model, name, wrapped)
            self.record(name, f"VeRA r={self.r} (+{self.r + wrapped.out_features:,})")

    def shared_projections(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared (A, B) of ``model``'s VeRA layers (unsliced)."""
        layer = next(m for m in model.modules() if isinstance(m, VeRALinear))
        return layer.vera_A, layer.vera_B

    # -- Hugging Face PEFT's format: the vectors, and the key instead of the matrices ----------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        layers = {n: m for n in self.modified_modules if isinstance(m := model.get_submodule(n), VeRALinear)}
        conv1d = {m.fan_in_fan_out for m in layers.values()}
        if len(conv1d) > 1:
            raise ExportNotSupportedError(
                "VeRA targets both Linear and GPT-2 Conv1D modules; PEFT's fan_in_fan_out is one setting per adapter"
            )
        stored = self.stored_state_dict(model)
        weights = {f"{n}.{v}": stored[f"{n}.{v}"] for n in layers for v in ("vera_lambda_b", "vera_lambda_d")}
        config = {
            "peft_type": "VERA", "r": self.r, "target_modules": peft_targets(model, layers),
            "projection_prng_key": self.projection_prng_key, "save_projection": False,
            "vera_dropout": self.dropout, "d_initial": self.d_initial, "fan_in_fan_out": conv1d == {True},
        }
        notes = [f"save_projection is false: PEFT regenerates the shared matrices from projection_prng_key="
                 f"{self.projection_prng_key} on the CPU generator, as fw does (PEFT warns that it relies on it)"]
        return PeftAdapter(config, weights, notes)

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        understood = {"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                      "fan_in_fan_out"}
        refuse_unknown_options(config, understood, cls.__name__)
        return {
            "r": int(config.get("r", 256)), "targets": fw_targets(config.get("target_modules"), "adapter_config.json: target_modules"),
            "dropout": float(config.get("vera_dropout") or 0.0), "d_initial": float(config.get("d_initial", 0.1)),
            "projection_prng_key": int(config.get("projection_prng_key", 0)),
        }

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The vectors as they are; saved matrices (``save_projection``) must be the key's."""
        out = dict(weights)
        shared = dict(zip(("vera_A", "vera_B"), self.shared_projections(model)))
        for name, mine in shared.items():
            saved = out.pop(f"base_model.{name}", None)
            if saved is not None and not torch.equal(saved.to(mine.device, mine.dtype), mine):
                raise ExportNotSupportedError(
                    f"the adapter's {name} is not what projection_prng_key={self.projection_prng_key} generates "
                    f"(shape {tuple(saved.shape)}, fw's {tuple(mine.shape)}); fw regenerates the matrices from the key"
                )
        return out


__all__ = ["VeRA"]
