"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen weight W gets a trainable low-rank update; only A and B train::

         x ──────────────┬───────────────┐
                         │               │
                  ┌──────▼──────┐   ┌────▼────┐  A: r × in  (kaiming-uniform)
                  │ W (frozen)  │   │    A    │
                  │  out × in   │   └────┬────┘
                  └──────┬──────┘   ┌────▼────┐  B: out × r  (zeros, so ΔW = 0 at start)
                         │          │    B    │
                         │          └────┬────┘
                         │               │ × alpha / r   (alpha / sqrt(r) with rsLoRA)
                         └──────(+)◄─────┘
                                 │
                                 y = W x + (alpha / r) · B A x

Each adapted layer adds r · (in + out) parameters. After training, ``merge()`` folds
``(alpha / r) · B A`` into W, so inference costs exactly what the base model costs.

``init`` chooses how A and B start (:mod:`fw_lora.layer`): ``kaiming`` (the above),
``gaussian``, or PiSSA / OLoRA, which start A and B from W's principal singular directions /
QR factors and leave the residual ``W - s·B0·A0`` in the base (the model starts equal to the
base). For those two the trained model is ``W_res + s·B·A = W + s·(B·A - B0·A0)``:

- fw's adapter format (:meth:`LoRA.stored_state_dict`) stores A and B *and* the initial
  factors ``lora_A0``/``lora_B0``; loading rebuilds the recipe on the original base (attach
  computes W_res again) and, where the stored A0/B0 differ from the recomputed ones
  (``pissa_niter``'s random draws, another LAPACK), rebases W_res on the stored ones, so the
  round trip gives the trained model. Checkpoints keep A and B only (attach recomputes A0/B0).
- PEFT's format holds the rank-2r plain LoRA for the original W that PEFT's
  ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes: ``A' = [A; A0]``,
  ``B' = [B, -B0]``, ``r`` and ``lora_alpha`` doubled (rsLoRA: alpha × sqrt(2)), so the scale is
  unchanged; ``init_lora_weights: true``.
- a merged model is ``W_res + s·B·A``: the trained model.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from framework.layers import WeightDType, weight_dtype
from framework.method import (
    ExportNotSupportedError,
    MergeableLayers,
    PeftAdapter,
    PeftMethod,
    check_state_dict,
    copy_parameters,
)
from framework.peft_compat import fw_targets, peft_targets, refuse_unknown_options
from framework.targeting import set_submodule, targets_or_roles
from framework.validation import InvalidArgument, one_of, optional_positive_int, positive, positive_int, probability
from fw_lora.layer import BASE_CHANGING, LoRAInit, LoRALinear

#: the initial factors a PiSSA/OLoRA layer stores beside A and B (fw's adapter format)
INITIAL_FACTORS = ("lora_A0", "lora_B0")
#: PEFT ``init_lora_weights`` values that change the base weight and that fw cannot reproduce
PEFT_BASE_CHANGING = ("corda", "loftq", "lora_ga")


class LoRA(MergeableLayers, PeftMethod):
    """Low-rank updates B·A on chosen Linear layers; mergeable into the base weights.

    Args:
        r: rank of the update (> 0).
        alpha: scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        targets: module name patterns (suffix, glob or ``re:`` regex, or ``all-linear``);
            None picks the architecture's query and value projections.
        dropout: dropout on the LoRA branch's input.
        rslora: rank-stabilized scaling alpha / sqrt(r) (Kalajdzievski, 2023).
        dtype: dtype of A and B (``base``: the base weight's dtype).
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024, arXiv:2402.12354): B trains at the learning
            rate × this ratio (> 0; the paper: ~16), A and everything else at the learning rate.
            None: one learning rate.
        init: how A and B start, as PEFT's ``init_lora_weights``: ``kaiming`` (A kaiming-uniform,
            B zero; PEFT's ``true``), ``gaussian`` (A ~ N(0, 1/r²), B zero), ``pissa`` (PiSSA, Meng et
            al., 2024, arXiv:2404.02948: A, B from W's top-r singular triplets, W keeps the
            residual) or ``olora`` (OLoRA, Büyükakyüz, 2024, arXiv:2406.01775: A, B from W = QR, W
            keeps the residual). The same seed gives PEFT's A, B and residual W.
        pissa_niter: with ``init: pissa``, a randomized SVD with this many subspace iterations
            (PEFT's ``pissa_niter_[k]``, fast on large W); None: the exact SVD.

    LoRA+ groups as PEFT's ``create_loraplus_optimizer`` with ``loraplus_weight_decay`` equal to
    ``model.weight_decay``, with two differences: PEFT also gives every other 1-D trainable
    parameter (biases, norms; e.g. a classifier's bias) the ratio, fw only B (the head trains at
    the learning rate); and fw's LoRA wraps no embeddings, so PEFT's ``loraplus_lr_embedding``
    group has no counterpart.
    """

    description = "LoRA: trainable low-rank updates B·A on chosen Linear layers (mergeable)"
    peft_type = "LORA"
    #: the wrapper put around each target, and what merge() visits (hybrids substitute a
    #: subclass, e.g. a gated one)
    layer_type: type[LoRALinear] = LoRALinear
    #: how ``fw inspect`` and the fit summary name a wrapped layer
    label: ClassVar[str] = "LoRA"
    #: the layer whose forward PEFT's form computes (a subclass computing more cannot export)
    peft_layer: ClassVar[type[LoRALinear]] = LoRALinear

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        targets: list[str] | None = None,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: WeightDType = "float32",
        loraplus_lr_ratio: float | None = None,
        init: LoRAInit = "kaiming",
        pissa_niter: int | None = None,
    ) -> None:
        positive_int(r, "r", "a positive integer rank")
        one_of(init, ("kaiming", "gaussian", *BASE_CHANGING), "init")
        optional_positive_int(pissa_niter, "pissa_niter")
        if pissa_niter is not None and init != "pissa":
            raise InvalidArgument("pissa_niter", f"applies to init: pissa only (init is {init})")
        positive(alpha, "alpha")
        probability(dropout, "dropout")
        if loraplus_lr_ratio is not None:
            positive(loraplus_lr_ratio, "loraplus_lr_ratio")
        self.r = r
        self.alpha = alpha
        self.targets = targets
        self.dropout = dropout
        self.rslora = rslora
        self.dtype = dtype
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.init = init
        self.pissa_niter = pissa_niter

    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return targets_or_roles(model, self.targets, ["query", "value"], field="targets")

    def attach(self, model: nn.Module) -> None:
        for name, layer in self.target_modules(model):
            wrapped = self.layer_type(layer, self.r, self.alpha, self.dropout, self.rslora, self.adapter_dtype(layer))
            wrapped.initialize(self.init, self.pissa_niter)
            set_submodule(model, name, wrapped)
            self.on_wrapped(name, wrapped)

    def adapter_dtype(self, layer: nn.Module) -> torch.dtype:
        """The dtype of A and B beside ``layer`` (subclasses: another rule, e.g. QLoRA's compute dtype)."""
        return weight_dtype(self.dtype, layer.weight)

    def on_wrapped(self, name: str, wrapped: LoRALinear) -> None:
        """Called for every layer :meth:`attach` wrapped: records it (subclasses also configure it)."""
        added = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        self.record(name, f"{self.label} r={self.r} (+{added:,})")

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """LoRA+: every B at ``lr × loraplus_lr_ratio``, the layers' other trainable parameters
        (A) at ``lr``; None without a ratio (one learning rate)."""
        if self.loraplus_lr_ratio is None:
            return None
        a, b = [], []
        for module_name in self.modified_modules:  # this method's layers only (compose may hold others)
            for name, p in model.get_submodule(module_name).named_parameters():
                if p.requires_grad:
                    (b if name == "lora_B" else a).append(p)
        return [{"params": a}, {"params": b, "lr": lr * self.loraplus_lr_ratio}]

    # -- fw's adapter format: PiSSA/OLoRA layers also store their initial factors ----------

    def initialized_layers(self, model: nn.Module) -> dict[str, LoRALinear]:
        """This method's layers whose init changed the base weight (they hold ``lora_A0``/``lora_B0``)."""
        layers = {}
        for name in self.modified_modules:  # this method's layers only (compose may hold others)
            layer = model.get_submodule(name)
            if isinstance(layer, LoRALinear) and layer.lora_A0 is not None:
                layers[name] = layer
        return layers

    def stored_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A and B (and the trained head); for ``pissa``/``olora`` also each layer's initial
        ``lora_A0``/``lora_B0``, which fix the residual base the trained A and B belong to."""
        stored = super().stored_state_dict(model)
        for name, layer in self.initialized_layers(model).items():
            for key in INITIAL_FACTORS:
                stored[f"{name}.{key}"] = getattr(layer, key).detach()
        return stored

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load A and B; stored initial factors rebase each PiSSA/OLoRA layer's residual on them
        (:meth:`fw_lora.layer.LoRALinear.rebase`; nothing changes where they equal the ones
        computed at attach). A state without any (a PEFT adapter saved unconverted, with
        ``init_lora_weights: pissa``) keeps the residual attach computed."""
        owner = type(self).__name__
        if strict:
            expected = self.stored_state_dict(model)
            if not any(key.endswith(INITIAL_FACTORS) for key in state_dict):
                expected = {k: v for k, v in expected.items() if not k.endswith(INITIAL_FACTORS)}
            check_state_dict(expected, state_dict, owner)
        state = dict(state_dict)
        for name, layer in self.initialized_layers(model).items():
            keys = [f"{name}.{key}" for key in INITIAL_FACTORS]
            if all(key in state for key in keys):
                layer.rebase(*(state.pop(key) for key in keys))
        copy_parameters(model, state, owner)

    # -- Hugging Face PEFT's format --------------------------------------------------------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        """PEFT's LoRA; PiSSA/OLoRA as PEFT converts them for the original base
        (``save_pretrained(path_initial_model_for_weight_conversion=...)``): ``A' = [A; A0]``,
        ``B' = [B, -B0]``, r and lora_alpha doubled (rsLoRA: lora_alpha × sqrt(2))."""
        layers = {n: m for n in self.modified_modules if isinstance(m := model.get_submodule(n), LoRALinear)}
        plain = {n for n, m in layers.items() if type(m).forward is self.peft_layer.forward}
        if plain != set(layers):
            raise ExportNotSupportedError(
                f"{type(self).__name__}'s layers ({type(next(iter(layers.values()))).__name__}) compute more than "
                f"PEFT's {self.label} does, so PEFT cannot load them"
            )
        conv1d = {m.fan_in_fan_out for m in layers.values()}
        if len(conv1d) > 1:
            raise ExportNotSupportedError(
                f"{self.label} targets both Linear and GPT-2 Conv1D modules; PEFT's fan_in_fan_out is one setting per adapter"
            )
        stored = self.stored_state_dict(model)
        converted = set(self.initialized_layers(model))
        if converted and converted != set(layers):  # pragma: no cover - one init per method
            raise ExportNotSupportedError(f"{type(self).__name__}: some layers were initialized with {self.init}, some not")
        weights: dict[str, torch.Tensor] = {}
        for name in layers:
            lora_a, lora_b = stored[f"{name}.lora_A"], stored[f"{name}.lora_B"]
            if name in converted:  # ΔW = s·(B·A - B0·A0) = s·[B, -B0]·[A; A0]
                lora_a = torch.cat([lora_a, stored[f"{name}.lora_A0"]], dim=0)
                lora_b = torch.cat([lora_b, -stored[f"{name}.lora_B0"]], dim=1)
            weights[f"{name}.lora_A.weight"] = lora_a
            weights[f"{name}.lora_B.weight"] = lora_b
        r, alpha = self.r, self.alpha
        if converted:
            r, alpha = 2 * r, alpha * 2**0.5 if self.rslora else 2 * alpha
        config = {
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": self.dropout,
            "use_rslora": self.rslora, "fan_in_fan_out": conv1d == {True},
            "target_modules": peft_targets(model, layers),
        }
        notes = []
        if converted:
            notes.append(
                f"trained with init: {self.init} (the base kept W - s·B0·A0); exported as PEFT converts it "
                f"for the original base: plain LoRA of rank {r} = [A; A0], [B, -B0] (lora_alpha {alpha:g})"
            )
        return PeftAdapter(config, weights, notes)

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        """PEFT's LoRA config as arguments; ``init_lora_weights`` ``pissa``/``pissa_niter_[k]``/
        ``olora`` (an adapter PEFT saved without converting it) becomes ``init`` (attach then
        computes the residual from the recipe's original base, as training did), a converted
        one (``true``) is plain LoRA. Inits fw cannot reproduce that changed the base (CorDA,
        LoftQ, LoRA-GA) are refused."""
        refuse_unknown_options(config, {"r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out", "target_modules"}, cls.__name__)
        args = {
            "r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout") or 0.0), "rslora": bool(config.get("use_rslora", False)),
            "targets": fw_targets(config.get("target_modules"), "adapter_config.json: target_modules"),
        }
        init, niter = peft_init(config.get("init_lora_weights", True))
        if "init" in inspect.signature(cls.__init__).parameters:  # a subclass may not take init
            args["init"] = init
            if "pissa_niter" in inspect.signature(cls.__init__).parameters:
                args["pissa_niter"] = niter
        elif init in BASE_CHANGING:
            raise ExportNotSupportedError(f"adapter_config.json: init_lora_weights={init!r} has no equivalent in fw's {cls.__name__}")
        return args

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key.removesuffix(".weight"): value for key, value in weights.items()}


def peft_init(value: Any) -> tuple[str, int | None]:
    """PEFT's ``init_lora_weights`` as fw's ``(init, pissa_niter)``; inits that only chose the
    starting point of A and B (``true``, ``gaussian``, EVA, ...) leave no trace in the trained
    weights and read as ``kaiming``/``gaussian``."""
    if not isinstance(value, str):
        return "kaiming", None
    lowered = value.lower()
    if lowered in ("gaussian", "pissa", "olora"):
        return lowered, None
    if lowered.startswith("pissa_niter_"):
        try:
            return "pissa", int(lowered.removeprefix("pissa_niter_"))
        except ValueError:
            pass
    if lowered.startswith(PEFT_BASE_CHANGING) or lowered.startswith("pissa"):
        raise ExportNotSupportedError(
            f"adapter_config.json: init_lora_weights={value!r} changed the base weights in a way fw does not "
            "reproduce; convert it in PEFT first (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    return "kaiming", None


__all__ = ["LoRA", "peft_init"]
