"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023,
arXiv:2303.10512).

LoRA gives every adapted matrix the same rank. AdaLoRA writes each update in SVD form and
moves rank from the matrices where it matters least to where it matters most, during training::

         x ──────────────┬──────────────────┐
                         │                  │
                  ┌──────▼──────┐      ┌────▼────┐  Q (PEFT's A): init_r × in
                  │ W (frozen)  │      │    Q    │
                  │  out × in   │      └────┬────┘
                  └──────┬──────┘      ┌────▼────┐  Λ (PEFT's E): init_r singular values,
                         │             │    Λ    │  pruned ranks are zeros
                         │             └────┬────┘
                         │             ┌────▼────┐  P (PEFT's B): out × init_r
                         │             │    P    │
                         │             └────┬────┘
                         │                  │ × alpha / init_r
                         └──────(+)◄────────┘
                                 │
                                 y = W x + (alpha / init_r) · P Λ Q x

P and Q are kept near-orthogonal by a regularizer added to the training loss
(:meth:`AdaLoRA.loss_term`): ``orth_reg_weight`` × the mean over all P and Q of
``‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F``.

**Importance.** After every optimizer step (:meth:`AdaLoRA.on_after_optimizer_step`) each
trained entry w gets a sensitivity ``I = |w · ∂L/∂w|``, smoothed as ``Ī ← β1 Ī + (1−β1) I``,
with an uncertainty ``Ū ← β2 Ū + (1−β2) |I − Ī|``; its score is ``Ī · Ū``. Rank i of a matrix
scores ``s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.

**Budget.** The total rank over all adapted matrices starts at ``init_r × n``, stays there for
``tinit`` steps, falls along a cubic curve to ``target_r × n`` at step ``total_step − tfinal``
(re-allocating every ``deltaT`` steps: the lowest-scoring ranks over all matrices get Λ_i = 0),
and the last ``tfinal`` steps train the final ranks. Matrices end with different ranks (the
``rank_pattern``); the parameter count during training is that of LoRA with ``init_r`` plus Λ.

This is Hugging Face PEFT's AdaLoRA (``AdaLoraConfig``, ``SVDLinear``, ``RankAllocator``):
the same initialization, forward, regularizer, scores, schedule and masks (tested equal), run by
fw's loop through the contract's ``loss_term`` and ``on_after_optimizer_step`` hooks. The rank
allocator's averages and the masks are :meth:`AdaLoRA.method_state`, so a resumed run
continues exactly. Merging folds ``P Λ Q · alpha / init_r`` into W (pruned ranks add nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.layers import WeightDType, weight_dtype
from framework.method import ExportNotSupportedError, MergeableLayers, PeftAdapter, PeftMethod, check_state_dict, copy_parameters
from framework.peft_compat import fw_targets, peft_targets, refuse_unknown_options
from framework.targeting import set_submodule, targets_or_roles
from framework.validation import InvalidArgument, optional_positive_int, positive, positive_int, probability
from fw_adalora.allocator import RankAllocator, Schedule
from fw_adalora.layer import SVDLinear

if TYPE_CHECKING:  # pragma: no cover
    from framework.prepare import PrepareContext


def _count(value: Any, argument: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(argument, f"expected an integer >= 0, got {value!r}")


def _open_fraction(value: Any, argument: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 1.0:
        raise InvalidArgument(argument, f"expected a number in (0, 1), got {value!r}")


def check_schedule(tinit: int, tfinal: int, total_step: int, where: str = "total_step") -> None:
    if tinit >= total_step - tfinal:
        raise InvalidArgument(
            where, f"{total_step} steps leave no budget phase after tinit={tinit} and tfinal={tfinal} "
            "(need tinit + tfinal < total_step): lower tinit/tfinal or train longer")


class AdaLoRA(MergeableLayers, PeftMethod):
    """AdaLoRA: SVD-form low-rank updates whose ranks are re-allocated by importance (mergeable).

    Args:
        target_r: the average rank per adapted matrix at the end (PEFT's ``target_r``; <= init_r).
        init_r: every matrix's rank at the start (PEFT's ``init_r``).
        tinit: steps before the first pruning (warm-up at the full budget).
        tfinal: steps at the end that train the final ranks without re-allocating.
        deltaT: steps between two allocations during the budget phase.
        beta1: the moving average's factor for the sensitivity.
        beta2: the moving average's factor for its uncertainty.
        orth_reg_weight: weight of the orthogonality regularizer added to the training loss (>= 0).
        total_step: the length of the schedule in optimizer steps; None: the run's own (the
            trainer's estimate from max_steps / max_epochs and the data).
        alpha: scale numerator: the update is multiplied by alpha / init_r (PEFT's ``lora_alpha``).
        dropout: dropout on the branch's input.
        targets: module name patterns (suffix, glob or ``re:`` regex, or ``all-linear``);
            None picks the architecture's query and value projections.
        dtype: dtype of P, Λ and Q (``base``: the base weight's dtype).
    """

    description = "AdaLoRA: SVD-form low-rank updates whose ranks move to where they matter most (mergeable)"
    peft_type = "ADALORA"
    layer_type = SVDLinear
    supports_sharding = False
    sharding_refusal = "its rank allocator ranks importance scores of whole matrices across all layers"

    def __init__(
        self,
        target_r: int = 8,
        init_r: int = 12,
        tinit: int = 0,
        tfinal: int = 0,
        deltaT: int = 1,  # noqa: N803 - PEFT's name
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.5,
        total_step: int | None = None,
        alpha: float = 8.0,
        dropout: float = 0.0,
        targets: list[str] | None = None,
        dtype: WeightDType = "float32",
    ) -> None:
        positive_int(init_r, "init_r", "a positive integer rank")
        positive_int(target_r, "target_r", "a positive integer rank")
        if target_r > init_r:
            raise InvalidArgument("target_r", f"expected at most init_r ({init_r}): ranks are only pruned, got {target_r}")
        _count(tinit, "tinit")
        _count(tfinal, "tfinal")
        positive_int(deltaT, "deltaT")
        _open_fraction(beta1, "beta1")
        _open_fraction(beta2, "beta2")
        if not isinstance(orth_reg_weight, (int, float)) or isinstance(orth_reg_weight, bool) or orth_reg_weight < 0:
            raise InvalidArgument("orth_reg_weight", f"expected a number >= 0, got {orth_reg_weight!r}")
        optional_positive_int(total_step, "total_step")
        if total_step is not None:
            check_schedule(tinit, tfinal, total_step)
        positive(alpha, "alpha")
        probability(dropout, "dropout")
        self.target_r = target_r
        self.init_r = init_r
        self.tinit = tinit
        self.tfinal = tfinal
        self.deltaT = deltaT
        self.beta1 = beta1
        self.beta2 = beta2
        self.orth_reg_weight = orth_reg_weight
        self.total_step = total_step
        self.alpha = alpha
        self.dropout = dropout
        self.targets = targets
        self.dtype = dtype

    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return targets_or_roles(model, self.targets, ["query", "value"], field="targets")

    def attach(self, model: nn.Module) -> None:
        for name, layer in self.target_modules(model):  # find_modules: Linear-like, at least one
            wrapped = SVDLinear(layer, self.init_r, self.alpha, self.dropout, weight_dtype(self.dtype, layer.weight))
            set_submodule(model, name, wrapped)
            added = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
            self.record(name, f"AdaLoRA init_r={self.init_r} (+{added:,})")

    # -- the rank allocator --------------------------------------------------------------------

    def svd_layers(self, model: nn.Module) -> dict[str, SVDLinear]:
        return {n: m for n in self.modified_modules if isinstance(m := model.get_submodule(n), SVDLinear)}

    @property
    def schedule_length(self) -> int | None:
        """``total_step``, or the run's step count once :meth:`prepare` has read it."""
        return self.total_step if self.total_step is not None else self.__dict__.get("_total_step")

    def allocator(self, model: nn.Module) -> RankAllocator:
        """The rank allocator of ``model``'s layers (made on first use, then kept)."""
        found = self.__dict__.get("_allocator")
        if found is None or any(found.layers.get(n) is not m for n, m in self.svd_layers(model).items()):
            total = self.schedule_length
            if total is None:
                raise InvalidArgument("total_step", "unknown: set it, or train through fw (which reads the run's step count)")
            schedule = Schedule(self.init_r, self.target_r, self.tinit, self.tfinal, self.deltaT, total, self.beta1, self.beta2)
            found = RankAllocator(self.svd_layers(model), schedule)
            self.__dict__["_allocator"] = found
        return found

    def prepare(self, context: PrepareContext) -> None:
        """Reads the run's optimizer step count when ``total_step`` is None."""
        if self.total_step is None and context.total_steps is not None:
            total = context.total_steps()
            if not isinstance(total, int) or total <= 0:
                raise InvalidArgument("total_step", f"the run's step count is {total!r}; set total_step")
            check_schedule(self.tinit, self.tfinal, total, "tfinal")
            self.__dict__["_total_step"] = total
            self.__dict__.pop("_allocator", None)

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """``orth_reg_weight`` × the mean of ``‖QQᵀ − I‖_F`` and ``‖PᵀP − I‖_F`` over every layer
        (PEFT's ``AdaLoraModel.forward``); None with ``orth_reg_weight`` 0."""
        if self.orth_reg_weight == 0:
            return None
        total, count = None, 0
        for layer in self.svd_layers(model).values():
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # PEFT's order: A, then B
                eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
                term = torch.norm(cov - eye, p="fro")
                total = term if total is None else total + term
                count += 1
        return None if total is None else self.orth_reg_weight * (total / count)

    def on_after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: scores, budget, masks."""
        self.allocator(model).update_and_allocate(step)

    def method_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        found = self.__dict__.get("_allocator")
        if found is None:  # nothing allocated or scored yet: the masks as they are
            return {f"{n}.rank_mask": m.rank_mask for n, m in self.svd_layers(model).items()}
        return found.state()

    def load_method_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        if self.schedule_length is None:  # e.g. reading a checkpoint outside a run: the masks only
            masks = {f"{n}.rank_mask": n for n in self.svd_layers(model)}
            for key, value in state.items():
                if key in masks:
                    self.svd_layers(model)[masks[key]].rank_mask.copy_(value.to(torch.bool))
            return
        self.allocator(model).load_state(state, type(self).__name__)

    def rank_pattern(self, model: nn.Module) -> dict[str, list[bool]]:
        """Module name -> which of its ``init_r`` ranks the last allocation kept."""
        return {n: m.rank_mask.tolist() for n, m in self.svd_layers(model).items()}

    # -- weights: the trained tensors and the masks (int, not counted as parameters) -----------

    def stored_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = super().stored_state_dict(model)
        for name, layer in self.svd_layers(model).items():
            state[f"{name}.rank_mask"] = layer.rank_mask.to(torch.int8)
        return state

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        if strict:
            check_state_dict(self.stored_state_dict(model), state_dict, type(self).__name__)
        state = dict(state_dict)
        for name, layer in self.svd_layers(model).items():
            mask = state.pop(f"{name}.rank_mask", None)
            if mask is not None:
                layer.rank_mask.copy_(mask.to(torch.bool))
        copy_parameters(model, state, type(self).__name__)

    # -- Hugging Face PEFT's format ------------------------------------------------------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        """PEFT's AdaLoRA adapter: only the kept ranks' A, E, B, and ``rank_pattern`` (PEFT resizes
        its layers by it when loading; its divisor stays init_r, as here)."""
        layers = self.svd_layers(model)
        conv1d = {m.fan_in_fan_out for m in layers.values()}
        if len(conv1d) > 1:
            raise ExportNotSupportedError(
                "AdaLoRA targets both Linear and GPT-2 Conv1D modules; PEFT's fan_in_fan_out is one setting per adapter")
        stored = self.stored_state_dict(model)
        weights: dict[str, torch.Tensor] = {}
        for name in layers:
            keep = stored[f"{name}.rank_mask"].to(torch.bool).cpu()
            weights[f"{name}.lora_A"] = stored[f"{name}.lora_A"].detach().cpu()[keep]
            weights[f"{name}.lora_E"] = stored[f"{name}.lora_E"].detach().cpu()[keep]
            weights[f"{name}.lora_B"] = stored[f"{name}.lora_B"].detach().cpu()[:, keep]
        notes = []
        total = self.schedule_length
        if total is None:
            total = self.tinit + self.tfinal + 1
            notes.append(f"total_step is {total} only because PEFT's config requires one; the schedule does not "
                         "matter for inference")
        config = {
            "peft_type": "ADALORA", "init_r": self.init_r, "target_r": self.target_r, "tinit": self.tinit,
            "tfinal": self.tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight, "total_step": total, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "fan_in_fan_out": conv1d == {True},
            "target_modules": peft_targets(model, layers),
            "rank_pattern": {f"{n}.lora_E": mask for n, mask in self.rank_pattern(model).items()},
        }
        return PeftAdapter(config, weights, notes)

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        understood = {"init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                      "total_step", "rank_pattern", "lora_alpha", "lora_dropout", "fan_in_fan_out", "target_modules", "r"}
        # AdaLoraConfig() cannot be built without total_step: its other fields' defaults are LoraConfig's
        refuse_unknown_options({**config, "peft_type": "LORA"}, understood, cls.__name__)
        total = config.get("total_step")
        return {
            "init_r": int(config.get("init_r", 12)), "target_r": int(config.get("target_r", 8)),
            "tinit": int(config.get("tinit", 0)), "tfinal": int(config.get("tfinal", 0)),
            "deltaT": int(config.get("deltaT", 1)), "beta1": float(config.get("beta1", 0.85)),
            "beta2": float(config.get("beta2", 0.85)), "orth_reg_weight": float(config.get("orth_reg_weight", 0.5)),
            "total_step": int(total) if total else None, "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout") or 0.0),
            "targets": fw_targets(config.get("target_modules"), "adapter_config.json: target_modules"),
        }

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's kept ranks as the first of ``init_r`` (the others zero) and the masks saying so;
        PEFT names its tensors ``<module>.lora_A`` (no ``.weight``)."""
        out = dict(weights)
        for name, layer in self.svd_layers(model).items():
            a = out.pop(f"{name}.lora_A", None)
            e = out.pop(f"{name}.lora_E", None)
            b = out.pop(f"{name}.lora_B", None)
            if a is None or e is None or b is None:
                raise KeyError(f"{type(self).__name__}: the PEFT adapter has no lora_A/lora_E/lora_B for '{name}'")
            k = a.shape[0]
            if k > layer.r or e.shape != (k, 1) or b.shape != (layer.out_features, k) or a.shape[1] != layer.in_features:
                raise ValueError(f"{type(self).__name__}: '{name}' has {k} ranks of shapes A {tuple(a.shape)}, E "
                                 f"{tuple(e.shape)}, B {tuple(b.shape)}; this model's layer has init_r={layer.r}, "
                                 f"{layer.in_features} -> {layer.out_features}")
            keep = torch.arange(layer.r) < k  # the order of the ranks does not matter: the sum is the same
            full_a = torch.zeros(layer.r, layer.in_features, dtype=a.dtype)
            full_e = torch.zeros(layer.r, 1, dtype=e.dtype)
            full_b = torch.zeros(layer.out_features, layer.r, dtype=b.dtype)
            full_a[keep], full_e[keep], full_b[:, keep] = a, e, b
            out[f"{name}.lora_A"], out[f"{name}.lora_E"], out[f"{name}.lora_B"] = full_a, full_e, full_b
            out[f"{name}.rank_mask"] = keep.to(torch.int8)
        return out


__all__ = ["AdaLoRA"]
