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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from framework.config import init_args

if TYPE_CHECKING:  # pragma: no cover
    from lightning.pytorch import LightningDataModule

    from framework.module import PeftModule


def copy_parameters(model: nn.Module, state: dict[str, torch.Tensor], owner: str) -> None:
    """Copy ``state`` (parameter name -> tensor) into ``model``; unknown names are an error."""
    params = dict(model.named_parameters())
    unknown = sorted(state.keys() - params.keys())
    if unknown:
        raise KeyError(f"{owner}: the stored weights do not fit this model (unexpected: {unknown[:5]})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


class MergeNotSupportedError(NotImplementedError):
    """Raised by :meth:`PeftMethod.merge` for methods whose math cannot fold into the weights."""


class PeftMethod(ABC):
    """A parameter-efficient fine-tuning method.

    Subclasses set :attr:`description` (one line, shown by ``fw methods``) or start their
    docstring with it, implement :meth:`attach`, and override the other hooks when the
    defaults do not fit.
    """

    #: One line shown by ``fw methods``; defaults to the first line of the class docstring.
    description: str = ""

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
        """Load what :meth:`trainable_state_dict` returned; a missing or unknown key is an error."""
        params = dict(model.named_parameters())
        expected = {name for name, p in params.items() if p.requires_grad}
        missing = sorted(expected - state_dict.keys())
        unexpected = sorted(state_dict.keys() - params.keys())
        if missing or unexpected:
            raise KeyError(
                f"{type(self).__name__}: the adapter weights do not fit this model "
                f"(missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}). "
                "Was the checkpoint written for another method, target list or backbone?"
            )
        with torch.no_grad():
            for name, value in state_dict.items():
                target = params[name]
                if target.shape != value.shape:
                    raise ValueError(
                        f"{type(self).__name__}: '{name}' has shape {tuple(value.shape)} in the "
                        f"checkpoint but {tuple(target.shape)} in the model"
                    )
                target.copy_(value)

    def stored_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a finished run stores for deployment (e.g. a flattened prefix, not its MLP)."""
        return self.trainable_state_dict(model)

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

    # -- optional hooks the core calls at the right moment ---------------------------------

    def prepare(self, module: PeftModule, datamodule: LightningDataModule | None) -> None:
        """Called once before fitting (e.g. a calibration pass over training data)."""

    def on_after_backward(self, model: nn.Module) -> None:
        """Called after every backward pass, before the optimizer step (e.g. gradient masks)."""

    # -- identity -------------------------------------------------------------------------

    @classmethod
    def summary_line(cls) -> str:
        """The one-line description shown by ``fw methods``."""
        if cls.description:
            return cls.description
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else cls.__name__

    def hparams(self) -> dict[str, Any]:
        """The hyper-parameters this instance was built with (its typed ``__init__`` arguments,
        kept as same-named attributes)."""
        return init_args(self)


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
