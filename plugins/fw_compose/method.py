"""Compose: several PEFT methods on one backbone, from a recipe, without writing a plugin.

He et al. 2022 ("Towards a Unified View of Parameter-Efficient Transfer Learning") showed
that methods touching different places of a layer combine well (MAM = prefix tuning on
attention + a parallel adapter on the FFN). ``compose`` attaches a list of methods in order::

    method:
      class_path: compose
      init_args:
        methods:
          - {class_path: lora, init_args: {r: 8}}                 # query, value
          - {class_path: parallel_adapter, init_args: {reduction_factor: 16}}   # FFN

The trained parameters are the sum of the parts (each method's own, plus the task head).

**Compatibility.** Methods must modify different modules: if two record the same module
(e.g. LoRA on ``output.dense`` and a Pfeiffer adapter, which wraps it) the composition fails
naming the module and both methods. A method whose checkpoint is not plain parameters (the
Fisher mask stores indices; its mask is chosen from data) cannot be composed.

**Weights.** Training checkpoints hold every trainable parameter (the default format). What
a finished run stores is each method's own ``stored_state_dict`` restricted to the
parameters that method created or unfroze (so a prefix is stored flat, LoRA as A and B),
plus the task head.

**Merging** merges every part or none: if one part cannot be merged, the parts already
merged are unmerged and the error names the part.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.method import (
    ExportNotSupportedError,
    MergeNotSupportedError,
    PeftAdapter,
    PeftMethod,
    check_state_dict,
    copy_parameters,
)
from framework.validation import InvalidArgument

if TYPE_CHECKING:  # pragma: no cover
    from framework.prepare import PrepareContext


class Compose(PeftMethod):
    """Several methods attached in order to one backbone; they must touch different modules.

    Args:
        methods: the methods, each as a recipe's method (``class_path`` + ``init_args``).
    """

    description = "Compose: several methods on one backbone (they must modify different modules)"

    def __init__(self, methods: list[PeftMethod]) -> None:
        if not methods:
            raise InvalidArgument("methods", "expected at least one method")
        for i, method in enumerate(methods):
            if not isinstance(method, PeftMethod):
                raise InvalidArgument(f"methods[{i}]", f"expected a PeftMethod, got {type(method).__name__}")
            if not method.has_plain_checkpoints():
                raise InvalidArgument(
                    f"methods[{i}]", f"{type(method).__name__} writes its own checkpoint format, so it cannot be "
                    "composed; train it on its own"
                )
        self.methods = list(methods)

    def _label(self, i: int) -> str:
        return f"methods[{i}] ({type(self.methods[i]).__name__})"

    def _after(self, i: int, err: InvalidArgument) -> InvalidArgument:
        """Part ``i``'s error; after other parts attached, with the likely reason."""
        if not i:
            return err
        earlier = ", ".join(self._label(j) for j in range(i))
        return InvalidArgument(
            err.argument, f"{err.reason} ({self._label(i)} attached after {earlier}, which may have wrapped or "
            "taken its targets: composed methods must modify different modules)"
        )

    # -- attaching ------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        owned: list[set[int]] = []
        claimed: dict[str, int] = {}
        for i, method in enumerate(self.methods):
            before = {id(p) for p in model.parameters() if p.requires_grad}
            try:
                method.attach(model)
            except InvalidArgument as e:  # the part's own argument, seen from here
                raise self._after(i, e.under(f"methods[{i}]")) from e
            except Exception as e:
                raise self._after(i, InvalidArgument(f"methods[{i}]", str(e))) from e
            owned.append({id(p) for p in model.parameters() if p.requires_grad} - before)
            for name in method.modified_modules:
                if name in claimed:
                    raise InvalidArgument(
                        "methods", f"{self._label(i)} modifies '{name or type(model).__name__}', which "
                        f"{self._label(claimed[name])} already modified; composed methods must touch "
                        "different modules (change one's targets or placements)"
                    )
                claimed[name] = i
        self.__dict__["_owned"] = owned

    @property
    def modified_modules(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for method in self.methods:
            out.update(method.modified_modules)
        return out

    def owner(self, model: nn.Module) -> dict[str, int]:
        """Trainable parameter name -> index of the part that created or unfroze it."""
        owned = self.__dict__.get("_owned")
        if owned is None:
            raise RuntimeError("Compose: attach() has not run on this model")
        index = {pid: i for i, ids in enumerate(owned) for pid in ids}
        return {n: index[id(p)] for n, p in model.named_parameters() if p.requires_grad and id(p) in index}

    # -- weights --------------------------------------------------------------------------

    def _stored_parts(self, model: nn.Module) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Each part's stored form of its own parameters, and the parameters no part owns (the
        task head)."""
        owner = self.owner(model)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        parts: list[dict[str, torch.Tensor]] = []
        seen: set[str] = set()
        for i, method in enumerate(self.methods):
            part = {}
            for key, value in method.stored_state_dict(model).items():
                if key in trainable and owner.get(key) != i:
                    continue  # another part's parameter, or the head (added below)
                if key in seen:
                    raise RuntimeError(f"Compose: {self._label(i)} stores '{key}', which another part stores too")
                part[key] = value
                seen.add(key)
            parts.append(part)
        rest = {n: p.detach() for n, p in trainable.items() if n not in owner and n not in seen}
        return parts, rest

    def stored_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each part's stored form of its own parameters, plus the parameters no part owns
        (the task head)."""
        parts, rest = self._stored_parts(model)
        out = dict(rest)
        for part in parts:
            out.update(part)
        return out

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Checks the whole, then hands every part the keys of its own stored form."""
        parts, rest = self._stored_parts(model)
        if strict:
            check_state_dict({**rest, **{k: v for part in parts for k, v in part.items()}}, state_dict, type(self).__name__)
        copy_parameters(model, {k: v for k, v in state_dict.items() if k in rest}, type(self).__name__)
        for method, part in zip(self.methods, parts):
            method.load_stored_state_dict(model, {k: v for k, v in state_dict.items() if k in part}, strict=False)

    # -- Hugging Face PEFT's format ----------------------------------------------------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        """The PEFT form of a composition of one part; several parts are one PEFT adapter only
        when all are LoRA with the same dropout and scaling rule (then per-module ranks and
        alphas go to ``rank_pattern``/``alpha_pattern``)."""
        adapters = []
        for i, method in enumerate(self.methods):
            try:
                adapters.append(method.to_peft(model))
            except ExportNotSupportedError as err:
                raise ExportNotSupportedError(f"{type(self).__name__}: its part {self._label(i)}: {err}") from err
        if len(adapters) == 1:
            return adapters[0]
        first = adapters[0].config
        per_module = {"r", "lora_alpha", "target_modules"}
        shared = [{k: v for k, v in a.config.items() if k not in per_module} for a in adapters]
        if first["peft_type"] != "LORA" or any(s != shared[0] for s in shared):
            names = ", ".join(self._label(i) for i in range(len(self.methods)))
            raise ExportNotSupportedError(
                f"{type(self).__name__} of {names}: a PEFT adapter holds one method, so PEFT can load a composition "
                "only when every part is LoRA with the same dropout, rslora and layer type"
            )
        config = {**first, "target_modules": sorted({t for a in adapters for t in a.config["target_modules"]})}
        config["rank_pattern"], config["alpha_pattern"] = {}, {}
        weights: dict[str, torch.Tensor] = {}
        for adapter in adapters:
            weights.update(adapter.weights)
            for key in adapter.weights:  # <module>.lora_A.weight
                module = re.escape(key.rsplit(".", 2)[0])
                if adapter.config["r"] != first["r"]:
                    config["rank_pattern"][module] = adapter.config["r"]
                if adapter.config["lora_alpha"] != first["lora_alpha"]:
                    config["alpha_pattern"][module] = adapter.config["lora_alpha"]
        return PeftAdapter(config, weights)

    # -- merging --------------------------------------------------------------------------

    def can_merge(self) -> bool:
        return all(method.can_merge() for method in self.methods)

    def merge(self, model: nn.Module) -> None:
        merged: list[PeftMethod] = []
        for i, method in enumerate(self.methods):
            try:
                method.merge(model)
            except MergeNotSupportedError as e:
                for done in reversed(merged):
                    done.unmerge(model)
                raise MergeNotSupportedError(
                    f"{type(self).__name__} cannot be merged: its part {self._label(i)} cannot ({e})"
                ) from e
            merged.append(method)

    def unmerge(self, model: nn.Module) -> None:
        for method in reversed(self.methods):
            method.unmerge(model)

    # -- hooks ----------------------------------------------------------------------------

    def prepare(self, context: PrepareContext) -> None:
        for i, method in enumerate(self.methods):
            try:
                method.prepare(context)
            except InvalidArgument as err:
                raise err.under(f"methods[{i}]") from err

    @property  # type: ignore[override]
    def supports_sharding(self) -> bool:
        return all(method.supports_sharding for method in self.methods)

    @property  # type: ignore[override]
    def sharding_refusal(self) -> str:
        return next((f"{self._label(i)}: {m.sharding_refusal}" for i, m in enumerate(self.methods)
                     if not m.supports_sharding), "")

    def on_after_backward(self, model: nn.Module) -> None:
        for method in self.methods:
            method.on_after_backward(model)

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """The sum of the parts' loss terms; None when no part has one."""
        terms = [term for method in self.methods if (term := method.loss_term(model)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def on_after_optimizer_step(self, model: nn.Module, step: int) -> None:
        for method in self.methods:
            method.on_after_optimizer_step(model, step)

    def method_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The parts' states, each key under ``methods.<i>.``."""
        return {f"methods.{i}.{k}": v for i, method in enumerate(self.methods) for k, v in method.method_state(model).items()}

    def load_method_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        parts: list[dict[str, torch.Tensor]] = [{} for _ in self.methods]
        for key, value in state.items():
            index, dot, rest = key.removeprefix("methods.").partition(".")
            if not key.startswith("methods.") or not dot or not index.isdigit() or int(index) >= len(self.methods):
                raise KeyError(f"{type(self).__name__}: method state '{key}' belongs to no part")
            parts[int(index)][rest] = value
        for method, part in zip(self.methods, parts):
            method.load_method_state(model, part)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """The parts' groups (e.g. a LoRA+ part's), then one default group of every other
        trainable parameter; None when no part asks for groups."""
        groups = [group for method in self.methods for group in (method.param_groups(model, lr) or [])]
        if not groups:
            return None
        listed = {id(p) for group in groups for p in group["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in listed]
        return [*groups, {"params": rest}] if rest else groups


__all__ = ["Compose"]
