"""The contract every fw method plugin implements.

A plugin subclasses :class:`PeftMethod`, takes its hyper-parameters as *typed* ``__init__``
arguments (LightningCLI builds it from a recipe and ``--print_config`` shows the defaults),
and is registered under the ``fw.methods`` entry-point group::

    [project.entry-points."fw.methods"]
    lora = "fw_lora:LoRA"

The core calls a method only through the methods below. Before :meth:`attach` runs, the
core has frozen every backbone parameter; after it, the parameters that require a gradient
are exactly the method's (the core then unfreezes the task head when asked to).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from framework.targeting import set_submodule

if TYPE_CHECKING:  # pragma: no cover
    from framework.prepare import PrepareContext


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], owner: str) -> None:
    """``given`` has exactly the keys and shapes of ``expected``; otherwise one error that names
    what is missing, unexpected or of another shape."""
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(
            f"{owner}: the adapter weights do not fit this model "
            f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}). "
            "Were they written for another method, target list or backbone?"
        )
    for name, value in given.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{owner}: '{name}' has shape {tuple(value.shape)} in the adapter but "
                f"{tuple(expected[name].shape)} in the model (another backbone size, rank or length?)"
            )


def copy_parameters(model: nn.Module, state: dict[str, torch.Tensor], owner: str) -> None:
    """Copy ``state`` (parameter name -> tensor) into ``model``; unknown names are an error."""
    params = dict(model.named_parameters())
    unknown = sorted(state.keys() - params.keys())
    if unknown:
        raise KeyError(f"{owner}: the stored weights do not fit this model (unexpected: {unknown[:5]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def load_trainable_parameters(model: nn.Module, state: dict[str, torch.Tensor], owner: str) -> None:
    """Copy ``state`` into exactly ``model``'s trainable parameters (keys and shapes checked)."""
    check_state_dict({n: p for n, p in model.named_parameters() if p.requires_grad}, state, owner)
    copy_parameters(model, state, owner)


class MergeNotSupportedError(NotImplementedError):
    """Raised by :meth:`PeftMethod.merge` for methods whose math cannot fold into the weights."""


class ExportNotSupportedError(ValueError):
    """A method has no form in the asked format (e.g. bottleneck adapters in PEFT's)."""


@dataclass
class PeftAdapter:
    """A method in Hugging Face PEFT's terms (what :meth:`PeftMethod.to_peft` returns).

    ``config``: the PEFT config fields of the method (``peft_type`` included; the core adds
    ``task_type``, ``base_model_name_or_path`` and ``modules_to_save``). ``weights``: tensors
    named as PEFT names them inside the model, without PEFT's ``base_model.model.`` prefix
    (``bert.encoder.layer.0.attention.self.query.lora_A.weight``; ``prompt_embeddings`` for
    prompt-learning methods). ``notes``: what a user of the exported folder should know.
    """

    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


class PeftMethod(ABC):
    """A parameter-efficient fine-tuning method.

    Subclasses set :attr:`description` (one line, shown by ``fw methods``) or start their
    docstring with it, implement :meth:`attach`, and override the other hooks when the
    defaults do not fit.
    """

    #: One line shown by ``fw methods``; defaults to the first line of the class docstring.
    description: str = ""
    #: Hugging Face PEFT's ``peft_type`` this method reads and writes (``LORA``, ``IA3``, ...);
    #: None: the method has no PEFT form.
    peft_type: ClassVar[str | None] = None
    #: whether FSDP may shard the model this method trains; the core refuses a sharding
    #: strategy otherwise, saying :attr:`sharding_refusal`
    supports_sharding: ClassVar[bool] = True
    sharding_refusal: ClassVar[str] = ""

    # -- required -------------------------------------------------------------------------

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Modify ``model`` in place and leave exactly this method's parameters trainable.

        Find targets by module name (:mod:`framework.targeting`), and call :meth:`record`
        for every module changed so that ``fw inspect`` and the fit summary can show it.
        """

    # -- bookkeeping for the summary ------------------------------------------------------

    def record(self, module_name: str, what: str) -> None:
        """Note that ``module_name`` was modified (``what``: e.g. ``"LoRA r=8 (+12,288)"``)."""
        self.__dict__.setdefault("_modified", {})[module_name] = what

    @property
    def modified_modules(self) -> dict[str, str]:
        """Module name -> what this method did there, in the order it was recorded."""
        return dict(self.__dict__.get("_modified", {}))

    # -- weights --------------------------------------------------------------------------

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint holds to resume training: by default every trainable parameter."""
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
        """Load every trainable parameter (what the default :meth:`trainable_state_dict`
        returns); a missing, unknown or differently shaped tensor is an error."""
        load_trainable_parameters(model, state_dict, type(self).__name__)

    def has_plain_checkpoints(self) -> bool:
        """Whether checkpoints hold this method's trainable parameters as they are (neither
        :meth:`trainable_state_dict` nor its loader overridden): what compose and multi combine."""
        cls = type(self)
        return (cls.trainable_state_dict is PeftMethod.trainable_state_dict
                and cls.load_trainable_state_dict is PeftMethod.load_trainable_state_dict)

    def stored_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a finished run stores for deployment (e.g. a flattened prefix, not its MLP): the
        tensors of fw's adapter format. Floating-point entries count as stored parameters;
        integer ones (e.g. the Fisher mask's indices) locate them."""
        return self.trainable_state_dict(model)

    def load_stored_state_dict(self, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load what :meth:`stored_state_dict` returned, for inference. ``strict``: exactly the
        keys and shapes this model stores (``compose`` checks the whole and hands each part its
        own keys with ``strict=False``)."""
        if strict:
            check_state_dict(self.stored_state_dict(model), state_dict, type(self).__name__)
        copy_parameters(model, state_dict, type(self).__name__)

    # -- merging --------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> None:
        """Fold the method into the base weights (where the math allows it)."""
        raise MergeNotSupportedError(
            f"{type(self).__name__} cannot be merged into the base weights: its modules must stay "
            "in the model at inference. Save the adapter instead (fw export)."
        )

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge`, restoring the base weights."""
        raise MergeNotSupportedError(f"{type(self).__name__} has no merge to undo")

    def can_merge(self) -> bool:
        """Whether :meth:`merge` folds this method into the weights (default: it is overridden)."""
        return type(self).merge is not PeftMethod.merge

    def unload(self, model: nn.Module) -> nn.Module:
        """Merge, then put every merged wrapper's ``base_layer`` back in its place: the plain
        architecture, ready for ``save_pretrained`` (``fw export --format merged``)."""
        self.merge(model)
        for name, module in list(model.named_modules()):
            if getattr(module, "merged", False) is True and isinstance(getattr(module, "base_layer", None), nn.Module):
                set_submodule(model, name, module.base_layer)
        return model

    # -- Hugging Face PEFT's format (fw export --format peft, --adapter PEFT_FOLDER) ----------

    def to_peft(self, model: nn.Module) -> PeftAdapter:
        """This method's trained state in PEFT's terms (read from :meth:`stored_state_dict`)."""
        raise ExportNotSupportedError(f"{type(self).__name__} has no Hugging Face PEFT form")

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        """This method's ``__init__`` arguments for a PEFT ``adapter_config.json`` of :attr:`peft_type`."""
        raise ExportNotSupportedError(f"{cls.__name__} does not read Hugging Face PEFT adapters")

    def from_peft_weights(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's tensors (named as in :class:`PeftAdapter`) as this method's stored state dict."""
        raise ExportNotSupportedError(f"{type(self).__name__} does not read Hugging Face PEFT adapters")

    # -- optional hooks the core calls at the right moment ---------------------------------

    def prepare(self, context: PrepareContext) -> None:
        """Called once before fitting (e.g. a calibration pass over training data); the
        context is the run as a method needs it (:class:`framework.prepare.PrepareContext`)."""

    def on_after_backward(self, model: nn.Module) -> None:
        """Called after every backward pass, before the optimizer step (e.g. gradient masks)."""

    #: a batch column the method reads, not the model (e.g. which named adapter each example
    #: uses); None: none. The core takes it out of every batch that has it and runs that
    #: batch's forward pass inside :meth:`routed`.
    routing_column: str | None = None

    def routed(self, model: nn.Module, values: Any) -> AbstractContextManager[Any]:
        """The context a batch's forward pass runs in, given the batch's :attr:`routing_column`."""
        return nullcontext()

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """The optimizer's parameter groups this method asks for; None (default): the core's.

        Each group is a dict with ``params`` (parameters of ``model``) and optionally ``lr``
        (absolute; ``lr`` here is the recipe's ``model.learning_rate``) and ``weight_decay``.
        Every trainable parameter of the method is in exactly one group; the task head's may be
        left out (the core puts unlisted ones in its default groups). The core splits each
        group into decay / no-decay as by default unless the group sets ``weight_decay``, and
        the schedule scales every group's own ``lr`` (e.g. LoRA+: B at ``lr`` × a ratio).
        """
        return None

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        """A term the core adds to the task's training loss at every training step (e.g. a
        regularizer of the method's weights); None (default): nothing. Called after the task's
        forward pass, inside the training step; the core logs the task loss as ``train/loss``,
        this term as ``train/method_loss`` and their sum (what is minimized) as
        ``train/total_loss``. Not added in validation or test."""
        return None

    def on_after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called once after every optimizer step that was applied, while the gradients it used
        are still there (e.g. importance scores from ``p * p.grad``, rank budgets). ``step``: the
        optimizer steps taken so far, this one included (1 after the first; with gradient
        accumulation one call per optimizer step, not per batch). Not called for a step skipped by
        the non-finite guard (no gradient was applied)."""

    def method_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """State outside the model's parameters that training changes and an exact resume needs
        (running statistics, masks): tensors only, named as the method likes. Checkpoints hold it
        beside the trainable weights; default: none."""
        return {}

    def load_method_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`method_state` returned (when a run resumes); default: there is none."""
        if state:
            raise KeyError(f"{type(self).__name__}: the checkpoint holds method state this method does not keep "
                           f"({sorted(state)[:5]})")

    # -- identity -------------------------------------------------------------------------

    @classmethod
    def summary_line(cls) -> str:
        """The one-line description shown by ``fw methods``."""
        if cls.description:
            return cls.description
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else cls.__name__


def load_stored_output(method: PeftMethod, model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool,
                       key: str, module: nn.Module) -> None:
    """Load a stored form in which ``key`` holds ``module``'s output (P-tuning's prompt, prefix
    tuning's flat prefix): ``module`` serves it from now on (``use_stored``) and is frozen;
    the other tensors are parameters."""
    owner = type(method).__name__
    if strict:
        check_state_dict(method.stored_state_dict(model), state_dict, owner)
    state = dict(state_dict)
    if key not in state:
        raise KeyError(f"{owner}: '{key}' is missing from the stored weights")
    module.use_stored(state.pop(key))
    module.requires_grad_(False)
    copy_parameters(model, state, owner)


class MergeableLayers:
    """Mixin for methods whose wrapper layers merge themselves (``merge()``/``unmerge()``):
    :attr:`layer_type` names the wrapper class; merging visits every such layer."""

    layer_type: type[nn.Module]

    @classmethod
    def layers(cls, model: nn.Module) -> list[Any]:
        return [m for m in model.modules() if isinstance(m, cls.layer_type)]

    def merge(self, model: nn.Module) -> None:
        for layer in self.layers(model):
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        for layer in self.layers(model):
            layer.unmerge()
