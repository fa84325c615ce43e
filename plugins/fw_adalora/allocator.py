"""AdaLoRA's rank allocator: importance scores, the budget schedule and the masks.

The same arithmetic as Hugging Face PEFT's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``
(``peft/tuners/adalora``), over fw's :class:`~fw_adalora.layer.SVDLinear` layers instead of
parameter names. Its state (the two moving averages per trained entry) is plain tensors, so a
checkpoint holds it and a resumed run allocates exactly as the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fw_adalora.layer import SVDLinear

#: the trained tensors of a layer, in PEFT's parameter order
PARTS = ("lora_A", "lora_B", "lora_E")


@dataclass
class Schedule:
    """The budget schedule's settings (PEFT's ``AdaLoraConfig`` fields)."""

    init_r: int
    target_r: int
    tinit: int
    tfinal: int
    deltaT: int  # noqa: N815 - PEFT's name
    total_step: int
    beta1: float
    beta2: float


@dataclass
class RankAllocator:
    """Importance-driven rank budgets for ``layers`` (module name -> layer).

    Per trained entry w: sensitivity ``I = |w · ∂L/∂w|``, smoothed ``Ī ← β1 Ī + (1-β1) I`` and its
    uncertainty ``Ū ← β2 Ū + (1-β2) |I - Ī|``; the score is ``s = Ī · Ū``. The score of rank i
    of a layer is ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``. At an allocation the
    ``total - budget`` lowest-scoring ranks over all layers get ``E_i = 0``.
    """

    layers: dict[str, SVDLinear]
    schedule: Schedule
    ipt: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_ipt: dict[str, torch.Tensor] = field(default_factory=dict)
    exp_avg_unc: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def init_budget(self) -> int:
        return sum(layer.r for layer in self.layers.values())

    @property
    def target_budget(self) -> int:
        return self.schedule.target_r * len(self.layers)

    def parameters(self) -> dict[str, torch.Tensor]:
        """``<module>.<part>`` -> the trained tensor, layers in name order."""
        return {f"{name}.{part}": getattr(layer, part) for name, layer in sorted(self.layers.items()) for part in PARTS}

    def reset_ipt(self) -> None:
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """The rank budget at ``step`` and whether to allocate: ``init`` through ``tinit``, then
        a cubic decrease to ``target`` at ``total_step - tfinal``, allocating every ``deltaT`` steps."""
        s = self.schedule
        if step <= s.tinit:
            return self.init_budget, False
        if step > s.total_step - s.tfinal:
            return self.target_budget, True
        mul_coeff = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        budget = int((self.init_budget - self.target_budget) * (mul_coeff**3) + self.target_budget)
        return budget, step % s.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.schedule.beta1, self.schedule.beta2
        for name, p in self.parameters().items():
            if p.grad is None:
                continue  # PEFT would fail here; a part without a gradient has nothing to score
            if name not in self.ipt:
                self.ipt[name] = torch.zeros_like(p)
                self.exp_avg_ipt[name] = torch.zeros_like(p)
                self.exp_avg_unc[name] = torch.zeros_like(p)
            self.ipt[name] = (p * p.grad).abs().detach()
            self.exp_avg_ipt[name] = b1 * self.exp_avg_ipt[name] + (1 - b1) * self.ipt[name]
            self.exp_avg_unc[name] = b2 * self.exp_avg_unc[name] + (1 - b2) * (self.ipt[name] - self.exp_avg_ipt[name]).abs()

    def _score(self, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    def rank_scores(self) -> dict[str, torch.Tensor]:
        """Module name -> the score of each of its ranks (r,)."""
        scores = {}
        for name in sorted(self.layers):
            a = self._score(f"{name}.lora_A").mean(dim=1, keepdim=True)
            b = self._score(f"{name}.lora_B").mean(dim=0, keepdim=False).view(-1, 1)
            ab = torch.cat([a, b], dim=1).sum(dim=1, keepdim=False)
            scores[name] = self._score(f"{name}.lora_E").view(-1) + ab.view(-1)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` best-scoring ranks over all layers (ties at the threshold are
        pruned, as in PEFT): update each layer's ``rank_mask`` and zero the pruned ``E``."""
        scores = self.rank_scores()
        k = self.init_budget - budget
        if k <= 0:  # nothing to prune (PEFT's kthvalue would fail on k = 0)
            keep = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=k)[0].item()
            keep = {name: ~(s <= threshold) for name, s in scores.items()}
        for name, layer in self.layers.items():
            layer.rank_mask.copy_(keep[name].to(layer.rank_mask.device))
            layer.apply_mask()

    def update_and_allocate(self, step: int) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate(step)``: before the final phase, update the
        scores and allocate when the schedule says so; at its first step, allocate the target
        budget and drop the scores; after it, keep the pruned ranks at zero."""
        s = self.schedule
        final = s.total_step - s.tfinal
        if step < final:
            self.update_ipt()
            budget, allocate = self.budget_schedule(step)
            if allocate:
                self.mask_to_budget(budget)
        elif step == final:
            budget, _ = self.budget_schedule(step)
            self.mask_to_budget(budget)
            self.reset_ipt()
        else:
            for layer in self.layers.values():
                layer.apply_mask()

    # -- state for checkpoints -------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """The moving averages (``<module>.<part>.exp_avg_ipt`` / ``.exp_avg_unc``) and each
        layer's ``<module>.rank_mask``."""
        out = {f"{name}.rank_mask": layer.rank_mask for name, layer in self.layers.items()}
        for name in self.exp_avg_ipt:
            out[f"{name}.exp_avg_ipt"] = self.exp_avg_ipt[name]
            out[f"{name}.exp_avg_unc"] = self.exp_avg_unc[name]
        return out

    def load_state(self, state: dict[str, torch.Tensor], owner: str) -> None:
        params = self.parameters()
        expected = {f"{name}.rank_mask" for name in self.layers}
        averages = {k for k in state if k.endswith((".exp_avg_ipt", ".exp_avg_unc"))}
        unknown = sorted(set(state) - expected - averages) + sorted(
            k for k in averages if k.rsplit(".", 1)[0] not in params)
        if unknown or (state and not expected <= set(state)):
            raise KeyError(f"{owner}: the checkpoint's rank allocator state does not fit this model "
                           f"(unexpected: {unknown[:5]}; missing: {sorted(expected - set(state))[:5]})")
        self.reset_ipt()
        with torch.no_grad():
            for name, layer in self.layers.items():
                if f"{name}.rank_mask" in state:
                    layer.rank_mask.copy_(state[f"{name}.rank_mask"].to(layer.rank_mask.device, torch.bool))
            for key in sorted(averages):
                name, kind = key.rsplit(".", 1)
                p = params[name]
                getattr(self, kind)[name] = state[key].to(p.device, p.dtype).clone()
                self.ipt.setdefault(name, torch.zeros_like(p))
